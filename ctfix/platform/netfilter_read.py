"""Read the namespace's netfilter rules once: nftables and iptables-legacy, for every
reader of them in a command (the rules that name a port, ctfix.core.port_rules; the
NAT model, ctfix.platform.nat_rules and ctfix.core.nat).

Read-only. nftables: the JSON ruleset through libnftables, and the same ruleset
printed with handles for each rule's text, read only when a reader first asks for a
text. iptables-legacy: each loaded table of a family through python-iptables, in one
forked child per family (see ctfix.platform.iptables_legacy), handed back as plain
`ctfix.core.ruleset.LegacyTable` values.

Know before changing: python-iptables creates any legacy table it opens, and it
opens *every* table as soon as it looks at a rule's target (to tell a chain jump
from an extension). `_read_legacy` therefore gets its Table class from
`iptables_legacy.table_class`, which declares which tables exist (from
/proc/thread-self/net/ip*_tables_names); never open a name outside that list. A
backend that cannot be read is an error of the ruleset (`Ruleset.errors`), never an
empty ruleset.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ctfix.core.model import Family
from ctfix.core.port_rules import UDP_PROTOCOLS, legacy_port_rules, nft_port_rules
from ctfix.core.ruleset import JsonObject, LegacyRule, LegacyTable, nft_rule_texts
from ctfix.core.snapshot import NetfilterRule
from ctfix.errors import CtfixError
from ctfix.platform import iptables_legacy

FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")


class _RuleTexts(Mapping[tuple[str, str, str, int], str]):
    """Each nft rule's text, read from libnftables the first time one is asked for."""

    def __init__(self) -> None:
        self._texts: dict[tuple[str, str, str, int], str] | None = None

    def _read(self) -> dict[tuple[str, str, str, int], str]:
        if self._texts is None:
            from ctfix.platform import nft

            self._texts = nft_rule_texts(nft.ruleset_text_with_handles())
        return self._texts

    def __getitem__(self, key: tuple[str, str, str, int]) -> str:
        return self._read()[key]

    def __iter__(self) -> Iterator[tuple[str, str, str, int]]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())


