"""DNAT rules that send UDP requests to a port on this host, with the path to each.

Read-only, nftables (libnftables JSON, plus the printed text for what iptables-nft
stores as `xt` targets) and iptables-legacy (python-iptables). Each DNAT is read
with the matches of every rule that jumps (or goes) to its chain, up to a built-in
hook: kube-proxy matches the ClusterIP and port in KUBE-SERVICES and DNATs in
KUBE-SEP-*, two jumps further down.

Know before changing: only what is understood counts. A destination match that is
negated, a map, or anything else unread leaves the destination unknown (the DNAT is
still reported: its clients can be remembered once conntrack shows them); a path
whose protocol match excludes UDP, or whose matches contradict each other, is not a
UDP path and is left out. The same python-iptables traps as in netfilter_read apply
(declare the tables that exist, one child per family).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ctfix.core.model import Family
from ctfix.core.snapshot import DnatRule
from ctfix.errors import CtfixError
from ctfix.platform import iptables_legacy, netfilter_read
from ctfix.platform.netfilter_read import parse_nat_target

JsonObject = dict[str, Any]
#: kube-proxy's deepest path is hook -> KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP; real
#: rulesets rarely nest deeper, and a bound keeps a cyclic or huge one cheap.
MAX_DEPTH = 12
#: a destination port range is expanded up to this size (else: any port)
MAX_PORTS = 256


@dataclass(frozen=True, slots=True)
class _Terms:
    """What one rule's matches say about the request, as far as understood."""

    destinations: tuple[str, ...] | None = None  # None: no (understood) constraint
    dports: tuple[int, ...] | None = None
    udp: bool = True  # False: a protocol match that excludes UDP


def _combine(parts: list[_Terms]) -> _Terms | None:
    """The terms of a whole path (outermost first); None when they contradict."""
    destinations: tuple[str, ...] | None = None
    dports: tuple[int, ...] | None = None
    for part in parts:
        if not part.udp:
            return None
        if part.dports is not None:
            dports = part.dports if dports is None else tuple(
                p for p in dports if p in part.dports
            )
            if not dports:
                return None
        if part.destinations is not None:
            destinations = _narrower(destinations, part.destinations)
            if destinations == ():
                return None
    return _Terms(destinations, dports)


def _narrower(outer: tuple[str, ...] | None, inner: tuple[str, ...]) -> tuple[str, ...]:
    """The destinations both constraints allow (the narrower of each overlapping pair)."""
    if outer is None:
        return inner
    kept: list[str] = []
    for a in inner:
        for b in outer:
            na, nb = ipaddress.ip_network(a, strict=False), ipaddress.ip_network(b, strict=False)
            low = max(int(na.network_address), int(nb.network_address))
            high = min(int(na.broadcast_address), int(nb.broadcast_address))
            if na.version == nb.version and low <= high:  # aligned networks: one holds the other
                narrow = a if na.prefixlen >= nb.prefixlen else b
                if narrow not in kept:
                    kept.append(narrow)
    return tuple(kept)


def _ports(first: int, last: int) -> tuple[int, ...] | None:
    if last < first or last - first >= MAX_PORTS:
        return None
    return tuple(range(first, last + 1))


def _dnat(
    backend: str,
    family: str,
    hook: str,
    terms: _Terms,
    target: tuple[str, int | None],
    rule: str,
    via: tuple[str, ...],
) -> DnatRule:
    return DnatRule(
        backend, family, hook, terms.destinations or (), terms.dports or (), target[0],
        target[1], rule, via,
    )


def relevant(rule: DnatRule, port: int) -> bool:
    """Does this DNAT send requests to `port`? (to that port, or keeping it)"""
    if rule.to_port is not None:
        return rule.to_port == port
    return not rule.dports or port in rule.dports


# -- nftables ---------------------------------------------------------------------------

def _nft_destinations(right: Any) -> tuple[str, ...] | None:
    items = right["set"] if isinstance(right, dict) and "set" in right else [right]
    found: list[str] = []
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, str):
            text = item
        elif isinstance(item, dict) and "prefix" in item:
            text = f"{item['prefix']['addr']}/{item['prefix']['len']}"
        else:
            return None  # a range, a map, a named set: not understood
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            return None
        found.append(text)
    return tuple(found)


def _nft_dports(right: Any) -> tuple[int, ...] | None:
    items = right["set"] if isinstance(right, dict) and "set" in right else [right]
    found: list[int] = []
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, bool):
            return None
        if isinstance(item, int):
            found.append(item)
        elif isinstance(item, dict) and "range" in item:
            low, high = item["range"]
            expanded = _ports(int(low), int(high)) if isinstance(low, int) else None
            if expanded is None:
                return None
            found.extend(expanded)
        else:
            return None
    return tuple(found)


def _is_udp(right: Any) -> bool:
    items = right["set"] if isinstance(right, dict) and "set" in right else [right]
    return any(i in ("udp", 17) for i in (items if isinstance(items, list) else [items]))


