"""The namespace's netfilter rules as ctfix.platform.netfilter_read reads them, once
per command, for the pure readers of them: the NAT model (ctfix.core.nat) and the
rules that name a port (ctfix.core.port_rules). Pure.

- nftables: the objects of `nft -j list ruleset`, and each rule's text as `nft -a -s
  list ruleset` prints it, by (family, table, chain, handle) (`nft_rule_texts` parses
  that listing);
- iptables-legacy: each loaded table of a family, rule by rule in iptables-save's
  words (`LegacyTable`, `LegacyRule`).

Know before changing: a legacy table other than `nat` holds only the rules that can
match UDP (no `-p`, or `-p udp`): the reader leaves the others out, since only the NAT
model walks a whole table, and it walks only `nat`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

JsonObject = dict[str, Any]
#: (family, table, chain, handle) -> the rule as `nft list ruleset` prints it
RuleTexts = Mapping[tuple[str, str, str, int], str]

_TABLE_LINE = re.compile(r"^table (\S+) (\S+) \{ # handle \d+$")
_CHAIN_LINE = re.compile(r"^\s*chain (\S+) \{ # handle \d+$")
_RULE_LINE = re.compile(r"^\s*(.*\S) # handle (\d+)$")


def nft_rule_texts(text: str) -> dict[tuple[str, str, str, int], str]:
    """(family, table, chain, handle) -> the rule, from `nft -a -s list ruleset`."""
    texts: dict[tuple[str, str, str, int], str] = {}
    family = table = chain = None
    for line in text.splitlines():
        if m := _TABLE_LINE.match(line):
            family, table, chain = m.group(1), m.group(2), None
        elif m := _CHAIN_LINE.match(line):
            chain = m.group(1)
        elif line.strip() == "}" and line.startswith("\t}"):
            chain = None
        elif chain is not None and family and table and (m := _RULE_LINE.match(line)):
            texts[(family, table, chain, int(m.group(2)))] = m.group(1).strip()
    return texts


class LegacyRule(NamedTuple):
    """One rule of a legacy table, in iptables' own terms (each may start with `!`)."""

    chain: str
    source: str | None  # "192.0.2.0/255.255.255.0", "!192.0.2.3/32", None
    destination: str | None
    in_interface: str | None
    protocol: str | None  # "udp", "17", "!tcp", "ip" (any), None
    matches: tuple[tuple[str, str], ...]  # (name, options as iptables-save prints them)
    target: str  # "DNAT", "RETURN", a chain name, "" (none)
    target_options: str
    text: str  # the whole rule, `-A CHAIN ...`
    #: addresses, interfaces and protocol as iptables-save prints them (` -d ... -p udp`)
    options: str = ""


class LegacyTable(NamedTuple):
    family: Literal["ipv4", "ipv6"]
    #: every chain: (name, policy) with policy None for user chains
    chains: tuple[tuple[str, str | None], ...]
    rules: tuple[LegacyRule, ...]
    name: str = "nat"
