"""ctnetlink bytes -> small immutable values (`CtTuple`, `CtEntry`, `CtEvent`). Pure.

This is the hot path of `ctfix watch` (one call per conntrack event, >100k/s) and of
`dump()`. It never raises on bad input: a message it cannot understand is skipped
and counted (`Batch.malformed`).

One module on purpose (over 500 lines): the fixed layouts serve three readers (the
fast path, the ports probe that lets `ctfix scan` skip entries unread, the general
walk) and must change together.

Know before changing:
- The attribute order of a ctnetlink message is fixed for a kernel and family, so the
  common layouts (IPv4 and IPv6 tuples, UDP/TCP-style ports) are decoded by one
  precompiled `struct.Struct` over the two tuples, with every attribute header
  checked against the expected values before the result is trusted. Anything else
  (other protocols, a different kernel's layout, damaged bytes) takes the general
  attribute walk, which gives the same values, only slower (the first ORIG and
  REPLY tuples count on both). The tests check that both paths agree on recorded
  real messages and on mutated ones (lengths that cover several messages).
- Netlink headers are in host byte order; attribute *values* (addresses, ports,
  status, timeout, mark, zone) are big-endian.
- The values are NamedTuples, not dataclasses: they are just as immutable and
  slot-free, and build in ~0.1 us instead of ~0.4 us (a frozen dataclass's
  `__init__` goes through `object.__setattr__`), which matters at kernel event rates.
"""

from __future__ import annotations

import operator
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeAlias

Buf: TypeAlias = bytes | bytearray | memoryview

# -- constants from linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h ---------------

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_MULTI = 0x2
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
MSG_CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ID = 12
CTA_ZONE = 18
CTA_TIMESTAMP = 20
CTA_FILTER = 25
CTA_TIMESTAMP_START = 1  # inside CTA_TIMESTAMP: u64 nanoseconds, wall clock

CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3

IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
IPPROTO_UDP = 17

# Event kinds (what the kernel's message type and flags say happened).
NEW = 1
UPDATE = 2
DESTROY = 3
DUMPED = 4  # an entry from a dump (GET reply), not an event


class CtTuple(NamedTuple):
    """One direction of a conntrack entry, as the kernel keeps it."""

    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    family: int


class CtEntry(NamedTuple):
    """A conntrack entry: both tuples and the attributes detection uses.

    `zone` is 0 for the default zone; `mark`, `timeout` (seconds left) and `id` are
    None when the message did not carry them. `start` is when the entry was created,
    in nanoseconds since the epoch (CTA_TIMESTAMP), only where the namespace has
    net.netfilter.nf_conntrack_timestamp on, and only in dumps and DESTROY events (the
    kernel puts no timestamp in NEW and UPDATE events).
    """

    orig: CtTuple
    reply: CtTuple
    status: int = 0
    zone: int = 0
    mark: int | None = None
    timeout: int | None = None
    id: int | None = None
    start: int | None = None

    @property
    def family(self) -> int:
        return self.orig.family

    @property
    def proto(self) -> int:
        return self.orig.proto

    @property
    def seen_reply(self) -> bool:
        return bool(self.status & IPS_SEEN_REPLY)

    @property
    def assured(self) -> bool:
        return bool(self.status & IPS_ASSURED)


class CtEvent(NamedTuple):
    """What happened (NEW, UPDATE, DESTROY or DUMPED) to which entry."""

    kind: int
    entry: CtEntry


class Batch(NamedTuple):
    """Everything decoded from one buffer returned by recv().

    `done` is True at the end of a dump (NLMSG_DONE); `error` is the errno of an
    NLMSG_ERROR message (0 = none or an ACK); `malformed` counts messages skipped.
    `usage` (only when asked, `decode(buf, usage=True)`): one CtUsage per event.
    """

    events: list[CtEvent]
    done: bool = False
    error: int = 0
    malformed: int = 0
    usage: list[CtUsage] | None = None