def _nft_terms(expressions: list[JsonObject]) -> _Terms:
    destinations: tuple[str, ...] | None = None
    dports: tuple[int, ...] | None = None
    udp = True
    for expr in expressions:
        match = expr.get("match")
        if not isinstance(match, dict) or match.get("op", "==") not in ("==", "in"):
            continue
        left, right = match.get("left"), match.get("right")
        if not isinstance(left, dict):
            continue
        payload, meta = left.get("payload"), left.get("meta")
        if isinstance(payload, dict):
            where = (payload.get("protocol"), payload.get("field"))
            if where in (("ip", "daddr"), ("ip6", "daddr")):
                destinations = _nft_destinations(right)
            elif where in (("udp", "dport"), ("th", "dport")):
                dports = _nft_dports(right)
            elif where in (("ip", "protocol"), ("ip6", "nexthdr")):
                udp = udp and _is_udp(right)
            elif where[1] in ("dport", "sport") and where[0] not in ("udp", "th"):
                udp = False  # `tcp dport ...`: a path for another protocol
        elif isinstance(meta, dict) and meta.get("key") == "l4proto":
            udp = udp and _is_udp(right)
    return _Terms(destinations, dports, udp)


_DNAT_TEXT = re.compile(r"\bdnat (?:ip6? )?to (\S+)")


def _nft_target(expressions: list[JsonObject], text: str) -> tuple[str, int | None] | None:
    """The DNAT statement's target; from the printed rule for iptables-nft's `xt`."""
    for expr in expressions:
        dnat = expr.get("dnat")
        if isinstance(dnat, dict):
            address, port = dnat.get("addr"), dnat.get("port")
            if not isinstance(address, str) or not (port is None or isinstance(port, int)):
                return None  # a map or a range: not one target
            try:
                ipaddress.ip_address(address)
            except ValueError:
                return None
            return address, port
        xt = expr.get("xt")
        if isinstance(xt, dict) and xt.get("type") == "target" and xt.get("name") == "DNAT":
            found = _DNAT_TEXT.search(text)
            return parse_nat_target(found.group(1)) if found else None
    return None


def _jump_target(expressions: list[JsonObject]) -> str | None:
    for expr in expressions:
        for verb in ("jump", "goto"):
            target = expr.get(verb)
            if isinstance(target, dict) and isinstance(target.get("target"), str):
                name: str = target["target"]
                return name
    return None


Key = tuple[str, str, str]  # (family, table, chain)


def nft_dnat_rules(
    objects: list[JsonObject], texts: dict[tuple[str, str, str, int], str], port: int
) -> list[DnatRule]:
    """The DNAT rules of a ruleset (`nft -j list ruleset` objects, and each rule's
    text by (family, table, chain, handle)) that send UDP requests to `port`. Pure."""
    hooks: dict[Key, str] = {}
    callers: dict[Key, list[tuple[Key, JsonObject]]] = {}
    dnats: list[tuple[Key, JsonObject]] = []
    for obj in objects:
        chain = obj.get("chain")
        if isinstance(chain, dict) and "hook" in chain:
            hooks[(chain["family"], chain["table"], chain["name"])] = str(chain["hook"])
        rule = obj.get("rule")
        if not isinstance(rule, dict):
            continue
        key: Key = (rule["family"], rule["table"], rule["chain"])
        expressions = rule.get("expr", [])
        jumps_to = _jump_target(expressions)
        if jumps_to is not None:
            callers.setdefault((key[0], key[1], jumps_to), []).append((key, rule))
        if any("dnat" in e or e.get("xt", {}).get("name") == "DNAT" for e in expressions):
            dnats.append((key, rule))

    def text(key: Key, rule: JsonObject) -> str:
        return texts.get((*key, int(rule.get("handle", -1))), "(rule text unavailable)")

    def paths(key: Key, depth: int, seen: frozenset[Key]) -> Iterator[tuple[str, list[Any]]]:
        if key in hooks:
            yield hooks[key], []
        if depth >= MAX_DEPTH:
            return
        for caller, rule in callers.get(key, []):
            if caller in seen:
                continue
            for hook, path in paths(caller, depth + 1, seen | {caller}):
                yield hook, [*path, (caller, rule)]

    found: list[DnatRule] = []
    for key, rule in dnats:
        own = text(key, rule)
        nat_target = _nft_target(rule.get("expr", []), own)
        if nat_target is None:
            continue
        for hook, path in paths(key, 0, frozenset({key})):
            if hook not in ("prerouting", "output"):
                continue
            terms = _combine(
                [_nft_terms(r.get("expr", [])) for _k, r in path] + [_nft_terms(rule["expr"])]
            )
            if terms is None:
                continue
            dnat = _dnat("nftables", key[0], hook, terms, nat_target, own,
                         tuple(text(k, r) for k, r in path))
            if relevant(dnat, port):
                found.append(dnat)
    return found


def _nft_rules(port: int) -> list[DnatRule]:
    from ctfix.platform import nft

    objects = nft.ruleset()
    expressions = (e for o in objects for e in o.get("rule", {}).get("expr", []))
    if not any("dnat" in e or "xt" in e for e in expressions):
        return []
    texts = netfilter_read.nft_rule_texts(nft.ruleset_text_with_handles())
    return nft_dnat_rules(objects, texts, port)


