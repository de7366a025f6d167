"""Policy routing steps (routes in ctfix's table, `ip rule`s) through pyroute2.

Know before changing: everything made here carries protocol 199 (`proto 199`), and
removal matches on it, so a route or rule somebody else added to the same table or
priority is never touched. Routes may be default routes (0.0.0.0/0, ::/0) and have a
gateway; rules may carry a fwmark (a snat-zone reroute): both are part of what makes
an object the one a spec describes. Works in the calling thread's namespace.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from ctfix.core.model import Family
from ctfix.core.plan import RT_PROTO, RT_TABLE_BASE, RouteSpec, RuleSpec, Spec, table_id
from ctfix.core.plan.specs import REROUTE_STEP, REROUTE_UPLINKS
from ctfix.errors import CtfixError, PrivilegeError
from ctfix.platform.remedy.marks import AlreadyThere, Marked

_AF: dict[Family, int] = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
_ABSENT = (errno.ENOENT, errno.ESRCH, errno.ENODEV)


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _netlink_error(err: Exception) -> int | None:
    code = getattr(err, "code", None)
    return code if isinstance(code, int) else None


def _raise(err: Exception, what: str) -> None:
    code = _netlink_error(err)
    if code == errno.EPERM:
        raise PrivilegeError(what) from None
    if code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
        raise CtfixError(f"{what}: the kernel does not support it ({err})") from None
    raise CtfixError(f"{what} failed: {err}") from None


def _route_args(spec: RouteSpec, oif: int | None) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": _AF[spec.family],
        "dst": spec.network,
        "prefsrc": spec.source,
        "table": spec.table,
        "proto": spec.protocol,
    }
    if oif is not None:
        args["oif"] = oif
    if spec.gateway is not None:
        args["gateway"] = spec.gateway
    return args


def _ifindex(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def create_route(spec: RouteSpec) -> None:
    via = f" via {spec.gateway}" if spec.gateway else ""
    what = f"adding route {spec.network}{via} src {spec.source} to table {spec.table}"
    with _iproute() as ipr:
        oif = _ifindex(ipr, spec.interface)
        if oif is None:
            raise CtfixError(f"{what}: interface {spec.interface} does not exist")
        try:
            ipr.route("add", **_route_args(spec, oif))
        except Exception as err:
            if _netlink_error(err) == errno.EEXIST:
                raise AlreadyThere(
                    f"{what}: table {spec.table} already has a route to {spec.network}",
                    f"inspect `ip route show table {spec.table}`",
                ) from None
            _raise(err, what)


def _routes_to(spec: RouteSpec) -> list[Any]:
    """The routes to spec.network in spec.table, whoever made them."""
    found = []
    with _iproute() as ipr:
        for route in ipr.route("dump", family=_AF[spec.family], table=spec.table):
            dst = route.get("dst") or ("::" if spec.family == "ipv6" else "0.0.0.0")
            network = f"{dst}/{route['dst_len']}"
            if network == spec.network and route.get_attr("RTA_TABLE") == spec.table:
                found.append(route)
    return found


def route_present(spec: RouteSpec) -> bool:
    return any(
        route.get("proto") == spec.protocol
        and route.get("prefsrc") == spec.source
        and route.get("gateway") == spec.gateway
        for route in _routes_to(spec)
    )


def route_clash(spec: RouteSpec) -> str | None:
    """Any route to the network in the table takes the slot (the kernel says EEXIST)."""
    if _routes_to(spec):
        return f"table {spec.table} already has a route to {spec.network}"
    return None


def remove_route(spec: RouteSpec) -> bool:
    """Delete the route if it is there; False when it was not."""
    if not route_present(spec):
        return False
    with _iproute() as ipr:
        try:
            ipr.route("del", **_route_args(spec, None))
        except Exception as err:
            if _netlink_error(err) in _ABSENT:
                return False
            _raise(err, f"removing route {spec.network} from table {spec.table}")
    return True


def _rule_args(spec: RuleSpec) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": _AF[spec.family],
        "priority": spec.priority,
        "table": spec.table,
        "ip_proto": socket.IPPROTO_UDP,
        "sport_range": f"{spec.port}:{spec.port}",
        "protocol": spec.protocol,
    }
    if spec.fwmark is not None:
        args["fwmark"] = spec.fwmark
    return args


def rule_present(spec: RuleSpec) -> bool:
    with _iproute() as ipr:
        for rule in ipr.get_rules(family=_AF[spec.family]):
            if (
                rule.get("priority") == spec.priority
                and rule.get_attr("FRA_TABLE") == spec.table
                and rule.get("protocol") == spec.protocol
                and rule.get("ip_proto") == socket.IPPROTO_UDP
                and rule.get("sport_range") == f"{spec.port}:{spec.port}"
                and rule.get_attr("FRA_FWMARK") == spec.fwmark
            ):
                return True
    return False


def create_rule(spec: RuleSpec) -> None:
    what = f"adding {spec.family} rule `{spec.words}`"
    if rule_present(spec):
        raise AlreadyThere(f"{what}: it exists already", "see `ip rule` and `ctfix fix --status`")
    with _iproute() as ipr:
        try:
            ipr.rule("add", **_rule_args(spec))
        except Exception as err:
            _raise(err, what)


def remove_rule(spec: RuleSpec) -> bool:
    if not rule_present(spec):
        return False
    with _iproute() as ipr:
        try:
            ipr.rule("del", **_rule_args(spec))
        except Exception as err:
            if _netlink_error(err) in _ABSENT:
                return False
            _raise(err, f"removing the {spec.family} rule for port {spec.port}")
    return True


# -- ctfix's marks (see ctfix/platform/remedy/marks.py) ----------------------------------
# Ours: protocol 199 in one of the port's tables: RT_TABLE_BASE + port, or a reroute
# table RT_TABLE_BASE + n * REROUTE_STEP + port (n < REROUTE_UPLINKS), the port in the
# low 16 bits (core/plan/specs.py). Nothing else: a recorded step pointing elsewhere is
# refused, and removal matches the protocol.


def _port_of(table: Any) -> int | None:
    """The port whose fix owns this table id, or None when ctfix never makes it."""
    if not isinstance(table, int):
        return None
    offset = table - RT_TABLE_BASE
    if not 0 <= offset < REROUTE_UPLINKS * REROUTE_STEP:
        return None
    port = offset % REROUTE_STEP
    return port or None


def _marks_wrong(what: str, table: int, protocol: int, port: int) -> str | None:
    if _port_of(table) != port or protocol != RT_PROTO:
        return (
            f"{what} (table {table}, protocol {protocol}) is not ctfix's for port {port} "
            f"(a table {table_id(port)} + n * {REROUTE_STEP:#x}, protocol {RT_PROTO})"
        )
    return None


def route_foreign(spec: RouteSpec, port: int, made: Mapping[str, Any]) -> str | None:
    del made
    return _marks_wrong(f"route {spec.network}", spec.table, spec.protocol, port)


def rule_foreign(spec: RuleSpec, port: int, made: Mapping[str, Any]) -> str | None:
    del made
    if spec.port != port:
        return f"the rule for UDP port {spec.port} is not ctfix's rule for port {port}"
    if spec.fwmark is not None and _port_of(spec.fwmark) != port:
        return f"the rule's fwmark {spec.fwmark:#x} is not one of ctfix's for port {port}"
    return _marks_wrong(f"{spec.family} rule {spec.priority}", spec.table, spec.protocol, port)


def _marked_rules() -> list[tuple[int, RuleSpec]]:
    found = []
    with _iproute() as ipr:
        for family, af in _AF.items():
            for rule in ipr.get_rules(family=af):
                table = rule.get_attr("FRA_TABLE")
                port = _port_of(table)
                if (
                    port is None
                    or rule.get("protocol") != RT_PROTO
                    or rule.get("ip_proto") != socket.IPPROTO_UDP
                    or rule.get("sport_range") != f"{port}:{port}"
                ):
                    continue
                fwmark = rule.get_attr("FRA_FWMARK")
                found.append((port, RuleSpec(
                    family, port, table, rule.get("priority"),
                    fwmark=int(fwmark) if fwmark is not None else None,
                )))
    return found


def _marked_routes() -> list[tuple[int, RouteSpec]]:
    found = []
    with _iproute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for family, af in _AF.items():
            for route in ipr.route("dump", family=af):
                table = route.get_attr("RTA_TABLE")
                port = _port_of(table)
                if port is None or route.get("proto") != RT_PROTO:
                    continue
                if not route.get("prefsrc"):  # not the shape ctfix makes
                    continue
                dst = route.get("dst") or ("::" if family == "ipv6" else "0.0.0.0")
                network = f"{dst}/{route['dst_len']}"
                iface = str(names.get(route.get("oif"), ""))
                source = str(route.get("prefsrc") or "")
                gateway = route.get("gateway")
                found.append((port, RouteSpec(
                    family, network, iface, source, table,
                    gateway=str(gateway) if gateway else None,
                )))
    return found


def _rule_key(rule: RuleSpec) -> tuple[str, ...]:
    return (rule.family, str(rule.priority), str(rule.table), str(rule.fwmark or ""))


def _route_key(route: RouteSpec) -> tuple[str, ...]:
    return (
        route.family, route.network, route.interface, route.source, str(route.table),
        route.gateway or "",
    )


def unrecorded(recorded: Sequence[tuple[int, Spec]]) -> list[Marked]:
    rules = {(p, _rule_key(s)) for p, s in recorded if isinstance(s, RuleSpec)}
    routes = {(p, _route_key(s)) for p, s in recorded if isinstance(s, RouteSpec)}
    found = []
    for port, rule in _marked_rules():
        if (port, _rule_key(rule)) not in rules:
            mark = f"fwmark {rule.fwmark:#x} " if rule.fwmark is not None else ""
            found.append(Marked(
                port, "rule",
                f"{rule.family} rule {rule.priority}: {mark}ipproto udp sport {port} lookup "
                f"{rule.table}",
                _rule_key(rule),
            ))
    for port, route in _marked_routes():
        if (port, _route_key(route)) not in routes:
            via = f" via {route.gateway}" if route.gateway else ""
            found.append(Marked(
                port, "route",
                f"route {route.network}{via} dev {route.interface} src {route.source} in "
                f"table {route.table}",
                _route_key(route),
            ))
    return found


def remove_marked(marked: Marked) -> bool:
    port = marked.port
    family: Family = "ipv6" if marked.key[0] == "ipv6" else "ipv4"
    if marked.kind == "rule":
        _family, priority, table, fwmark = marked.key
        return remove_rule(RuleSpec(
            family, port, int(table), int(priority), fwmark=int(fwmark) if fwmark else None
        ))
    _family, network, interface, source, table, gateway = marked.key
    return remove_route(RouteSpec(
        family, network, interface, source, int(table), gateway=gateway or None
    ))
