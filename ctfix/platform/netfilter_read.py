"""Netfilter rules that mention a UDP port, from nftables and iptables-legacy.

Read-only. nftables is read as JSON through libnftables (the rule text comes from
the same ruleset printed with handles); iptables-legacy through python-iptables.

Know before changing: python-iptables creates any legacy table it opens, and it
opens *every* table as soon as it looks at a rule's target (to tell a chain jump
from an extension). `_legacy_rules` therefore gets its Table class from
`iptables_legacy.table_class`, which declares which tables exist (from
/proc/thread-self/net/ip*_tables_names); never open a name outside that list.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ctfix.core.model import Family
from ctfix.core.snapshot import NetfilterRule
from ctfix.errors import CtfixError
from ctfix.platform import iptables_legacy

JsonObject = dict[str, Any]

_NFT_ACTIONS = {
    "snat": "snat",
    "masquerade": "masquerade",
    "dnat": "dnat",
    "redirect": "redirect",
    "notrack": "notrack",
    "accept": "accept",
    "drop": "drop",
    "reject": "reject",
    "log": "log",
    "set": "set-add",
    "jump": "jump",
    "goto": "jump",
}


# -- nftables ---------------------------------------------------------------------


def _port_in(right: Any, port: int) -> bool:
    """Does an nft match's right-hand side include the port?"""
    if isinstance(right, bool):
        return False
    if isinstance(right, int):
        return right == port
    if isinstance(right, str):
        return right.isdigit() and int(right) == port
    if isinstance(right, dict):
        if "range" in right:
            low, high = right["range"]
            return isinstance(low, int) and isinstance(high, int) and low <= port <= high
        if "set" in right:
            members = right["set"]
            return any(
                _port_in(m, port) for m in (members if isinstance(members, list) else [members])
            )
    return False


def _port_field(left: Any) -> str | None:
    """`sport`/`dport` when the match is on a UDP (or any transport) port."""
    if isinstance(left, dict) and "payload" in left:
        payload = left["payload"]
        if payload.get("protocol") in ("udp", "th") and payload.get("field") in ("sport", "dport"):
            field: str = payload["field"]
            return field
    return None


def _nft_nat_to(expressions: list[JsonObject]) -> str | None:
    for expr in expressions:
        for key in ("snat", "dnat"):
            value = expr.get(key)
            if isinstance(value, dict) and isinstance(value.get("addr"), str):
                address: str = value["addr"]
                return address
    return None


def _nft_nat_port(expressions: list[JsonObject]) -> int | None:
    """The port a snat/dnat statement rewrites to (None: none named)."""
    for expr in expressions:
        for key in ("snat", "dnat"):
            value = expr.get(key)
            if isinstance(value, dict) and isinstance(value.get("addr"), str):
                port = value.get("port")
                return port if isinstance(port, int) and not isinstance(port, bool) else None
    return None


def _nft_mark_to(expressions: list[JsonObject]) -> int | None:
    """The value of a `meta mark set VALUE` statement (a constant only)."""
    for expr in expressions:
        mangle = expr.get("mangle")
        if not isinstance(mangle, dict):
            continue
        key = mangle.get("key")
        value = mangle.get("value")
        marks = isinstance(key, dict) and key.get("meta", {}).get("key") == "mark"
        if marks and isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _nft_classify(
    expressions: list[JsonObject], port: int
) -> tuple[frozenset[str], bool, bool, bool, bool]:
    actions: set[str] = set()
    sport = dport = to_port = mark = False
    for expr in expressions:
        if "match" in expr:
            match = expr["match"]
            field = _port_field(match.get("left"))
            op_includes = match.get("op", "==") in ("==", "in")
            if field is not None and op_includes and _port_in(match.get("right"), port):
                sport = sport or field == "sport"
                dport = dport or field == "dport"
            left = match.get("left")
            if isinstance(left, dict) and left.get("meta", {}).get("key") == "mark":
                mark = True
            continue
        for key, value in expr.items():
            if key == "mangle":
                target = value.get("key", {}) if isinstance(value, dict) else {}
                if target.get("ct", {}).get("key") == "zone":
                    actions.add("zone")
                elif target.get("meta", {}).get("key") == "mark":
                    actions.add("mark")
                else:
                    actions.add("other")
            elif key == "ct" and isinstance(value, dict) and value.get("key") == "zone":
                actions.add("zone")
            elif key in _NFT_ACTIONS:
                actions.add(_NFT_ACTIONS[key])
                if key in ("snat", "dnat", "masquerade", "redirect") and isinstance(value, dict):
                    to_port = to_port or _port_in(value.get("port"), port)
            elif key != "counter":
                actions.add("other")
    return frozenset(actions), sport, dport, to_port, mark


