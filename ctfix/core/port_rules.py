"""The netfilter rules that name a UDP port (in a match, or as a NAT's new port),
each classified by what it does: what explain judges for rule problems (a NOTRACK,
an SNAT of requests, a zone without its SNAT...). Pure: the rules come from
ctfix.platform.netfilter_read as ctfix.core.ruleset values.

Know before changing: only rules that name the port are kept, so the listing (and
the rule text read for it) stays small on a host with thousands of rules; a rule's
text is asked of `texts` only for the rules kept (the reader reads it on demand).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ctfix.core.model import Family
from ctfix.core.ruleset import JsonObject, LegacyRule, LegacyTable, RuleTexts
from ctfix.core.snapshot import NetfilterRule

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


def _nft_nat(expressions: list[JsonObject]) -> tuple[str | None, int | None]:
    """The address a snat/dnat statement rewrites to, and the port when it names one."""
    for expr in expressions:
        for key in ("snat", "dnat"):
            value = expr.get(key)
            if isinstance(value, dict) and isinstance(value.get("addr"), str):
                port = value.get("port")
                named = port if isinstance(port, int) and not isinstance(port, bool) else None
                return value["addr"], named
    return None, None


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


def nft_port_rules(
    objects: Iterable[JsonObject], ports: Sequence[int], texts: RuleTexts
) -> dict[int, list[NetfilterRule]]:
    """For each port, the nftables rules (`nft -j list ruleset` objects) that name it."""
    hooks: dict[tuple[str, str, str], str] = {}
    candidates: list[tuple[int, JsonObject, tuple[frozenset[str], bool, bool, bool, bool]]] = []
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
    for port, rule, (actions, sport, dport, to_port, mark) in candidates:
        key = (rule["family"], rule["table"], rule["chain"])
        expressions = rule.get("expr", [])
        nat_to, nat_port = _nft_nat(expressions)
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
                nat_to=nat_to,
                nat_port=nat_port,
                mark_to=_nft_mark_to(expressions),
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
#: the protocols of a legacy rule that can match UDP (python-iptables says "ip" for
#: a rule without -p: such a rule names no port, as a port match needs -p udp)
UDP_PROTOCOLS = ("udp", "17", None, "")


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


def _legacy_nat_to(saved: str) -> str | None:
    """`--to-source 198.51.100.13:53` / `[2001:db8::1]:53` -> the address."""
    match = re.search(r"--to-(?:source|destination)\s+(\[[^\]]+\]|[^\s:\-]+)", saved)
    return match.group(1).strip("[]") if match else None


def _nat_target(token: str) -> tuple[str, int | None] | None:
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
    target = _nat_target(match.group(1))
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


def _legacy_rule(
    rule: LegacyRule, port: int, family: Family, table: str, chain_names: frozenset[str]
) -> NetfilterRule | None:
    """The rule classified for the port; None when it does not name the port."""
    options = rule.options
    sport = dport = mark = False
    for name, saved in rule.matches:
        options += f" -m {name}{saved}"
        s, d = _match_ports(saved, port)
        sport, dport = sport or s, dport or d
        mark = mark or name in ("mark", "connmark")
    target_name, target_saved = rule.target, rule.target_options
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
        chain=rule.chain,
        rule=f"-A {rule.chain}{options}",
        actions=frozenset(actions),
        matches_sport=sport,
        matches_dport=dport,
        to_port=to_port and not (sport or dport),
        hook=_BUILTIN_HOOKS.get(rule.chain),
        matches_mark=mark,
        nat_to=_legacy_nat_to(target_saved),
        nat_port=_legacy_nat_port(target_saved),
        mark_to=_legacy_mark_to(target_name, target_saved),
    )


def legacy_port_rules(
    tables: Iterable[LegacyTable], ports: Sequence[int]
) -> dict[int, list[NetfilterRule]]:
    """For each port, the rules of these legacy tables (one family's) that name it."""
    result: dict[int, list[NetfilterRule]] = {port: [] for port in ports}
    for table in tables:
        chain_names = frozenset(name for name, _policy in table.chains)
        for rule in table.rules:
            if rule.protocol not in UDP_PROTOCOLS:
                continue
            for port in ports:
                found = _legacy_rule(rule, port, table.family, table.name, chain_names)
                if found is not None:
                    result[port].append(found)
    return result
