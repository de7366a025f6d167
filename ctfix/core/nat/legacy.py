"""iptables-legacy's nat table, rule by rule as iptables-save prints it -> the NAT
model's chains. Pure: ctfix.platform.netfilter_read reads the table with
python-iptables and hands over plain strings (`ctfix.core.ruleset.LegacyRule`).

Know before changing: options are read from the text iptables-save would print for
each match and target (`--dport 5140`, `--to-destination 198.51.100.21:5140`); a
match this module does not know is taken both ways (never a guess), a target it
does not know is opaque (the answer is undetermined).
"""

from __future__ import annotations

import ipaddress
import re
import shlex

from ctfix.core.nat.model import (
    Action,
    Elem,
    Field,
    Key,
    Match,
    Nat,
    NatChain,
    NatRule,
    Opaque,
    Target,
    Verdict,
    address_interval,
    network_interval,
)
from ctfix.core.ruleset import LegacyRule, LegacyTable

_PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "dccp": 33, "icmpv6": 58, "ipv6-icmp": 58,
              "sctp": 132, "udplite": 136}
#: built-in chains of the nat table and the hooks they sit on
_HOOKS = {"PREROUTING": "prerouting", "OUTPUT": "output", "INPUT": "input",
          "POSTROUTING": "postrouting"}
#: targets that do not decide where a flow goes (the rule goes on)
_PASSIVE = frozenset({"LOG", "NFLOG", "MARK", "CONNMARK", "TRACE", "AUDIT", "MASQUERADE",
                      "SNAT", "NETMAP-SNAT"})
_NAT_PRIORITY = -100  # NF_IP_PRI_NAT_DST: legacy nat PREROUTING and OUTPUT


def nat_chains(table: LegacyTable) -> list[NatChain]:
    family = "ip6" if table.family == "ipv6" else "ip"
    names = frozenset(name for name, _policy in table.chains)
    chains: list[NatChain] = []
    for name, policy in table.chains:
        rules = tuple(_rule(r, names) for r in table.rules if r.chain == name)
        hook = _HOOKS.get(name) if policy is not None else None
        chains.append(
            NatChain(
                backend="iptables-legacy",
                family=family,
                table="nat",
                name=name,
                rules=rules,
                hook=hook,
                priority=_NAT_PRIORITY if hook in ("prerouting", "output") else 100,
                policy="drop" if policy == "DROP" else "accept",
                nat=hook is not None,
            )
        )
    return chains


def _rule(rule: LegacyRule, chains: frozenset[str]) -> NatRule:
    matches: list[Match] = []
    proto = _protocol(rule.protocol, matches)
    if rule.source:
        matches.append(_address_match("saddr", rule.source))
    if rule.destination:
        matches.append(_address_match("daddr", rule.destination))
    if rule.in_interface:
        negated = rule.in_interface.startswith("!")
        name = rule.in_interface.lstrip("!").replace("+", "*")
        matches.append(Match(("iifname",), ((name,),), negated=negated))
    for name, options in rule.matches:
        matches.extend(_extension(name, options, proto))
    return NatRule(tuple(matches), _target(rule, chains), rule.text)


def _protocol(text: str | None, matches: list[Match]) -> int | None:
    """Add the protocol match; the protocol a port match may rely on (None: any)."""
    if not text or text in ("all", "0", "ip"):
        return None
    negated = text.startswith("!")
    name = text.lstrip("!").strip()
    number = int(name) if name.isdigit() else _PROTOCOLS.get(name.lower())
    if number is None:
        matches.append(Match(("opaque",), None))
        return None
    matches.append(Match(("l4proto",), (((number, number),),), negated=negated))
    return None if negated else number


def _address_match(name: Field, value: str) -> Match:
    negated = value.startswith("!")
    address, _, mask = value.lstrip("!").partition("/")
    try:
        if not mask:
            interval = address_interval(address)
        elif mask.isdigit():
            interval = network_interval(f"{address}/{mask}")
        else:  # python-iptables gives masks as addresses
            bits = bin(int(ipaddress.ip_address(mask))).count("1")
            interval = network_interval(f"{address}/{bits}")
    except ValueError:
        return Match(("opaque",), None)
    return Match((name,), ((interval,),), negated=negated)


def _options(text: str) -> list[tuple[bool, str, str]]:
    """`! --dport 53 --ctstate NEW` -> [(True, "dport", "53"), (False, "ctstate", "NEW")]."""
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    found: list[tuple[bool, str, str]] = []
    negated = False
    index = 0
    while index < len(words):
        word = words[index]
        if word == "!":
            negated = True
        elif word.startswith("--"):
            value = ""
            following = words[index + 1] if index + 1 < len(words) else "--"
            if not following.startswith("--") and following != "!":
                value = following
                index += 1
            found.append((negated, word[2:], value))
            negated = False
        index += 1
    return found