# -- address formatting, cached: the same few addresses recur in nearly every event ---

_ADDR_CACHE: dict[bytes, str] = {}
_ADDR_CACHE_MAX = 1 << 16


def _addr(raw: bytes) -> str:
    text = _ADDR_CACHE.get(raw)
    if text is None:
        text = socket.inet_ntop(AF_INET6 if len(raw) == 16 else AF_INET, raw)
        if len(_ADDR_CACHE) >= _ADDR_CACHE_MAX:
            _ADDR_CACHE.clear()
        _ADDR_CACHE[raw] = text
    return text


# -- the fast path: one Struct over nlmsghdr, nfgenmsg and both tuples ----------------

_HDR = struct.Struct("=IHHII")  # nlmsghdr
# NamedTuple's own __new__ checks arguments in Python; the fields are all given here.
_new_tuple = tuple.__new__
_NLA = struct.Struct("=HH")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def _tuple_format(addr_len: int, *, addresses: bool = True) -> str:
    # Read big-endian so that ports come out as ints; each attribute header (host
    # order) is read as one u32 and compared with the expected value byte-swapped.
    pad = (-addr_len) % 4
    a = (f"{addr_len}s" if addresses else "x" * addr_len) + ("x" * pad)
    return f"I I I{a} I{a} I I B3x I H2x I H2x"


def _hdr(length: int, nla_type: int) -> int:
    """An attribute header as the big-endian read of its host-order bytes gives it."""
    return int(_BE32.unpack(_NLA.pack(length, nla_type))[0])


class _Layout(NamedTuple):
    size: int  # bytes covered: nlmsghdr + nfgenmsg + both tuples
    unpack_from: Callable[[Buf, int], tuple[Any, ...]]
    skeletons: frozenset[tuple[int, ...]]  # accepted attribute headers, in order