# -- iptables-legacy ------------------------------------------------------------------------

_DPORT = re.compile(r"(!\s+)?--(?:dports?|destination-ports?)\s+(\S+)")
_TO_DESTINATION = re.compile(r"--to-destination\s+(\S+)")
_LEGACY_HOOKS = {"PREROUTING": "prerouting", "OUTPUT": "output"}


def _legacy_dports(saved: str) -> tuple[int, ...] | None:
    for negated, value in _DPORT.findall(saved):
        if negated:
            return None
        ports: list[int] = []
        for part in value.split(","):
            low, _, high = part.partition(":")
            if not low.isdigit() or (high and not high.isdigit()):
                return None
            expanded = _ports(int(low), int(high or low))
            if expanded is None:
                return None
            ports.extend(expanded)
        return tuple(ports)
    return None


def _legacy_terms(rule: Any, ip: Any) -> _Terms:
    udp = rule.protocol in ("udp", "17", "ip", "all", "0", None, "")  # "ip": any protocol
    destinations: tuple[str, ...] | None = None
    dst = rule.dst or ""
    if dst and not dst.startswith("!"):
        address, _, mask = dst.partition("/")
        if ":" in mask:  # python-iptables gives IPv6 masks as addresses
            mask = str(bin(int(ipaddress.IPv6Address(mask))).count("1"))
        elif "." in mask:
            mask = str(ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen)
        net = ipaddress.ip_network(f"{address}/{mask}" if mask else address, strict=False)
        if net.prefixlen:
            one = net.num_addresses == 1
            destinations = (str(net.network_address) if one else str(net),)
    dports: tuple[int, ...] | None = None
    for match in rule.matches:
        if match.name in ("udp", "multiport"):
            found = _legacy_dports(iptables_legacy.saved_options(match, ip))
            if found is not None:
                dports = found
    return _Terms(destinations, dports, udp)


def _legacy_family(port: int, family: Family) -> list[DnatRule]:
    if "nat" not in iptables_legacy.loaded_tables(family):
        return []
    iptc = netfilter_read.import_iptc()
    table_class = iptables_legacy.table_class(iptc, family, iptables_legacy.loaded_tables(family))
    table = table_class("nat", autocommit=False)
    table.refresh()
    chains = table.chains
    names = {c.name for c in chains}
    callers: dict[str, list[tuple[str, _Terms, str]]] = {}
    dnats: list[tuple[str, _Terms, str, str]] = []
    for chain in chains:
        for rule in chain.rules:
            target = rule.target
            name = target.name if target is not None else ""
            ip = rule.get_ip()
            terms = _legacy_terms(rule, ip)
            text = netfilter_read.legacy_rule_text(rule, chain.name)
            if name in names:
                callers.setdefault(name, []).append((chain.name, terms, text))
            elif name == "DNAT":
                found = _TO_DESTINATION.search(iptables_legacy.saved_options(target, ip))
                if found:
                    dnats.append((chain.name, terms, text, found.group(1)))

    def paths(chain: str, depth: int, seen: frozenset[str]) -> Iterator[tuple[str, list[Any]]]:
        if chain in _LEGACY_HOOKS:
            yield _LEGACY_HOOKS[chain], []
        if depth >= MAX_DEPTH:
            return
        for caller, terms, text in callers.get(chain, []):
            if caller not in seen:
                for hook, path in paths(caller, depth + 1, seen | {caller}):
                    yield hook, [*path, (terms, text)]

    result: list[DnatRule] = []
    for chain_name, terms, text, to in dnats:
        target = parse_nat_target(to)
        if target is None:
            continue
        for hook, path in paths(chain_name, 0, frozenset({chain_name})):
            combined = _combine([t for t, _text in path] + [terms])
            if combined is None:
                continue
            dnat = _dnat("iptables-legacy", family, hook, combined, target, text,
                         tuple(t for _terms, t in path))
            if relevant(dnat, port):
                result.append(dnat)
    return result


def _legacy_rules(port: int) -> list[DnatRule]:
    both: tuple[Family, ...] = ("ipv4", "ipv6")
    families = [f for f in both if "nat" in iptables_legacy.loaded_tables(f)]
    if not families:
        return []
    netfilter_read.import_iptc()  # once, before forking: the children share the import
    found: list[DnatRule] = []
    for family in families:
        try:
            found.extend(iptables_legacy.in_child(_legacy_family, port, family))
        except CtfixError as err:
            raise CtfixError(
                f"reading the {family} iptables-legacy nat table: {err.one_line()}"
            ) from None
    return found


def dnat_rules(port: int) -> tuple[list[DnatRule], list[str]]:
    """DNAT rules of every backend that send UDP requests to `port`; errors per
    backend, not fatal (like `netfilter_read.rules_for_port`)."""
    found: list[DnatRule] = []
    errors: list[str] = []
    for backend, reader in (("nftables", _nft_rules), ("iptables-legacy", _legacy_rules)):
        try:
            found.extend(reader(port))
        except CtfixError as err:
            errors.append(f"{backend} DNAT: {err.one_line()}")
    return found, errors