def _ports(text: str) -> tuple[Key, ...] | None:
    keys: list[Key] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        if not low.isdigit() or (high and not high.isdigit()):
            return None
        keys.append(((int(low), int(high or low)),))
    return tuple(keys)


_PORT_OPTIONS: dict[str, Field] = {
    "dport": "dport", "destination-port": "dport", "sport": "sport", "source-port": "sport",
    "dports": "dport", "destination-ports": "dport", "sports": "sport", "source-ports": "sport",
}
_RANGE_OPTIONS: dict[str, Field] = {"src-range": "saddr", "dst-range": "daddr"}


def _extension(name: str, options: str, proto: int | None) -> list[Match]:
    """The model's matches for one `-m NAME OPTIONS`."""
    parsed = _options(options)
    if name == "comment":
        return []
    if name in ("udp", "tcp", "sctp", "udplite", "dccp", "multiport"):
        # -m udp implies UDP; -m multiport relies on the rule's -p.
        implied = _PROTOCOLS.get(name, proto)
        out: list[Match] = []
        for negated, option, value in parsed:
            field = _PORT_OPTIONS.get(option)
            keys = _ports(value) if field else None
            out.append(
                Match((field,), keys, negated=negated, proto=implied)
                if field and keys
                else Match(("opaque",), None)
            )
        return out
    if name == "addrtype":
        out = []
        for negated, option, value in parsed:
            if option == "dst-type":
                types: tuple[Key, ...] = tuple((t.lower(),) for t in value.split(",") if t)
                out.append(Match(("fib-daddr-type",), types, negated=negated))
            else:
                out.append(Match(("opaque",), None))
        return out
    if name in ("conntrack", "state"):
        out = []
        for negated, option, value in parsed:
            if option in ("ctstate", "state"):
                states: tuple[Key, ...] = tuple((s.lower(),) for s in value.split(",") if s)
                out.append(Match(("ct-state",), states, negated=negated))
            else:
                out.append(Match(("opaque",), None))
        return out
    if name == "iprange":
        out = []
        for negated, option, value in parsed:
            field = _RANGE_OPTIONS.get(option)
            low, _, high = value.partition("-")
            try:
                elem: Elem = address_interval(low, high or low)
            except ValueError:
                field = None
            out.append(
                Match((field,), ((elem,),), negated=negated) if field else Match(("opaque",), None)
            )
        return out
    # statistic, recent, mark, set, ... : may match or not.
    return [Match(("opaque",), None)]


_TO = re.compile(r"--to-destination\s+(\S+)")
_TO_PORTS = re.compile(r"--to-ports\s+(\S+)")


def _target(rule: LegacyRule, chains: frozenset[str]) -> Action:
    name = rule.target
    if not name:
        return Verdict("continue")
    if name == "DNAT":
        found = _TO.search(rule.target_options)
        target = dnat_target(found.group(1)) if found else None
        return Nat(target) if target else Opaque(f"a DNAT ctfix cannot read ({rule.text})")
    if name == "REDIRECT":
        found = _TO_PORTS.search(rule.target_options)
        ports = port_range(found.group(1)) if found else None
        if found and ports is None:
            return Opaque(f"a REDIRECT ctfix cannot read ({rule.text})")
        text = f"redirect :{found.group(1)}" if found else "redirect (local address)"
        return Nat(Target(None, ports, text))
    if name in ("ACCEPT", "RETURN"):
        return Verdict("accept" if name == "ACCEPT" else "return")
    if name in ("DROP", "REJECT"):
        return Verdict("drop")
    if name in chains:
        return Verdict("jump", name)
    if name in _PASSIVE:
        return Verdict("continue")
    return Opaque(f"the target {name}")


def port_range(text: str) -> tuple[int, int] | None:
    low, _, high = text.partition("-")
    if not low.isdigit() or (high and not high.isdigit()):
        return None
    return (int(low), int(high or low))


def dnat_target(text: str) -> Target | None:
    """`198.51.100.21`, `198.51.100.21:5140`, `a-b:p1-p2`, `[2001:db8::1]:53`, `:5140`."""
    if text.startswith("["):
        address, _, port = text[1:].partition("]")
        port = port.lstrip(":")
    elif text.count(":") > 1:
        address, port = text, ""  # a bare IPv6 address
    else:
        address, _, port = text.partition(":")
    ports = port_range(port) if port else None
    if port and ports is None:
        return None
    if not address:
        return None  # `--to-destination :P` keeps the address: not something to judge
    low, _, high = address.partition("-")
    try:
        interval = address_interval(low, high or low)
    except ValueError:
        return None
    return Target(interval, ports, text)