def _layout(family: int, addr_len: int) -> _Layout:
    st = struct.Struct(">B3x " + _tuple_format(addr_len) + " " + _tuple_format(addr_len))
    alen = 4 + addr_len + ((-addr_len) % 4)
    ip_len = 4 + 2 * alen
    proto_len = 4 + 8 + 8 + 8
    tuple_len = 4 + ip_len + proto_len
    src_t, dst_t = (
        (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == AF_INET else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    )
    skeletons = set()
    for nested in (0, NLA_F_NESTED):
        one = []
        for which in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
            one += [
                _hdr(tuple_len, which | nested),
                _hdr(ip_len, CTA_TUPLE_IP | nested),
                _hdr(4 + addr_len, src_t),
                _hdr(4 + addr_len, dst_t),
                _hdr(proto_len, CTA_TUPLE_PROTO | nested),
                _hdr(5, CTA_PROTO_NUM),
                _hdr(6, CTA_PROTO_SRC_PORT),
                _hdr(6, CTA_PROTO_DST_PORT),
            ]
        skeletons.add(tuple(one))
    return _Layout(16 + st.size, st.unpack_from, frozenset(skeletons))


_V4 = _layout(AF_INET, 4)
_V6 = _layout(AF_INET6, 16)


class _PortsProbe(NamedTuple):
    """The common layout seen as one big-endian integer (for `_touches`): the bits of
    the attribute headers must equal one of `expected` under `mask`; then the three
    ports are read at fixed offsets. No address, tuple or entry is built."""

    size: int  # bytes from the nfgenmsg on: both tuples
    mask: int
    expected: frozenset[int]
    ports: struct.Struct  # orig sport, orig dport, reply sport


def _ports_probe(layout: _Layout, addr_len: int) -> _PortsProbe:
    st = struct.Struct(">B3x " + " ".join([_tuple_format(addr_len, addresses=False)] * 2))
    # values: family, then per tuple (11 each): h h h h h h num h sport h dport
    headers = (1, 2, 3, 4, 5, 6, 8, 10, 12, 13, 14, 15, 16, 17, 19, 21)

    def packed(header_values: tuple[int, ...]) -> int:
        values = [0] * 23
        for index, value in zip(headers, header_values, strict=True):
            values[index] = value
        return int.from_bytes(st.pack(*values), "big")

    mask = packed((0xFFFFFFFF,) * len(headers))
    # Byte offsets of the three ports. A tuple's format tokens: tuple, ip, src, dst,
    # proto and num headers, num, sport header, sport, dport header, dport.
    one = _tuple_format(addr_len, addresses=False).split()
    head = struct.calcsize(">B3x")
    tuple_size = struct.calcsize(">" + "".join(one))
    sport_at = head + struct.calcsize(">" + "".join(one[:8]))
    dport_at = head + struct.calcsize(">" + "".join(one[:10]))
    reply_sport_at = head + tuple_size + struct.calcsize(">" + "".join(one[:8]))
    ports = struct.Struct(
        f">{sport_at}xH{dport_at - sport_at - 2}xH{reply_sport_at - dport_at - 2}xH"
    )
    expected = frozenset(packed(skeleton) for skeleton in layout.skeletons)
    return _PortsProbe(st.size, mask, expected, ports)


_PROBE_V4 = _ports_probe(_V4, 4)
_PROBE_V6 = _ports_probe(_V6, 16)

# Positions, in the unpacked values, of the attribute headers.
# values: family, then per tuple (13 each): h h h src h dst h h num h sport h dport
_skeleton = operator.itemgetter(1, 2, 3, 5, 7, 8, 10, 12, 14, 15, 16, 18, 20, 21, 23, 25)


def _fast(buf: Buf, offset: int, msg_len: int, family: int) -> CtEntry | None:
    if family == AF_INET:
        layout = _V4
    elif family == AF_INET6:
        layout = _V6
    else:
        return None
    if msg_len < layout.size:
        return None
    v = layout.unpack_from(buf, offset + 16)
    if _skeleton(v) not in layout.skeletons:
        return None
    fam = v[0]
    cache = _ADDR_CACHE
    osrc = cache.get(v[4]) or _addr(v[4])
    odst = cache.get(v[6]) or _addr(v[6])
    rsrc = cache.get(v[17]) or _addr(v[17])
    rdst = cache.get(v[19]) or _addr(v[19])
    orig = _new_tuple(CtTuple, (osrc, odst, v[11], v[13], v[9], fam))
    reply = _new_tuple(CtTuple, (rsrc, rdst, v[24], v[26], v[22], fam))
    return _new_tuple(
        CtEntry, (orig, reply, *_scalars(buf, offset + layout.size, offset + msg_len))
    )


def _scalars(
    buf: Buf, pos: int, end: int
) -> tuple[int, int, int | None, int | None, int | None, int | None]:
    """Walk the top-level attributes after the tuples for the few scalars we keep:
    status, zone, mark, timeout, id, start."""
    status = zone = 0
    mark = timeout = ct_id = start = None
    while pos + 4 <= end:
        nla_len, nla_type = _NLA.unpack_from(buf, pos)
        if nla_len < 4 or pos + nla_len > end:
            break
        t = nla_type & NLA_TYPE_MASK
        if nla_len >= 8:
            if t == CTA_STATUS:
                status = _BE32.unpack_from(buf, pos + 4)[0]
            elif t == CTA_TIMEOUT:
                timeout = _BE32.unpack_from(buf, pos + 4)[0]
            elif t == CTA_MARK:
                mark = _BE32.unpack_from(buf, pos + 4)[0]
            elif t == CTA_ID:
                ct_id = _BE32.unpack_from(buf, pos + 4)[0]
            elif t == CTA_TIMESTAMP:
                start = _timestamp_start(buf, pos + 4, pos + nla_len)
        if t == CTA_ZONE and nla_len >= 6:
            zone = _BE16.unpack_from(buf, pos + 4)[0]
        pos += (nla_len + 3) & ~3
    return status, zone, mark, timeout, ct_id, start


def _timestamp_start(buf: Buf, pos: int, end: int) -> int | None:
    """CTA_TIMESTAMP_START inside a CTA_TIMESTAMP (dumps and DESTROY events only)."""
    for t, vs, ve in _attrs(buf, pos, end):
        if t == CTA_TIMESTAMP_START and ve - vs >= 8:
            return int(_BE64.unpack_from(buf, vs)[0]) or None
    return None


# -- the general walk -----------------------------------------------------------------


def _attrs(buf: Buf, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (type, value start, value end) of the attributes in buf[pos:end]."""
    while pos + 4 <= end:
        nla_len, nla_type = _NLA.unpack_from(buf, pos)
        if nla_len < 4 or pos + nla_len > end:
            return
        yield nla_type & NLA_TYPE_MASK, pos + 4, pos + nla_len
        pos += (nla_len + 3) & ~3


def _walk_tuple(buf: Buf, pos: int, end: int, family: int) -> CtTuple | None:
    src = dst = None
    sport = dport = 0
    proto = -1
    for t, vs, ve in _attrs(buf, pos, end):
        if t == CTA_TUPLE_IP:
            for at, avs, ave in _attrs(buf, vs, ve):
                size = ave - avs
                if at in (CTA_IP_V4_SRC, CTA_IP_V6_SRC) and size in (4, 16):
                    src = _addr(bytes(buf[avs:ave]))
                elif at in (CTA_IP_V4_DST, CTA_IP_V6_DST) and size in (4, 16):
                    dst = _addr(bytes(buf[avs:ave]))
        elif t == CTA_TUPLE_PROTO:
            for pt, pvs, pve in _attrs(buf, vs, ve):
                if pt == CTA_PROTO_NUM and pve - pvs >= 1:
                    proto = buf[pvs]
                elif pt == CTA_PROTO_SRC_PORT and pve - pvs >= 2:
                    sport = _BE16.unpack_from(buf, pvs)[0]
                elif pt == CTA_PROTO_DST_PORT and pve - pvs >= 2:
                    dport = _BE16.unpack_from(buf, pvs)[0]
    if src is None or dst is None or proto < 0:
        return None
    return CtTuple(src, dst, sport, dport, proto, family)


def _slow(buf: Buf, offset: int, msg_len: int, family: int) -> CtEntry | None:
    """The general walk. The first CTA_TUPLE_ORIG and CTA_TUPLE_REPLY count, as on the
    fast path (which reads them where the kernel puts them): a later one can only be
    damage, or the next message under a nlmsg_len that covers several."""
    end = offset + msg_len
    orig = reply = None
    seen_orig = seen_reply = False
    for t, vs, ve in _attrs(buf, offset + 20, end):
        if t == CTA_TUPLE_ORIG and not seen_orig:
            seen_orig = True
            orig = _walk_tuple(buf, vs, ve, family)
        elif t == CTA_TUPLE_REPLY and not seen_reply:
            seen_reply = True
            reply = _walk_tuple(buf, vs, ve, family)
    if orig is None or reply is None:
        return None
    return CtEntry(orig, reply, *_scalars(buf, offset + 20, end))


def decode_entry(buf: Buf, offset: int = 0, *, fast: bool = True) -> CtEntry | None:
    """Decode the ctnetlink conntrack message at buf[offset:]; None if it is not one."""
    try:
        if len(buf) - offset < 20:
            return None
        msg_len = _HDR.unpack_from(buf, offset)[0]
        if msg_len < 20 or offset + msg_len > len(buf):
            return None
        family = buf[offset + 16]
        if fast:
            entry = _fast(buf, offset, msg_len, family)
            if entry is not None:
                return entry
        return _slow(buf, offset, msg_len, family)
    except (struct.error, ValueError, IndexError):
        return None


def _kind(msg_type: int, flags: int) -> int:
    if msg_type == MSG_CT_DELETE:
        return DESTROY
    if flags & NLM_F_MULTI:
        return DUMPED
    if flags & (NLM_F_CREATE | NLM_F_EXCL):
        return NEW
    return UPDATE


def _touches(buf: Buf, offset: int, msg_len: int, ports: frozenset[int]) -> bool:
    """Whether the entry's orig sport, orig dport or reply sport is in `ports`, read
    from the bytes without building the entry (True when the layout is not the
    common one: the caller decodes it and decides; so False means the common layout,
    which `_plain_request` counts on)."""
    if msg_len < 20:
        return True
    family = buf[offset + 16]
    if family == AF_INET:
        probe = _PROBE_V4
    elif family == AF_INET6:
        probe = _PROBE_V6
    else:
        return True
    start = offset + 16
    if msg_len < 16 + probe.size:
        return True
    if int.from_bytes(buf[start : start + probe.size], "big") & probe.mask not in probe.expected:
        return True
    sport, dport, reply_sport = probe.ports.unpack_from(buf, start)
    return sport in ports or dport in ports or reply_sport in ports


#: What an unreplied entry's raw request is handed to (`decode(unreplied=...)`): its
#: family, orig source and destination addresses (packed, as inet_pton gives them)
#: and orig destination port.
UnrepliedSink: TypeAlias = Callable[[int, bytes, bytes, int], None]

def _request_struct(addr_len: int) -> struct.Struct:
    """The common layout read for `_plain_request` only: family; orig src, dst, proto
    and dport; reply src and sport (headers skipped: `_touches` has checked them)."""
    pad = (-addr_len) % 4
    address, skip = f"{addr_len}s" + "x" * pad, "x" * (addr_len + pad)
    orig = f"4x 4x 4x{address} 4x{address} 4x 4x B3x 4x 4x 4x H2x"
    reply = f"4x 4x 4x{address} 4x{skip} 4x 4x 4x 4x H2x 4x 4x"
    return struct.Struct(">B3x " + orig + " " + reply)


_REQUEST_V4 = _request_struct(4)
_REQUEST_V6 = _request_struct(16)


def _plain_request(buf: Buf, offset: int, msg_len: int) -> tuple[int, bytes, bytes, int] | bool:
    """(family, orig src, orig dst, orig dport) of a UDP entry that never saw a reply
    and whose reply tuple comes from where its request went (not NATted), read in place
    without building it; False for any other entry; True when its status cannot be
    found (the caller decodes it). Only for an entry `_touches` has read: the common
    layout, checked there."""
    v4 = buf[offset + 16] == AF_INET
    family, src, dst, proto, dport, reply_src, reply_sport = (
        _REQUEST_V4 if v4 else _REQUEST_V6
    ).unpack_from(buf, offset + 16)
    if proto != IPPROTO_UDP or reply_src != dst or reply_sport != dport:
        return False
    pos, end = offset + (_V4 if v4 else _V6).size, offset + msg_len
    while pos + 8 <= end:  # CTA_STATUS: among the first attributes after the tuples
        nla_len, nla_type = _NLA.unpack_from(buf, pos)
        if nla_len < 4 or pos + nla_len > end:
            return True
        if nla_type & NLA_TYPE_MASK == CTA_STATUS:
            if _BE32.unpack_from(buf, pos + 4)[0] & IPS_SEEN_REPLY:
                return False
            return (family, src, dst, dport)
        pos += (nla_len + 3) & ~3
    return True


def decode(
    buf: Buf,
    *,
    fast: bool = True,
    ports: frozenset[int] | None = None,
    usage: bool = False,
    unreplied: UnrepliedSink | None = None,
) -> Batch:
    """Decode every netlink message in one buffer returned by recv(). Never raises.

    `ports`: skip, without decoding them, the entries whose orig sport, orig dport and
    reply sport are all outside it (a dump read for a few ports of a big table);
    `unreplied`: of those skipped, hand each that never saw a reply and is not NATted
    to this sink as raw values (scan's count of requests to ports with nothing bound,
    ctfix.core.unbound: a port scan can leave 200k of them, too many to build); one in
    an unusual layout is decoded and returned instead.
    `usage`: also read each entry's age and counters (`Batch.usage`), which only the
    stale-nat checks need; the plain decode never looks at them."""
    events: list[CtEvent] = []
    usages: list[CtUsage] | None = [] if usage else None
    done = False
    error = malformed = 0
    offset = 0
    size = len(buf)
    try:
        while offset + 16 <= size:
            msg_len, msg_type, flags, _seq, _pid = _HDR.unpack_from(buf, offset)
            if msg_len < 16 or offset + msg_len > size:
                malformed += 1
                break
            if msg_type == NLMSG_DONE:
                done = True
            elif msg_type == NLMSG_ERROR:
                if msg_len >= 20:
                    code = struct.unpack_from("=i", buf, offset + 16)[0]
                    error = -code if code < 0 else code
                else:
                    malformed += 1
                done = True
            elif msg_type in (MSG_CT_NEW, MSG_CT_DELETE):
                if ports is not None and not _touches(buf, offset, msg_len, ports):
                    request = (
                        _plain_request(buf, offset, msg_len) if unreplied is not None else False
                    )
                    if request is not True:
                        if unreplied is not None and isinstance(request, tuple):
                            unreplied(*request)
                        offset += (msg_len + 3) & ~3
                        continue
                entry = decode_entry(buf, offset, fast=fast)
                if entry is None:
                    malformed += 1
                else:
                    events.append(CtEvent(_kind(msg_type, flags), entry))
                    if usages is not None:
                        usages.append(usage_of(buf, offset, msg_len))
            offset += (msg_len + 3) & ~3
    except (struct.error, ValueError, IndexError):
        malformed += 1
        if usages is not None:
            del usages[len(events) :]
    return Batch(events, done, error, malformed, usages)


# -- building requests (pure too: bytes out) -------------------------------------------


def nla(nla_type: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = _NLA.pack(4 + len(payload), nla_type) + payload
    return raw + b"\0" * ((-len(raw)) % 4)


def dump_request(
    *,
    family: int,
    proto: int | None = None,
    sport: int | None = None,
    dport: int | None = None,
    seq: int = 1,
    reply_sport: int | None = None,
    src: str | None = None,
) -> bytes:
    """IPCTNL_MSG_CT_GET dump request, with CTA_FILTER for what the kernel can filter.

    The kernel (>= 5.8) filters a dump on the original tuple's protocol and ports
    when CTA_FILTER/CTA_FILTER_ORIG_FLAGS names them and CTA_TUPLE_ORIG carries the
    values, which is what `conntrack -L -p udp --dport P` sends. Zones are not asked
    of the kernel (it can filter only non-default zones); callers filter them.
    reply_sport filters on the reply tuple's source port the same way
    (CTA_FILTER_REPLY_FLAGS with CTA_TUPLE_REPLY): the port a DNAT sent requests to.
    src (with proto) filters on the original tuple's source address (an address of
    `family`): the flows this host started from it, its servers' replies among them.
    """
    attrs = b""
    flags = 0
    if proto is not None:
        ip_attrs = b""
        if src is not None:
            if family == socket.AF_INET6:
                ip_attrs = nla(CTA_IP_V6_SRC, socket.inet_pton(socket.AF_INET6, src))
            else:
                ip_attrs = nla(CTA_IP_V4_SRC, socket.inet_pton(socket.AF_INET, src))
            ip_attrs = nla(CTA_TUPLE_IP | NLA_F_NESTED, ip_attrs)
            flags |= 1 << 0  # CTA_FILTER_FLAG(CTA_IP_SRC)
        proto_attrs = nla(CTA_PROTO_NUM, bytes([proto]))
        flags |= 1 << 3  # CTA_FILTER_FLAG(CTA_PROTO_NUM)
        if sport is not None:
            proto_attrs += nla(CTA_PROTO_SRC_PORT, _BE16.pack(sport))
            flags |= 1 << 4
        if dport is not None:
            proto_attrs += nla(CTA_PROTO_DST_PORT, _BE16.pack(dport))
            flags |= 1 << 5
        tuple_attrs = ip_attrs + nla(CTA_TUPLE_PROTO | NLA_F_NESTED, proto_attrs)
        attrs += nla(CTA_TUPLE_ORIG | NLA_F_NESTED, tuple_attrs)
        filters = nla(1, struct.pack("=I", flags))  # CTA_FILTER_ORIG_FLAGS
        if reply_sport is not None:
            reply_attrs = nla(CTA_PROTO_NUM, bytes([proto]))
            reply_attrs += nla(CTA_PROTO_SRC_PORT, _BE16.pack(reply_sport))
            attrs += nla(
                CTA_TUPLE_REPLY | NLA_F_NESTED, nla(CTA_TUPLE_PROTO | NLA_F_NESTED, reply_attrs)
            )
            # CTA_FILTER_REPLY_FLAGS: protocol and source port of the reply tuple.
            filters += nla(2, struct.pack("=I", (1 << 3) | (1 << 4)))
        attrs += nla(CTA_FILTER | NLA_F_NESTED, filters)
    msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    body = struct.pack("=BBH", family, 0, 0) + attrs
    return _HDR.pack(16 + len(body), msg_type, 0x1 | 0x300, seq, 0) + body


def decode_event(buf: Buf) -> CtEvent | None:
    """The hot path for one event per recv(): the first message as a CtEvent, or None.

    Same result as `decode(buf).events[0]` for a conntrack message; None for
    anything else (use `decode` to see errors and the end of dumps).
    """
    try:
        if len(buf) < 20:
            return None
        msg_len, msg_type, flags, _seq, _pid = _HDR.unpack_from(buf, 0)
        if msg_type != MSG_CT_NEW and msg_type != MSG_CT_DELETE:
            return None
        if msg_len < 20 or msg_len > len(buf):
            return None
        family = buf[16]
        entry = _fast(buf, 0, msg_len, family) or _slow(buf, 0, msg_len, family)
    except (struct.error, ValueError, IndexError):
        return None
    if entry is None:
        return None
    return _new_tuple(CtEvent, (_kind(msg_type, flags), entry))


def ends_dump(buf: Buf) -> bool:
    """True when buf holds NLMSG_DONE or NLMSG_ERROR (or is not netlink at all)."""
    offset = 0
    size = len(buf)
    try:
        while offset + 16 <= size:
            msg_len, msg_type = struct.unpack_from("=IH", buf, offset)
            if msg_type in (NLMSG_DONE, NLMSG_ERROR) or msg_len < 16:
                return True
            offset += (msg_len + 3) & ~3
    except struct.error:
        return True
    return size == 0


# -- age and counters (the stale-nat checks only; never on the event hot path) ----------

CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_TIMESTAMP = 20
CTA_COUNTERS_PACKETS = 1
CTA_COUNTERS_BYTES = 2
CTA_TIMESTAMP_START = 1
_BE64 = struct.Struct(">Q")


class CtUsage(NamedTuple):
    """How long an entry has lived and how much it carried, when the kernel says.

    `start`: when the entry was made, nanoseconds since the epoch (only with
    net.netfilter.nf_conntrack_timestamp=1); packets and bytes per direction (only
    with net.netfilter.nf_conntrack_acct=1). None when the message did not carry them.
    """

    start: int | None = None
    orig_packets: int | None = None
    orig_bytes: int | None = None
    reply_packets: int | None = None
    reply_bytes: int | None = None


def _u64_pair(buf: Buf, pos: int, end: int) -> tuple[int | None, int | None]:
    """(CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES) of a counters nest; the same for a
    timestamp nest (START, STOP)."""
    first = second = None
    for t, vs, ve in _attrs(buf, pos, end):
        if ve - vs >= 8:
            if t == 1:
                first = int(_BE64.unpack_from(buf, vs)[0])
            elif t == 2:
                second = int(_BE64.unpack_from(buf, vs)[0])
    return first, second


def usage_of(buf: Buf, offset: int, msg_len: int) -> CtUsage:
    """The CtUsage of the conntrack message at buf[offset:offset + msg_len]."""
    start = None
    counters: dict[int, tuple[int | None, int | None]] = {}
    try:
        for t, vs, ve in _attrs(buf, offset + 20, offset + msg_len):
            if t == CTA_TIMESTAMP:
                start = _u64_pair(buf, vs, ve)[0]
            elif t in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
                counters[t] = _u64_pair(buf, vs, ve)
    except (struct.error, IndexError):
        return CtUsage()
    orig = counters.get(CTA_COUNTERS_ORIG, (None, None))
    reply = counters.get(CTA_COUNTERS_REPLY, (None, None))
    return CtUsage(start, orig[0], orig[1], reply[0], reply[1])


# -- deleting one entry ----------------------------------------------------------------

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4


def _tuple_attrs(which: int, tup: CtTuple) -> bytes:
    if tup.family == AF_INET6:
        src_t, dst_t = CTA_IP_V6_SRC, CTA_IP_V6_DST
    else:
        src_t, dst_t = CTA_IP_V4_SRC, CTA_IP_V4_DST
    ip = nla(src_t, socket.inet_pton(tup.family, tup.src)) + nla(
        dst_t, socket.inet_pton(tup.family, tup.dst)
    )
    proto = (
        nla(CTA_PROTO_NUM, bytes([tup.proto]))
        + nla(CTA_PROTO_SRC_PORT, _BE16.pack(tup.sport))
        + nla(CTA_PROTO_DST_PORT, _BE16.pack(tup.dport))
    )
    return nla(
        which | NLA_F_NESTED,
        nla(CTA_TUPLE_IP | NLA_F_NESTED, ip) + nla(CTA_TUPLE_PROTO | NLA_F_NESTED, proto),
    )


def _entry_request(msg_type: int, entry: CtEntry, seq: int, with_id: bool) -> bytes:
    attrs = _tuple_attrs(CTA_TUPLE_ORIG, entry.orig)
    if entry.zone:
        attrs += nla(CTA_ZONE, _BE16.pack(entry.zone))
    if with_id and entry.id is not None:
        attrs += nla(CTA_ID, _BE32.pack(entry.id))
    body = struct.pack("=BBH", entry.orig.family, 0, 0) + attrs
    return _HDR.pack(16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def get_request(entry: CtEntry, *, seq: int = 1) -> bytes:
    """IPCTNL_MSG_CT_GET of the entry that holds this original tuple now (in its zone):
    the kernel answers with it, or ENOENT."""
    return _entry_request((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, entry, seq, False)


def delete_request(entry: CtEntry, *, seq: int = 1) -> bytes:
    """IPCTNL_MSG_CT_DELETE of exactly this entry, acknowledged.

    Always by its original tuple (a delete without a tuple is a *flush* of the whole
    table to the kernel, so this function has no way to build one), in its zone, and,
    when the entry's id is known, only if the entry under that tuple still has that id
    (else the kernel answers ENOENT). The kernel may give a re-created entry the id of
    the one it replaces (the freed object is reused): callers that must not delete a
    newer entry read it first (`get_request`) and compare its reply tuple.
    """
    return _entry_request(MSG_CT_DELETE, entry, seq, True)
