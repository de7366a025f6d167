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
from ctfix.errors import CtfixError, PrivilegeError
from ctfix.platform.remedy import AlreadyThere
from ctfix.platform.remedy.marks import Marked

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
# Ours: protocol 199 in the port's table (RT_TABLE_BASE + port). Nothing else: a
# recorded step pointing elsewhere is refused, and removal matches the protocol.


def _port_of(table: Any) -> int | None:
    if isinstance(table, int) and RT_TABLE_BASE < table <= RT_TABLE_BASE + 65535:
        return table - RT_TABLE_BASE
    return None


def _marks_wrong(what: str, table: int, protocol: int, port: int) -> str | None:
    if table != table_id(port) or protocol != RT_PROTO:
        return (
            f"{what} (table {table}, protocol {protocol}) is not ctfix's for port {port} "
            f"(table {table_id(port)}, protocol {RT_PROTO})"
        )
    return None


def route_foreign(spec: RouteSpec, port: int, made: Mapping[str, Any]) -> str | None:
    del made
    return _marks_wrong(f"route {spec.network}", spec.table, spec.protocol, port)


def rule_foreign(spec: RuleSpec, port: int, made: Mapping[str, Any]) -> str | None:
    del made
    if spec.port != port:
        return f"the rule for UDP port {spec.port} is not ctfix's rule for port {port}"
    return _marks_wrong(f"{spec.family} rule {spec.priority}", spec.table, spec.protocol, port)


def _marked_rules() -> list[tuple[int, RuleSpec]]:
    found = []
    with _iproute() as ipr:
        for family, af in _AF.items():
            for rule in ipr.get_rules(family=af):
                port = _port_of(rule.get_attr("FRA_TABLE"))
                if (
                    port is None
                    or rule.get("protocol") != RT_PROTO
                    or rule.get("ip_proto") != socket.IPPROTO_UDP
                    or rule.get("sport_range") != f"{port}:{port}"
                ):
                    continue
                found.append((port, RuleSpec(family, port, table_id(port), rule.get("priority"))))
    return found


def _marked_routes() -> list[tuple[int, RouteSpec]]:
    found = []
    with _iproute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for family, af in _AF.items():
            for route in ipr.route("dump", family=af):
                port = _port_of(route.get_attr("RTA_TABLE"))
                dst = route.get("dst")
                if port is None or route.get("proto") != RT_PROTO or not dst:
                    continue
                if not route.get("prefsrc"):  # not the shape ctfix makes
                    continue
                network = f"{dst}/{route['dst_len']}"
                iface = str(names.get(route.get("oif"), ""))
                source = str(route.get("prefsrc") or "")
                found.append((port, RouteSpec(family, network, iface, source, table_id(port))))
    return found


def unrecorded(recorded: Sequence[tuple[int, Spec]]) -> list[Marked]:
    rules = {(p, s) for p, s in recorded if isinstance(s, RuleSpec)}
    routes = {(p, s.family, s.network, s.source) for p, s in recorded if isinstance(s, RouteSpec)}
    found = []
    for port, rule in _marked_rules():
        if (port, rule) not in rules:
            found.append(Marked(
                port, "rule",
                f"{rule.family} rule {rule.priority}: ipproto udp sport {port} lookup {rule.table}",
                (rule.family, str(rule.priority)),
            ))
    for port, route in _marked_routes():
        if (port, route.family, route.network, route.source) not in routes:
            found.append(Marked(
                port, "route",
                f"route {route.network} dev {route.interface} src {route.source} in table "
                f"{route.table}",
                (route.family, route.network, route.interface, route.source),
            ))
    return found


def remove_marked(marked: Marked) -> bool:
    port = marked.port
    family: Family = "ipv6" if marked.key[0] == "ipv6" else "ipv4"
    if marked.kind == "rule":
        _family, priority = marked.key
        return remove_rule(RuleSpec(family, port, table_id(port), int(priority)))
    _family, network, interface, source = marked.key
    return remove_route(RouteSpec(family, network, interface, source, table_id(port)))