_TABLE_LINE = re.compile(r"^table (\S+) (\S+) \{ # handle \d+$")
_CHAIN_LINE = re.compile(r"^\s*chain (\S+) \{ # handle \d+$")
_RULE_LINE = re.compile(r"^\s*(.*\S) # handle (\d+)$")


def nft_rule_texts(text: str) -> dict[tuple[str, str, str, int], str]:
    """(family, table, chain, handle) -> the rule as `nft list ruleset` prints it."""
    return _nft_rule_texts(text)


def _nft_rule_texts(text: str) -> dict[tuple[str, str, str, int], str]:
    """(family, table, chain, handle) -> the rule as `nft list ruleset` prints it."""
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


def nft_rules(port: int) -> list[NetfilterRule]:
    """nftables rules whose matches or NAT targets name the port."""
    return nft_rules_by_port([port])[port]


def nft_rules_by_port(ports: Sequence[int]) -> dict[int, list[NetfilterRule]]:
    """For each port, the nftables rules that name it; the ruleset is read once."""
    from ctfix.platform import nft

    objects = nft.ruleset()
    hooks: dict[tuple[str, str, str], str] = {}
    candidates: list[
        tuple[int, JsonObject, tuple[frozenset[str], bool, bool, bool, bool]]
    ] = []
    for obj in objects:
        if "chain" in obj:
            chain = obj["chain"]
            if "hook" in chain:
                hooks[(chain["family"], chain["table"], chain["name"])] = str(chain["hook"])
        elif "rule" in obj:
            rule = obj["rule"]
            for port in ports:
                found = _nft_classify(rule.get("expr", []), port)
                _actions, sport, dport, to_port, _mark = found
                if sport or dport or to_port:
                    candidates.append((port, rule, found))
    result: dict[int, list[NetfilterRule]] = {port: [] for port in ports}
    if not candidates:
        return result
    texts = _nft_rule_texts(nft.ruleset_text_with_handles())
    for port, rule, (actions, sport, dport, to_port, mark) in candidates:
        key = (rule["family"], rule["table"], rule["chain"])
        result[port].append(
            NetfilterRule(
                backend="nftables",
                family=rule["family"],
                table=rule["table"],
                chain=rule["chain"],
                rule=texts.get((*key, int(rule.get("handle", -1))), "(rule text unavailable)"),
                actions=actions,
                matches_sport=sport,
                matches_dport=dport,
                to_port=to_port and not (sport or dport),
                hook=hooks.get(key),
                matches_mark=mark,
                nat_to=_nft_nat_to(rule.get("expr", [])),
                nat_port=_nft_nat_port(rule.get("expr", [])),
                mark_to=_nft_mark_to(rule.get("expr", [])),
            )
        )
    return result


# -- iptables-legacy -----------------------------------------------------------------

_LEGACY_ACTIONS = {
    "SNAT": "snat",
    "MASQUERADE": "masquerade",
    "DNAT": "dnat",
    "REDIRECT": "redirect",
    "NETMAP": "snat",
    "NOTRACK": "notrack",
    "ACCEPT": "accept",
    "DROP": "drop",
    "REJECT": "reject",
    "LOG": "log",
    "MARK": "mark",
    "CONNMARK": "mark",
    "SET": "set-add",
}
_BUILTIN_HOOKS = {
    "PREROUTING": "prerouting",
    "INPUT": "input",
    "FORWARD": "forward",
    "OUTPUT": "output",
    "POSTROUTING": "postrouting",
}


def _ports_in(text: str, port: int) -> bool:
    """`53,56000:57000` (iptables port list/range syntax) includes the port?"""
    for part in text.split(","):
        low, _, high = part.partition(":")
        if low.isdigit() and low == part and int(low) == port:
            return True
        if low.isdigit() and high.isdigit() and int(low) <= port <= int(high):
            return True
    return False


_PORT_OPTION = re.compile(
    r"(!\s+)?--(sports?|dports?|source-ports?|destination-ports?|ports)\s+(\S+)"
)


