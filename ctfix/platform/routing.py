"""Local addresses, routes, policy rules, and the kernel's source choice for a reply.

Know before changing: `reply_source()` must ask the kernel exactly what it asks
itself when a wildcard UDP socket calls sendto(): destination = the client,
no source, ipproto udp, sport = the service port (and the socket owner's uid), i.e.
`ip route get CLIENT ipproto udp sport PORT uid UID`. Leaving out ipproto/sport makes
policy rules on the port (`ip rule add ipproto udp sport P ...`) invisible and the
prediction wrong. Everything here reads the calling thread's network namespace.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from ctfix.core.model import Family
from ctfix.core.snapshot import AddressScope, LocalAddress, PolicyRule, Route, RouteChoice
from ctfix.platform import nlsock

RTM_GETADDR = 22
RTM_GETROUTE = 26
RTM_GETRULE = 34

IFA_ADDRESS = 1
IFA_LOCAL = 2

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_MULTIPATH = 9
RTA_MARK = 16
RTA_TABLE = 15
RTA_SRC = 2
RTA_UID = 25
RTA_IP_PROTO = 27
RTA_SPORT = 28
RTA_DPORT = 29

FRA_DST = 1
FRA_SRC = 2
FRA_IIFNAME = 3
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15
FRA_FWMASK = 16
FRA_OIFNAME = 17
FRA_UID_RANGE = 20
FRA_IP_PROTO = 22
FRA_SPORT_RANGE = 23
FRA_DPORT_RANGE = 24

FR_ACT_TO_TBL = 1
FR_ACT_GOTO = 2
FR_ACT_NOP = 3
FR_ACT_BLACKHOLE = 6
FR_ACT_UNREACHABLE = 7
FR_ACT_PROHIBIT = 8

RTM_F_LOOKUP_TABLE = 0x1000

RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BROADCAST = 3

_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")
_RTNEXTHOP = struct.Struct("=HBBi")  # rtnh_len, rtnh_flags, rtnh_hops, rtnh_ifindex

_FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
_FAMILY_NAMES: dict[int, Family] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
#: rtm_scope -> its name; a number /etc/iproute2/rt_scopes may name (none of these) is
#: no address remote clients use: "nowhere" for ctfix.
_SCOPES: dict[int, AddressScope] = {0: "global", 200: "site", 253: "link", 254: "host"}
_TABLE_NAMES = {253: "default", 254: "main", 255: "local"}
_PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "ipv6-icmp"}


def _ntop(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw)


def _interfaces() -> dict[int, str]:
    # if_nameindex() asks through a socket of this thread's namespace.
    return {index: name for index, name in socket.if_nameindex()}


def _interface_name(index: int) -> str | None:
    # One ioctl (scan asks once per port and network), not a listing of them all.
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


def local_addresses() -> list[LocalAddress]:
    """Every address on every interface (`ip addr`), IPv4 and IPv6."""
    names = _interfaces()
    found: list[LocalAddress] = []
    payload = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for _kind, body in nlsock.request(
        nlsock.NETLINK_ROUTE, RTM_GETADDR, payload, dump=True, what="listing addresses"
    ):
        family, prefixlen, _flags, scope, index = _IFADDRMSG.unpack_from(body)
        if family not in _FAMILY_NAMES:
            continue
        attrs = nlsock.attributes(body, _IFADDRMSG.size, len(body))
        # IFA_LOCAL is the local end on point-to-point links; IFA_ADDRESS otherwise.
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw is None:
            continue
        found.append(
            LocalAddress(
                interface=names.get(index, str(index)),
                address=_ntop(family, raw),
                prefixlen=prefixlen,
                family=_FAMILY_NAMES[family],
                scope=_SCOPES.get(scope, "nowhere"),
            )
        )
    return found


def _u32(raw: bytes | None) -> int | None:
    return struct.unpack("=I", raw[:4])[0] if raw else None


_ROUTE_KINDS = {RTN_UNICAST: "unicast", 6: "blackhole", 7: "unreachable", 8: "prohibit"}


def _nexthops(
    family: int, attrs: dict[int, bytes], names: dict[int, str]
) -> list[tuple[str | None, str | None]]:
    """(gateway, interface) of each next hop: one, or each of a multipath route."""
    raw = attrs.get(RTA_MULTIPATH)
    if raw is None:
        oif = _u32(attrs.get(RTA_OIF))
        gateway = attrs.get(RTA_GATEWAY)
        return [
            (
                _ntop(family, gateway) if gateway else None,
                names.get(oif, str(oif)) if oif is not None else None,
            )
        ]
    hops: list[tuple[str | None, str | None]] = []
    offset = 0
    while offset + _RTNEXTHOP.size <= len(raw):
        length, _flags, _hops, ifindex = _RTNEXTHOP.unpack_from(raw, offset)
        if length < _RTNEXTHOP.size:
            break
        nested = nlsock.attributes(raw, offset + _RTNEXTHOP.size, offset + length)
        gateway = nested.get(RTA_GATEWAY)
        hops.append(
            (_ntop(family, gateway) if gateway else None, names.get(ifindex, str(ifindex)))
        )
        offset += (length + 3) & ~3
    return hops


def route_table() -> list[Route]:
    """All routes of all tables (local, broadcast and multicast ones left out), IPv4
    and IPv6: `ip route show table all` as values, one per next hop."""
    names = _interfaces()
    found: list[Route] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        payload = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        for _kind, body in nlsock.request(
            nlsock.NETLINK_ROUTE, RTM_GETROUTE, payload, dump=True, what="listing routes"
        ):
            fam, dst_len, _src_len, _tos, table8, proto, scope, rtype, _flags = (
                _RTMSG.unpack_from(body)
            )
            attrs = nlsock.attributes(body, _RTMSG.size, len(body))
            table = _u32(attrs.get(RTA_TABLE)) or table8
            if table == 255 or rtype not in _ROUTE_KINDS:
                continue  # local/broadcast routes: noise for this purpose
            if fam == socket.AF_INET6 and attrs.get(RTA_DST, b"")[:2] == b"\xff\x00":
                continue
            dst = attrs.get(RTA_DST)
            any_address = "0.0.0.0" if fam == socket.AF_INET else "::"
            destination = f"{_ntop(fam, dst) if dst else any_address}/{dst_len}"
            metric = _u32(attrs.get(RTA_PRIORITY)) or 0
            prefsrc = attrs.get(RTA_PREFSRC)
            for gateway, interface in _nexthops(fam, attrs, names):
                words = [f"{_ntop(fam, dst)}/{dst_len}" if dst else "default"]
                if rtype != RTN_UNICAST:
                    words.insert(0, _ROUTE_KINDS[rtype])
                if gateway:
                    words += ["via", gateway]
                if interface is not None:
                    words += ["dev", interface]
                if table != 254:
                    words += ["table", _TABLE_NAMES.get(table, str(table))]
                if scope == 253:
                    words += ["scope", "link"]
                if prefsrc:
                    words += ["src", _ntop(fam, prefsrc)]
                if metric:
                    words += ["metric", str(metric)]
                found.append(
                    Route(
                        family=_FAMILY_NAMES[fam],
                        destination=destination,
                        interface=interface,
                        gateway=gateway,
                        table=table,
                        metric=metric,
                        kind=_ROUTE_KINDS[rtype],
                        protocol=proto,
                        text=" ".join(words),
                    )
                )
    return found


def routes() -> list[str]:
    """All routes of all tables, one `ip route show table all`-like line each."""
    return [route.text for route in route_table()]


def _port_range(raw: bytes | None) -> tuple[int, int] | None:
    if not raw:
        return None
    low, high = struct.unpack("=HH", raw[:4])
    return (low, high)


def policy_rules() -> list[PolicyRule]:
    """`ip rule show` and `ip -6 rule show`, with the port-related selectors parsed."""
    rules: list[PolicyRule] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        payload = _FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        for _kind, body in nlsock.request(
            nlsock.NETLINK_ROUTE, RTM_GETRULE, payload, dump=True, what="listing policy rules"
        ):
            fam, dst_len, src_len, _tos, table8, _r1, _r2, action, flags = (
                _FIB_RULE_HDR.unpack_from(body)
            )
            if fam not in _FAMILY_NAMES:
                continue
            attrs = nlsock.attributes(body, _FIB_RULE_HDR.size, len(body))
            priority = _u32(attrs.get(FRA_PRIORITY)) or 0
            table = _u32(attrs.get(FRA_TABLE)) or table8
            words = [f"{priority}:"]
            if flags & 0x2:  # FIB_RULE_INVERT
                words.append("not")
            src = attrs.get(FRA_SRC)
            words += ["from", f"{_ntop(fam, src)}/{src_len}" if src else "all"]
            if FRA_DST in attrs:
                words += ["to", f"{_ntop(fam, attrs[FRA_DST])}/{dst_len}"]
            mark = _u32(attrs.get(FRA_FWMARK))
            mask = _u32(attrs.get(FRA_FWMASK))
            if mark:
                shown_mask = f"/{hex(mask)}" if mask not in (None, 0xFFFFFFFF) else ""
                words += ["fwmark", hex(mark) + shown_mask]
            for attr, label in ((FRA_IIFNAME, "iif"), (FRA_OIFNAME, "oif")):
                if attr in attrs:
                    words += [label, attrs[attr].rstrip(b"\0").decode(errors="replace")]
            if FRA_UID_RANGE in attrs:
                low, high = struct.unpack("=II", attrs[FRA_UID_RANGE][:8])
                words += ["uidrange", f"{low}-{high}"]
            ipproto = attrs[FRA_IP_PROTO][0] if FRA_IP_PROTO in attrs else None
            if ipproto is not None:
                words += ["ipproto", _PROTO_NAMES.get(ipproto, str(ipproto))]
            sport = _port_range(attrs.get(FRA_SPORT_RANGE))
            dport = _port_range(attrs.get(FRA_DPORT_RANGE))
            for label, rng in (("sport", sport), ("dport", dport)):
                if rng is not None:
                    words += [label, str(rng[0]) if rng[0] == rng[1] else f"{rng[0]}-{rng[1]}"]
            if action == FR_ACT_TO_TBL:
                words += ["lookup", _TABLE_NAMES.get(table, str(table))]
            else:
                words.append(
                    {
                        FR_ACT_GOTO: "goto",
                        FR_ACT_NOP: "nop",
                        FR_ACT_BLACKHOLE: "blackhole",
                        FR_ACT_UNREACHABLE: "unreachable",
                        FR_ACT_PROHIBIT: "prohibit",
                    }.get(action, f"action {action}")
                )
            rules.append(
                PolicyRule(
                    family=_FAMILY_NAMES[fam],
                    priority=priority,
                    text=" ".join(words),
                    table=table if action == FR_ACT_TO_TBL else None,
                    ipproto=ipproto,
                    sport=sport,
                    dport=dport,
                    fwmark=mark or None,
                    fwmask=mask if mark else None,
                )
            )
    return rules


def reply_source(
    destination: str,
    sport: int,
    *,
    dport: int = 0,
    uid: int | None = None,
    mark: int | None = None,
    source: str | None = None,
) -> RouteChoice:
    """The source the kernel picks for a UDP datagram from port sport to destination,
    and the interface and next hop it leaves by.

    Same as `ip route get DEST ipproto udp sport SPORT [dport DPORT] [uid UID]
    [mark M] [from SOURCE]`: `mark` is what a netfilter rule that marks the reply
    makes the kernel look up again; `source`, what a reply that already has its
    source (a bound or IP_PKTINFO server) gets.
    """
    ip = ipaddress.ip_address(destination)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    # RTM_F_LOOKUP_TABLE: report the table the lookup used, not always "main".
    payload = _RTMSG.pack(family, ip.max_prefixlen, 0, 0, 0, 0, 0, 0, RTM_F_LOOKUP_TABLE)
    payload += nlsock.attribute(RTA_DST, ip.packed)
    payload += nlsock.attribute(RTA_IP_PROTO, bytes([socket.IPPROTO_UDP]))
    payload += nlsock.attribute(RTA_SPORT, struct.pack("!H", sport))
    if dport:
        payload += nlsock.attribute(RTA_DPORT, struct.pack("!H", dport))
    if uid is not None:
        payload += nlsock.attribute(RTA_UID, struct.pack("=I", uid))
    if mark is not None:
        payload += nlsock.attribute(RTA_MARK, struct.pack("=I", mark))
    if source is not None:
        given = ipaddress.ip_address(source)
        if given.version != ip.version:
            return RouteChoice(
                destination, None, error="source of another family", mark=mark,
                from_address=source,
            )
        payload = payload[:2] + bytes([given.max_prefixlen]) + payload[3:]  # rtm_src_len
        payload += nlsock.attribute(RTA_SRC, given.packed)
    try:
        answers = list(
            nlsock.request(
                nlsock.NETLINK_ROUTE,
                RTM_GETROUTE,
                payload,
                dump=False,
                what=f"route lookup for {destination}",
            )
        )
    except nlsock.NetlinkError as err:
        return RouteChoice(
            destination,
            None,
            error=err.message.split(": ", 1)[-1],
            mark=mark,
            from_address=source,
        )
    for _kind, body in answers:
        attrs = nlsock.attributes(body, _RTMSG.size, len(body))
        table8 = _RTMSG.unpack_from(body)[4]
        oif = _u32(attrs.get(RTA_OIF))
        # With a source given, the answer carries it as RTA_SRC, not RTA_PREFSRC.
        src = attrs.get(RTA_PREFSRC) or (attrs.get(RTA_SRC) if source is not None else None)
        gateway = attrs.get(RTA_GATEWAY)
        return RouteChoice(
            destination,
            _ntop(family, src) if src else None,
            interface=_interface_name(oif) if oif is not None else None,
            table=_u32(attrs.get(RTA_TABLE)) or table8,
            gateway=_ntop(family, gateway) if gateway else None,
            mark=mark,
            from_address=source,
        )
    return RouteChoice(destination, None, error="no answer", mark=mark, from_address=source)


__all__ = ["local_addresses", "policy_rules", "reply_source", "route_table", "routes"]
