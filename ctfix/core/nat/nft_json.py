"""nftables' JSON ruleset (`nft -j list ruleset`) -> the NAT model's chains. Pure.

Only tables that hold a nat base chain at prerouting or output are read, with all
their chains (jump targets) and named sets and maps. What the model understands is
listed in `ctfix.core.nat`; anything else becomes a match taken both ways or an
opaque statement (the answer is then undetermined), never a guess.

Know before changing: nft's JSON differs between versions in details (priorities as
numbers or names, set elements wrapped in `{"elem": {"val": ...}}` when they carry
timeouts or counters); read both forms. iptables-nft (Debian's `iptables`, which
Docker and kube-proxy use) stores `-j DNAT`, `-j REDIRECT` and `-m addrtype` as `xt`
expressions whose JSON carries no options; nft's *text* translates them (`dnat to
172.17.0.2:5140`, `fib daddr type local`), so those are read from the rule's text.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from ctfix.core.nat.model import (
    Action,
    Elem,
    Field,
    Key,
    Match,
    Nat,
    NatChain,
    NatMap,
    NatRule,
    Opaque,
    Target,
    Verdict,
    VerdictKind,
    VerdictMap,
    address_interval,
    network_interval,
)
from ctfix.core.ruleset import JsonObject, RuleTexts

_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
               "srcnat": 100}
_PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "dccp": 33, "icmpv6": 58, "sctp": 132,
              "udplite": 136}
#: statements that do not decide where a flow goes (the rule goes on)
_PASSIVE = frozenset({"counter", "log", "mangle", "notrack", "ct", "set", "meter", "limit",
                      "quota", "masquerade", "snat", "xt-watcher"})
_VERDICTS: dict[str, VerdictKind] = {
    "accept": "accept", "drop": "drop", "return": "return", "continue": "continue",
    "reject": "drop", "jump": "jump", "goto": "goto",
}
_ADDRESS_FIELDS = frozenset({"saddr", "daddr"})
_PORT_FIELDS = frozenset({"sport", "dport"})


class _Unreadable(Exception):
    """A value this parser does not understand: the match becomes opaque."""


def nat_chains(objects: list[JsonObject], texts: RuleTexts | None = None) -> list[NatChain]:
    """The chains of every table that holds a nat base chain at prerouting or output."""
    texts = texts if texts is not None else {}  # not `or`: a lazy mapping stays unread
    nat_tables = {
        (c["family"], c["table"])
        for c in (o["chain"] for o in objects if "chain" in o)
        if c.get("type") == "nat" and c.get("hook") in ("prerouting", "output")
    }
    sets: dict[tuple[str, str, str], JsonObject] = {}
    chain_info: dict[tuple[str, str, str], JsonObject] = {}
    rules: dict[tuple[str, str, str], list[JsonObject]] = {}
    for obj in objects:
        for kind in ("set", "map"):
            if kind in obj:
                one = obj[kind]
                if (one.get("family"), one.get("table")) in nat_tables:
                    sets[(one["family"], one["table"], one["name"])] = one
        if "chain" in obj:
            chain = obj["chain"]
            if (chain["family"], chain["table"]) in nat_tables:
                key = (chain["family"], chain["table"], chain["name"])
                chain_info[key] = chain
                rules.setdefault(key, [])
        elif "rule" in obj:
            rule = obj["rule"]
            key = (rule["family"], rule["table"], rule["chain"])
            if (rule["family"], rule["table"]) in nat_tables:
                rules.setdefault(key, []).append(rule)
    chains: list[NatChain] = []
    for key, info in chain_info.items():
        family, table, name = key
        parser = _RuleParser(family, table, sets)
        parsed = tuple(
            parser.rule(rule, texts.get((family, table, name, int(rule.get("handle", -1)))))
            for rule in rules.get(key, [])
        )
        chains.append(
            NatChain(
                backend="nftables",
                family=family,
                table=table,
                name=name,
                rules=parsed,
                hook=info.get("hook"),
                priority=_priority(info.get("prio", 0)),
                policy="drop" if info.get("policy") == "drop" else "accept",
                nat=info.get("type") == "nat",
            )
        )
    return chains


def _priority(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        name, _, offset = value.replace(" ", "").partition("+")
        if "-" in name:
            name, _, neg = name.partition("-")
            return _PRIORITIES.get(name, 0) - int(neg or 0)
        return _PRIORITIES.get(name, 0) + int(offset or 0)
    return 0


class _RuleParser:
    def __init__(self, family: str, table: str, sets: dict[tuple[str, str, str], JsonObject]):
        self.family = family
        self.table = table
        self.sets = sets

    def rule(self, rule: JsonObject, text: str | None) -> NatRule:
        matches: list[Match] = []
        action: Action | None = None
        for expr in rule.get("expr", []):
            if action is not None:
                break  # what follows the deciding statement does not change the NAT
            if "match" in expr:
                matches.append(self._match(expr["match"]))
                continue
            name = next(iter(expr), "")
            if name in ("limit", "quota", "meter"):
                # May not let the packet through: the rest of the rule goes both ways.
                matches.append(Match(("opaque",), None))
                continue
            if name == "xt":
                xt = expr["xt"] or {}
                if xt.get("type") == "match":
                    matches.append(_xt_match(str(xt.get("name", "")), text, rule))
                    continue
                if xt.get("type") == "watcher":
                    continue
                action = _xt_target(str(xt.get("name", "?")), text)
                continue
            if name in _PASSIVE:
                continue
            action = self._statement(name, expr[name])
        handle = rule.get("handle", "?")
        return NatRule(
            tuple(matches),
            action if action is not None else Verdict("continue"),
            text or f"(rule handle {handle} in {self.family} {self.table} {rule.get('chain')})",
        )

    # -- matches -------------------------------------------------------------------------

    def _match(self, match: JsonObject) -> Match:
        op = match.get("op", "==")
        try:
            fields, proto = _fields(match.get("left"))
            if "opaque" in fields or "random" in fields:
                return Match(("opaque",), None, proto=proto)
            keys = self._keys(fields, match.get("right"), op)
        except _Unreadable:
            return Match(("opaque",), None)
        return Match(fields, keys, negated=op == "!=", proto=proto)

    def _keys(self, fields: tuple[Field, ...], right: Any, op: str) -> tuple[Key, ...] | None:
        if op in ("<", "<=", ">", ">="):
            if len(fields) != 1:
                raise _Unreadable()
            value = _elem(fields[0], right)
            if not isinstance(value, tuple):
                raise _Unreadable()
            top = (1 << 131) if fields[0] in _ADDRESS_FIELDS else (1 << 32)
            low, high = {"<": (0, value[0] - 1), "<=": (0, value[1]),
                         ">": (value[1] + 1, top), ">=": (value[0], top)}[op]
            return (((low, high),),)
        if op not in ("==", "!=", "in"):
            raise _Unreadable()
        if isinstance(right, str) and right.startswith("@"):
            return self._named(fields, right[1:])
        members = right["set"] if isinstance(right, dict) and "set" in right else right
        if isinstance(members, list) and fields != ("ct-state",):
            return tuple(_key(fields, m) for m in members)
        if isinstance(members, list):
            return tuple((str(m),) for m in members)
        return (_key(fields, members),)

    def _named(self, fields: tuple[Field, ...], name: str) -> tuple[Key, ...] | None:
        found = self.sets.get((self.family, self.table, name))
        if found is None:
            raise _Unreadable()
        flags = found.get("flags", [])
        if "dynamic" in flags or "timeout" in flags:
            return None  # filled by the packet path: what it held then is unknown
        members = found.get("elem", [])
        return tuple(_key(fields, m) for m in members)

    # -- statements ----------------------------------------------------------------------

    def _statement(self, name: str, value: Any) -> Action:
        kind = _VERDICTS.get(name)
        if kind in ("jump", "goto"):
            return Verdict(kind, str((value or {}).get("target", "")))
        if kind is not None:
            return Verdict(kind)
        if name == "dnat":
            return self._dnat(value or {})
        if name == "redirect":
            try:
                port = _port_interval((value or {}).get("port"))
            except _Unreadable:
                return Opaque("a redirect to an expression")
            text = f":{_interval_text(port)}" if port else "(local address)"
            return Nat(Target(None, port, f"redirect {text}"))
        if name == "vmap":
            return self._vmap(value or {})
        return Opaque(f"a `{name}` statement")

    def _dnat(self, value: JsonObject) -> Action:
        addr = value.get("addr")
        try:
            if isinstance(addr, dict) and "map" in addr:
                return self._nat_map(addr["map"])
            if addr is None:
                raise _Unreadable()
            address = _address_value(addr)
            port = _port_interval(value.get("port"))
        except _Unreadable:
            return Opaque("a dnat to an expression")
        return Nat(Target(address, port, _target_text(addr, value.get("port"))))

    def _nat_map(self, mapping: JsonObject) -> Action:
        try:
            fields, _proto = _fields(mapping.get("key"))
            if "opaque" in fields:
                raise _Unreadable()
            data = mapping.get("data")
            if isinstance(data, str) and data.startswith("@"):
                found = self.sets.get((self.family, self.table, data[1:]))
                if found is None:
                    raise _Unreadable()
                if "dynamic" in found.get("flags", []) or "timeout" in found.get("flags", []):
                    return NatMap(fields, None)
                pairs = found.get("elem", [])
            elif isinstance(data, dict) and "set" in data:
                pairs = data["set"]
            else:
                raise _Unreadable()
            entries = tuple((_key(fields, k), _map_target(v)) for k, v in _pairs(pairs))
        except _Unreadable:
            return Opaque("a dnat map ctfix cannot read")
        return NatMap(fields, entries)

    def _vmap(self, value: JsonObject) -> Action:
        try:
            fields, _proto = _fields(value.get("key"))
            data = value.get("data")
            if isinstance(data, str) and data.startswith("@"):
                found = self.sets.get((self.family, self.table, data[1:]))
                if found is None:
                    raise _Unreadable()
                pairs = found.get("elem", [])
            elif isinstance(data, dict) and "set" in data:
                pairs = data["set"]
            else:
                raise _Unreadable()
            if "random" in fields:
                # numgen: any entry may be taken (and, conservatively, none).
                anyone: Key = ("*",)
                picks = tuple((anyone, _verdict(v)) for _k, v in _pairs(pairs))
                return VerdictMap(("random",), picks)
            if "opaque" in fields:
                raise _Unreadable()
            entries = tuple((_key(fields, k), _verdict(v)) for k, v in _pairs(pairs))
            return VerdictMap(fields, entries)
        except _Unreadable:
            return Opaque("a verdict map ctfix cannot read")


# -- iptables-nft's xt expressions, from nft's translation in the rule text ----------------

_XT_DNAT = re.compile(r"\bdnat (?:ip6? )?to (\S+)")
_XT_REDIRECT = re.compile(r"\bredirect(?: to :(\d+(?:-\d+)?))?")
_XT_FIB_TYPE = re.compile(r"\bfib daddr type (!= )?(\w+)\b")


def _xt_target(name: str, text: str | None) -> Action:
    from ctfix.core.nat.legacy import dnat_target, port_range

    if name == "DNAT" and text and (found := _XT_DNAT.search(text)):
        target = dnat_target(found.group(1))
        if target is not None:
            return Nat(target)
    if name == "REDIRECT" and text and (found := _XT_REDIRECT.search(text)):
        ports = port_range(found.group(1)) if found.group(1) else None
        return Nat(Target(None, ports, found.group(0)))
    if name in ("MARK", "CONNMARK", "LOG", "NFLOG", "TRACE"):
        return Verdict("continue")
    return Opaque(f"an xt target {name}")


def _xt_match(name: str, text: str | None, rule: JsonObject) -> Match:
    """`-m addrtype --dst-type T` (the rule's only xt addrtype match); else opaque."""
    xts = [e for e in rule.get("expr", []) if "xt" in e]
    if name == "addrtype" and text and len(xts) <= 2:
        found = _XT_FIB_TYPE.findall(text)
        if len(found) == 1:
            negated, kind = found[0]
            return Match(("fib-daddr-type",), ((kind,),), negated=bool(negated))
    if name == "comment":
        return Match((), ((),))  # always true
    return Match(("opaque",), None)


# -- values ---------------------------------------------------------------------------------


def _fields(left: Any) -> tuple[tuple[Field, ...], int | None]:
    """What a match's left side looks at, and the transport protocol it implies."""
    if isinstance(left, dict) and "concat" in left:
        fields: list[Field] = []
        proto = None
        for part in left["concat"]:
            more, implied = _fields(part)
            fields.extend(more)
            proto = proto if implied is None else implied
        return tuple(fields), proto
    if not isinstance(left, dict):
        return ("opaque",), None
    if "payload" in left:
        payload = left["payload"]
        protocol, name = payload.get("protocol"), payload.get("field")
        if protocol in ("ip", "ip6") and name in ("saddr", "daddr"):
            return (name,), None
        if (protocol, name) == ("ip", "protocol"):  # iptables-nft's `-p udp`, say
            return ("l4proto",), None
        if name in ("sport", "dport") and (protocol in _PROTOCOLS or protocol == "th"):
            return (name,), _PROTOCOLS.get(protocol)
        return ("opaque",), None
    if "meta" in left:
        key = left["meta"].get("key")
        if key == "l4proto":
            return ("l4proto",), None
        if key == "iifname":
            return ("iifname",), None
        return ("opaque",), None
    if "fib" in left:
        fib = left["fib"]
        if fib.get("result") == "type" and fib.get("flags") == ["daddr"]:
            return ("fib-daddr-type",), None
        return ("opaque",), None
    if "ct" in left and left["ct"].get("key") == "state" and "dir" not in left["ct"]:
        return ("ct-state",), None
    if "numgen" in left and left["numgen"].get("mode") == "random":
        return ("random",), None
    return ("opaque",), None


def _unwrap(member: Any) -> Any:
    """A set element as written, without `{"elem": {"val": ..., "timeout": ...}}`."""
    if isinstance(member, dict) and "elem" in member:
        return member["elem"].get("val")
    return member


def _pairs(pairs: Any) -> list[tuple[Any, Any]]:
    if not isinstance(pairs, list):
        raise _Unreadable()
    out = []
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise _Unreadable()
        out.append((_unwrap(pair[0]), pair[1]))
    return out


def _key(fields: tuple[Field, ...], member: Any) -> Key:
    member = _unwrap(member)
    if len(fields) > 1:
        if not isinstance(member, dict) or "concat" not in member:
            raise _Unreadable()
        parts = member["concat"]
        if len(parts) != len(fields):
            raise _Unreadable()
        return tuple(_elem(f, p) for f, p in zip(fields, parts, strict=True))
    return (_elem(fields[0], member),)


def _elem(name: Field, value: Any) -> Elem:
    value = _unwrap(value)
    try:
        if name in _ADDRESS_FIELDS:
            return _address_value(value)
        if name in _PORT_FIELDS:
            found = _port_interval(value)
            if found is None:
                raise _Unreadable()
            return found
        if name == "l4proto":
            number = _PROTOCOLS.get(value) if isinstance(value, str) else value
            if not isinstance(number, int):
                raise _Unreadable()
            return (number, number)
    except ValueError:
        raise _Unreadable() from None
    if isinstance(value, str):
        return value
    raise _Unreadable()


def _address_value(value: Any) -> tuple[int, int]:
    try:
        if isinstance(value, str):
            return network_interval(value) if "/" in value else address_interval(value)
        if isinstance(value, dict) and "prefix" in value:
            prefix = value["prefix"]
            return network_interval(f"{prefix['addr']}/{prefix['len']}")
        if isinstance(value, dict) and "range" in value:
            low, high = value["range"]
            return address_interval(str(low), str(high))
    except (ValueError, KeyError, TypeError):
        raise _Unreadable() from None
    raise _Unreadable()


def _port_interval(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise _Unreadable()
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str) and value.isdigit():
        return (int(value), int(value))
    if isinstance(value, dict) and "range" in value:
        low, high = value["range"]
        if isinstance(low, int) and isinstance(high, int):
            return (low, high)
    raise _Unreadable()


def _map_target(value: Any) -> Target:
    """A dnat map's value: an address, or `address . port`."""
    if isinstance(value, dict) and "concat" in value:
        addr, port = value["concat"]
        return Target(_address_value(addr), _port_interval(port), _target_text(addr, port))
    return Target(_address_value(value), None, _target_text(value, None))


def _verdict(value: Any) -> Verdict:
    if isinstance(value, dict) and len(value) == 1:
        name, detail = next(iter(value.items()))
        kind = _VERDICTS.get(name)
        if kind in ("jump", "goto"):
            return Verdict(kind, str((detail or {}).get("target", "")))
        if kind is not None:
            return Verdict(kind)
    raise _Unreadable()


def _interval_text(interval: tuple[int, int]) -> str:
    return str(interval[0]) if interval[0] == interval[1] else f"{interval[0]}-{interval[1]}"


def _target_text(addr: Any, port: Any) -> str:
    if isinstance(addr, dict) and "range" in addr:
        where = f"{addr['range'][0]}-{addr['range'][1]}"
    elif isinstance(addr, dict) and "prefix" in addr:
        where = f"{addr['prefix']['addr']}/{addr['prefix']['len']}"
    else:
        where = str(addr)
    try:
        ports = _port_interval(port)
    except _Unreadable:
        ports = None
    if ports is None:
        return where
    try:
        if ipaddress.ip_address(where).version == 6:
            where = f"[{where}]"
    except ValueError:
        pass
    return f"{where}:{_interval_text(ports)}"