@dataclass
class Ruleset:
    """The namespace's rules as read once. `errors`: where ("nftables", "iptables-legacy
    ipv4", ...) -> why it could not be read; what was read is still here."""

    nft: list[JsonObject] = field(default_factory=list)
    nft_texts: Mapping[tuple[str, str, str, int], str] = field(default_factory=dict)
    legacy: dict[Family, tuple[LegacyTable, ...]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def error_lines(self) -> list[str]:
        return [f"{where}: {why}" for where, why in self.errors.items()]


def read(legacy_tables: Collection[str] | None = None) -> Ruleset:
    """Both backends' rules in the current namespace; `legacy_tables`: which legacy
    tables to read (None: every loaded one)."""
    found = Ruleset()
    try:
        from ctfix.platform import nft

        found.nft = nft.ruleset()
        found.nft_texts = _RuleTexts()
    except CtfixError as err:
        found.errors["nftables"] = err.one_line()
    wanted: dict[Family, list[str]] = {}
    for family in FAMILIES:
        try:
            loaded = iptables_legacy.loaded_tables(family)
        except CtfixError as err:  # not root: the table list itself is unreadable
            found.errors[f"iptables-legacy {family}"] = err.one_line()
            continue
        names = [n for n in loaded if legacy_tables is None or n in legacy_tables]
        if names:
            wanted[family] = names
    if wanted:
        try:
            # Once, before forking: the children share the import.
            iptables_legacy.import_iptc(
                "python-iptables is not installed but iptables-legacy tables exist"
            )
        except CtfixError as err:
            for family in wanted:
                found.errors[f"iptables-legacy {family}"] = err.one_line()
            wanted = {}
    for family, names in wanted.items():
        try:
            found.legacy[family] = iptables_legacy.in_child(_read_legacy, family, names)
        except CtfixError as err:
            found.errors[f"iptables-legacy {family}"] = err.one_line()
    return found


# -- the rules that name a port ------------------------------------------------------------


def rules_for_port(
    port: int, ruleset: Ruleset | None = None
) -> tuple[list[NetfilterRule], list[str]]:
    """Rules from every backend that holds any; errors per backend, not fatal."""
    found, errors = rules_for_ports([port], ruleset)
    return found[port], errors


def rules_for_ports(
    ports: Sequence[int], ruleset: Ruleset | None = None
) -> tuple[dict[int, list[NetfilterRule]], list[str]]:
    """`rules_for_port` for many ports (scan), from one read of the rules."""
    ruleset = ruleset if ruleset is not None else read()
    found: dict[int, list[NetfilterRule]] = {port: [] for port in ports}
    errors = ruleset.error_lines()
    try:
        for port, rules in nft_port_rules(ruleset.nft, ports, ruleset.nft_texts).items():
            found[port].extend(rules)
    except CtfixError as err:  # the rule texts could not be read
        errors.append(f"nftables: {err.one_line()}")
    for tables in ruleset.legacy.values():
        for port, rules in legacy_port_rules(tables, ports).items():
            found[port].extend(rules)
    return found, errors


# -- iptables-legacy, in a child per family -------------------------------------------------


def _read_legacy(family: Family, names: Sequence[str]) -> tuple[LegacyTable, ...]:
    """In the child: the tables named (all of `nat`; of the others, the rules that can
    match UDP), in iptables-save's words."""
    iptc = iptables_legacy.import_iptc()
    table_class = iptables_legacy.table_class(
        iptc, family, iptables_legacy.loaded_tables(family)
    )
    tables: list[LegacyTable] = []
    for name in names:
        if name not in table_class.ALL:
            continue
        table = table_class(name, autocommit=False)
        table.refresh()
        chains: list[tuple[str, str | None]] = []
        rules: list[LegacyRule] = []
        for chain in table.chains:
            policy = chain.get_policy().name if chain.is_builtin() else None
            chains.append((chain.name, policy))
            for rule in chain.rules:
                if name == "nat" or rule.protocol in UDP_PROTOCOLS:
                    rules.append(_legacy_rule(rule, chain.name))
        tables.append(LegacyTable(family, tuple(chains), tuple(rules), name))
    return tuple(tables)


def _legacy_rule(rule: Any, chain: str) -> LegacyRule:
    """A python-iptables rule as iptables-save prints it, in parts."""
    ip = rule.get_ip()
    options = _address_option("-s", rule.src) + _address_option("-d", rule.dst)
    for flag, iface in (("-i", rule.in_interface), ("-o", rule.out_interface)):
        if iface:
            neg = iface.startswith("!")
            options += f" {'! ' if neg else ''}{flag} {iface.lstrip('!')}"
    if rule.protocol and rule.protocol not in ("ip", "all", "0"):  # iptables-save omits them
        options += f" -p {rule.protocol}"
    matches = tuple((m.name, iptables_legacy.saved_options(m, ip)) for m in rule.matches)
    target = rule.target
    target_name = target.name if target is not None else ""
    target_saved = iptables_legacy.saved_options(target, ip) if target_name else ""
    listed = "".join(f" -m {name}{saved}" for name, saved in matches)
    jump = f" -j {target_name}{target_saved}" if target_name else ""
    return LegacyRule(
        chain=chain,
        source=_plain(rule.src),
        destination=_plain(rule.dst),
        in_interface=rule.in_interface or None,
        protocol=rule.protocol or None,
        matches=matches,
        target=target_name,
        target_options=target_saved,
        text=f"-A {chain}{options}{listed}{jump}",
        options=options,
    )


def _address_option(flag: str, value: str | None) -> str:
    if not value:
        return ""
    negated = value.startswith("!")
    value = value.lstrip("!")
    address, _, mask = value.partition("/")
    if ":" in mask:  # python-iptables gives IPv6 masks as addresses
        mask = str(bin(int(ipaddress.IPv6Address(mask))).count("1"))
    try:
        net = ipaddress.ip_network(f"{address}/{mask or 'max'}".replace("/max", ""), strict=False)
    except ValueError:
        return f" {'! ' if negated else ''}{flag} {value}"
    if net.prefixlen == 0:
        return ""
    return f" {'! ' if negated else ''}{flag} {net}"


def _plain(address: str | None) -> str | None:
    """None for "any" (0.0.0.0/0, ::/0) as python-iptables gives it."""
    if not address:
        return None
    bare = address.lstrip("!")
    if bare in ("0.0.0.0/0.0.0.0", "0.0.0.0/0", "::/0", "::/::"):
        return None
    return address