def _match_ports(saved: str, port: int) -> tuple[bool, bool]:
    sport = dport = False
    for negated, option, value in _PORT_OPTION.findall(saved):
        if negated or not _ports_in(value, port):
            continue
        if option.startswith(("s", "source")):
            sport = True
        elif option.startswith(("d", "destination")):
            dport = True
        else:  # multiport --ports: either side
            sport = dport = True
    return sport, dport


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


def _legacy_nat_to(saved: str) -> str | None:
    """`--to-source 198.51.100.13:53` / `[2001:db8::1]:53` -> the address."""
    match = re.search(r"--to-(?:source|destination)\s+(\[[^\]]+\]|[^\s:\-]+)", saved)
    return match.group(1).strip("[]") if match else None


def parse_nat_target(token: str) -> tuple[str, int | None] | None:
    """`198.51.100.13:53`, `[2001:db8::1]:53`, `2001:db8::1`, `198.51.100.13` ->
    (address, port); None for anything else (a map, a range)."""
    if token.startswith("["):
        address, _, rest = token[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif token.count(":") == 1:
        address, _, port = token.partition(":")
    else:
        address, port = token, ""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return None
    if port and not port.isdigit():
        return None
    return address, int(port) if port else None


def _legacy_nat_port(saved: str) -> int | None:
    """`--to-source 198.51.100.13:53` / `[2001:db8::1]:53` -> 53 (None: no port)."""
    match = re.search(r"--to-(?:source|destination)\s+(\S+)", saved)
    if match is None:
        return None
    target = parse_nat_target(match.group(1))
    return target[1] if target else None


def _legacy_mark_to(target_name: str, saved: str) -> int | None:
    """MARK's value when it sets the whole mark (`--set-xmark V/0xffffffff`)."""
    if target_name != "MARK":
        return None
    match = re.search(r"--set-x?mark\s+(0x[0-9a-fA-F]+|\d+)(?:/(0x[0-9a-fA-F]+|\d+))?", saved)
    if match is None:
        return None
    mask = int(match.group(2), 0) if match.group(2) else 0xFFFFFFFF
    return int(match.group(1), 0) if mask == 0xFFFFFFFF else None


def _legacy_rules(ports: Sequence[int], family: Family) -> Iterator[tuple[int, NetfilterRule]]:
    loaded = iptables_legacy.loaded_tables(family)
    if not loaded:
        return
    table_class = iptables_legacy.table_class(_import_iptc(), family, loaded)
    for name in loaded:
        if name not in table_class.ALL:
            continue
        table = table_class(name, autocommit=False)
        table.refresh()
        chains = table.chains
        chain_names = frozenset(c.name for c in chains)
        for chain in chains:
            for rule in chain.rules:
                saved = _legacy_saved(rule)
                if saved is None:
                    continue
                for port in ports:
                    found = _legacy_rule(saved, port, family, name, chain.name, chain_names)
                    if found is not None:
                        yield port, found


@dataclass(frozen=True, slots=True)
class _Saved:
    """One rule as iptables-save prints its parts (read from libiptc once)."""

    options: str  # addresses, interfaces, protocol
    matches: tuple[tuple[str, str], ...]  # (match name, its saved options)
    target_name: str
    target_saved: str


def _legacy_saved(rule: Any) -> _Saved | None:
    """The rule's parts in iptables-save's words; None when it cannot match UDP."""
    if rule.protocol not in ("udp", "17", None, ""):
        return None
    return _legacy_parts(rule)


def legacy_parts(rule: Any) -> _Saved:
    """Any rule's parts in iptables-save's words (the NAT model reads every rule)."""
    return _legacy_parts(rule)


def legacy_rule_text(rule: Any, chain: str) -> str:
    """Any rule as iptables-save prints it: `-A CHAIN -d ... -p udp -m ... -j ...`."""
    parts = _legacy_parts(rule)
    matches = "".join(f" -m {name}{saved}" for name, saved in parts.matches)
    target = f" -j {parts.target_name}{parts.target_saved}" if parts.target_name else ""
    return f"-A {chain}{parts.options}{matches}{target}"


def _legacy_parts(rule: Any) -> _Saved:
    ip = rule.get_ip()
    options = ""
    options += _address_option("-s", rule.src)
    options += _address_option("-d", rule.dst)
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
    return _Saved(options, matches, target_name, target_saved)


def _legacy_rule(
    saved_rule: _Saved,
    port: int,
    family: Family,
    table: str,
    chain: str,
    chain_names: frozenset[str],
) -> NetfilterRule | None:
    """The rule classified for the port; None when it does not name the port."""
    options = saved_rule.options
    sport = dport = mark = False
    for name, saved in saved_rule.matches:
        options += f" -m {name}{saved}"
        s, d = _match_ports(saved, port)
        sport, dport = sport or s, dport or d
        mark = mark or name in ("mark", "connmark")
    target_name, target_saved = saved_rule.target_name, saved_rule.target_saved
    to_port = bool(
        re.search(rf"--to(?:-source|-destination)?\s+\S*:{port}\b", target_saved)
        or re.search(rf"--to-ports\s+{port}\b", target_saved)
    )
    if not (sport or dport or to_port):
        return None
    if target_name:
        options += f" -j {target_name}{target_saved}"
    actions: set[str] = set()
    if target_name == "CT":
        if "--notrack" in target_saved:
            actions.add("notrack")
        if "--zone" in target_saved:
            actions.add("zone")
        actions = actions or {"other"}
    elif target_name in _LEGACY_ACTIONS:
        actions.add(_LEGACY_ACTIONS[target_name])
    elif target_name:
        actions.add("jump" if target_name in chain_names else "other")
    return NetfilterRule(
        backend="iptables-legacy",
        family=family,
        table=table,
        chain=chain,
        rule=f"-A {chain}{options}",
        actions=frozenset(actions),
        matches_sport=sport,
        matches_dport=dport,
        to_port=to_port and not (sport or dport),
        hook=_BUILTIN_HOOKS.get(chain),
        matches_mark=mark,
        nat_to=_legacy_nat_to(target_saved),
        nat_port=_legacy_nat_port(target_saved),
        mark_to=_legacy_mark_to(target_name, target_saved),
    )


def import_iptc() -> Any:
    """python-iptables (imported once; the children that read tables share it)."""
    return _import_iptc()


def _import_iptc() -> Any:
    return iptables_legacy.import_iptc(
        "python-iptables is not installed but iptables-legacy rules exist"
    )


def _read_family(ports: Sequence[int], family: Family) -> list[tuple[int, NetfilterRule]]:
    """`_legacy_rules` for one family, in its own child (see `iptables_legacy.in_child`)."""
    try:
        return iptables_legacy.in_child(lambda: list(_legacy_rules(ports, family)))
    except CtfixError as err:
        raise CtfixError(
            f"reading the {family} iptables-legacy tables: {err.one_line()}"
        ) from None


def legacy_rules(port: int) -> list[NetfilterRule]:
    """iptables-legacy rules (IPv4 and IPv6, loaded tables only) that name the port."""
    return legacy_rules_by_port([port])[port]


def legacy_rules_by_port(ports: Sequence[int]) -> dict[int, list[NetfilterRule]]:
    """For each port, the iptables-legacy rules that name it; each table is read once."""
    result: dict[int, list[NetfilterRule]] = {port: [] for port in ports}
    both: tuple[Family, ...] = ("ipv4", "ipv6")
    families = [f for f in both if iptables_legacy.loaded_tables(f)]
    if not families:
        return result
    _import_iptc()  # once, before forking: the children share the import
    for family in families:
        for port, rule in _read_family(ports, family):
            result[port].append(rule)
    return result


def rules_for_port(port: int) -> tuple[list[NetfilterRule], list[str]]:
    """Rules from every backend that holds any; errors per backend, not fatal."""
    found, errors = rules_for_ports([port])
    return found[port], errors


def rules_for_ports(ports: Sequence[int]) -> tuple[dict[int, list[NetfilterRule]], list[str]]:
    """`rules_for_port` for many ports, each backend's ruleset read once (scan)."""
    found: dict[int, list[NetfilterRule]] = {port: [] for port in ports}
    errors: list[str] = []
    for backend, reader in (
        ("nftables", nft_rules_by_port),
        ("iptables-legacy", legacy_rules_by_port),
    ):
        try:
            for port, rules in reader(ports).items():
                found[port].extend(rules)
        except CtfixError as err:
            errors.append(f"{backend}: {err.one_line()}")
    return found, errors
