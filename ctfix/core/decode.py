"""ctnetlink bytes -> small immutable values (`CtTuple`, `CtEntry`, `CtEvent`, and the
hot path's `Packed`). Pure.

This is the hot path of `ctfix watch` (one call per conntrack event, >100k/s) and of
every dump. It never raises on bad input: a message it cannot understand is skipped
and counted (`Batch.malformed`).

Two forms of one entry:
- `CtEntry` (with its two `CtTuple`s): addresses as text, ports as ints; what explain,
  scan, fix and the tests use.
- `Packed`: one flat tuple (the event kind first, then the values in the order of
  `ctfix.core.ctlayout`'s fields) with addresses and ports as the kernel's big-endian
  bytes, read by one `struct` call and never converted: watch's event loop takes this
  form (`packed_event`), and the wrong-source detector keys its pending requests with
  those very bytes (`feed_packed`). `entry_of`, `event_of` and `packed_of` convert.

Where the values are in a message is `ctfix.core.ctlayout`'s (the walk, and the learned
layouts that make it one unpack); the kernel's numbers are `ctfix.core.ctnetlink`'s
(re-exported here), the requests ctfix sends `ctfix.core.ctrequest`'s (re-exported).

Over 500 lines on purpose: both forms, their conversions and the three readers (one
message, one event, a buffer of many) must change together.

Know before changing: the values are NamedTuples and plain tuples, not dataclasses:
just as immutable and slot-free, and built in ~0.1 us instead of ~0.4 us (a frozen
dataclass's `__init__` goes through `object.__setattr__`), which matters at kernel
event rates.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any, Final, NamedTuple, TypeAlias

from ctfix.core import ctlayout
from ctfix.core.ctnetlink import (
    AF_INET,
    AF_INET6,
    CTA_COUNTERS_BYTES,
    CTA_COUNTERS_ORIG,
    CTA_COUNTERS_PACKETS,
    CTA_COUNTERS_REPLY,
    CTA_FILTER,
    CTA_ID,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_MARK,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_STATUS,
    CTA_TIMEOUT,
    CTA_TIMESTAMP,
    CTA_TIMESTAMP_START,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    CTA_TUPLE_ZONE,
    CTA_ZONE,
    HDR,
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    IPPROTO_UDP,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT,
    IPS_EXPECTED,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    MSG_CT_DELETE,
    MSG_CT_NEW,
    NFNL_SUBSYS_CTNETLINK,
    NLA_F_NESTED,
    NLA_TYPE_MASK,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    Buf,
    nla,
)
from ctfix.core.ctnetlink import attrs as _attrs
from ctfix.core.ctrequest import delete_request, dump_request, get_request

# Event kinds (what the kernel's message type and flags say happened).
NEW = 1
UPDATE = 2
DESTROY = 3
DUMPED = 4  # an entry from a dump (GET reply), not an event


def _kind_of_new(flags: int) -> int:
    """The kind of a MSG_CT_NEW message, by its flags."""
    if flags & NLM_F_MULTI:
        return DUMPED
    if flags & (NLM_F_CREATE | NLM_F_EXCL):
        return NEW
    return UPDATE


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


#: One entry and what happened to it, flat (module doc): kind, family, then per tuple
#: source address, destination address, protocol, source port, destination port
#: (addresses 4 or 16 bytes, ports 2 bytes, as the kernel sends them), then status,
#: zone, mark, timeout, id, start (None where the message had none; a start of 0 too).
Packed: TypeAlias = tuple[
    int, int,
    bytes, bytes, int, bytes, bytes,
    bytes, bytes, int, bytes, bytes,
    int, int, "int | None", "int | None", "int | None", "int | None",
]
# Positions in a Packed (Final: a type checker knows each field's type by them).
P_KIND: Final = 0
P_FAMILY: Final = 1
P_ORIG_SRC: Final = 2
P_ORIG_DST: Final = 3
P_ORIG_PROTO: Final = 4
P_ORIG_SPORT: Final = 5
P_ORIG_DPORT: Final = 6
P_REPLY_SRC: Final = 7
P_REPLY_DST: Final = 8
P_REPLY_PROTO: Final = 9
P_REPLY_SPORT: Final = 10
P_REPLY_DPORT: Final = 11
P_STATUS: Final = 12
P_ZONE: Final = 13
P_MARK: Final = 14
P_TIMEOUT: Final = 15
P_ID: Final = 16
P_START: Final = 17


# -- addresses, cached both ways: the same few recur in nearly every event ---------------

_ADDR_CACHE: dict[bytes, str] = {}
_PACK_CACHE: dict[str, bytes] = {}
_CACHE_MAX = 1 << 16


def _addr(raw: bytes) -> str:
    text = _ADDR_CACHE.get(raw)
    if text is None:
        text = socket.inet_ntop(AF_INET6 if len(raw) == 16 else AF_INET, raw)
        if len(_ADDR_CACHE) >= _CACHE_MAX:
            _ADDR_CACHE.clear()
        _ADDR_CACHE[raw] = text
    return text


def address_text(raw: bytes) -> str:
    """A Packed address (4 or 16 bytes) as text."""
    return _ADDR_CACHE.get(raw) or _addr(raw)


def address_bytes(address: str) -> bytes:
    """An address as a Packed holds it (4 or 16 bytes)."""
    raw = _PACK_CACHE.get(address)
    if raw is None:
        raw = socket.inet_pton(AF_INET6 if ":" in address else AF_INET, address)
        if len(_PACK_CACHE) >= _CACHE_MAX:
            _PACK_CACHE.clear()
        _PACK_CACHE[address] = raw
    return raw


# -- one message ---------------------------------------------------------------------------

# NamedTuple's own __new__ checks arguments in Python; the fields are all given here.
_new_tuple = tuple.__new__
_RAW_TAILS = tuple((*ctlayout.RAW_TAIL, kind) for kind in range(DUMPED + 1))
_KIND_FLAGS = NLM_F_MULTI | NLM_F_CREATE | NLM_F_EXCL
#: the tail of a MSG_CT_NEW message by its `flags & _KIND_FLAGS` (what `_kind` says)
_NEW_TAILS = tuple(_RAW_TAILS[_kind_of_new(flags)] for flags in range(_KIND_FLAGS + 1))
_LEARNED = ctlayout.LEARNED
_TAIL = ctlayout.TAIL
_HEAD = struct.Struct("=IHH")  # nlmsghdr's length, type, flags


def _entry(v: tuple[Any, ...]) -> CtEntry:
    """A CtEntry from a layout's values (ctfix.core.ctlayout's field order)."""
    (fam, osrc, odst, oproto, osport, odport, rsrc, rdst, rproto, rsport, rdport,
     status, zone, mark, timeout, ct_id, start) = v
    cache = _ADDR_CACHE
    orig = _new_tuple(CtTuple, (
        cache.get(osrc) or _addr(osrc), cache.get(odst) or _addr(odst),
        osport, odport, oproto, fam,
    ))
    reply = _new_tuple(CtTuple, (
        cache.get(rsrc) or _addr(rsrc), cache.get(rdst) or _addr(rdst),
        rsport, rdport, rproto, fam,
    ))
    return _new_tuple(CtEntry, (orig, reply, status, zone, mark, timeout, ct_id, start or None))


def decode_entry(buf: Buf, offset: int = 0, *, fast: bool = True) -> CtEntry | None:
    """Decode the ctnetlink conntrack message at buf[offset:]; None if it is not one.

    fast=False walks the message afresh instead of using a learned layout (the same
    values, by construction: tests compare the two)."""
    try:
        if len(buf) - offset < 20:
            return None
        msg_len = HDR.unpack_from(buf, offset)[0]
        if msg_len < 20 or offset + msg_len > len(buf):
            return None
        if fast:
            # ctlayout.cached() inlined: this runs for every entry of explain's dumps.
            shape = -1
            for known in _LEARNED.get(msg_len, ()):
                if shape < 0:
                    shape = int.from_bytes(buf[offset + 16 : offset + msg_len], "big")
                if shape & known.mask == known.expected:
                    return _entry(known.get(known.unpack(buf, offset + 16) + _TAIL))
        layout = ctlayout.layout(buf, offset, msg_len, learn=fast)
        return None if layout is None else _entry(layout.values(buf, offset))
    except (struct.error, ValueError, IndexError):
        return None


def _kind(msg_type: int, flags: int) -> int:
    return DESTROY if msg_type == MSG_CT_DELETE else _kind_of_new(flags)


def _touches(buf: Buf, offset: int, msg_len: int, ports: frozenset[int]) -> bool:
    """Whether the entry's orig sport, orig dport or reply sport is in `ports`, read
    from the bytes without building the entry (True when no learned layout fits: the
    caller decodes it, which learns one, and decides; so False means a learned layout,
    which `_plain_request` reads too)."""
    layout = ctlayout.cached(buf, offset, msg_len) if msg_len >= 20 else None
    if layout is None:
        return True
    sport, dport, reply_sport = layout.ports(buf, offset)
    return sport in ports or dport in ports or reply_sport in ports


#: What an unreplied entry's raw request is handed to (`decode(unreplied=...)`): its
#: family, orig source and destination addresses (packed, as inet_pton gives them)
#: and orig destination port.
UnrepliedSink: TypeAlias = Callable[[int, bytes, bytes, int], None]


def _plain_request(buf: Buf, offset: int, msg_len: int) -> tuple[int, bytes, bytes, int] | bool:
    """(family, orig src, orig dst, orig dport) of a UDP entry that never saw a reply
    and whose reply tuple comes from where its request went (not NATted), read in place
    through its learned layout without building it; False for any other entry; True
    when it has no learned layout (the caller decodes it). Only for an
    entry `_touches` has read."""
    layout = ctlayout.cached(buf, offset, msg_len)
    if layout is None:
        return True
    v = layout.values(buf, offset)
    if (
        v[ctlayout.ORIG_PROTO] != IPPROTO_UDP
        or v[ctlayout.REPLY_SRC] != v[ctlayout.ORIG_DST]
        or v[ctlayout.REPLY_SPORT] != v[ctlayout.ORIG_DPORT]
    ):
        return False
    # A dump entry always carries CTA_STATUS (a layout without one reads 0 here).
    if v[ctlayout.STATUS] & IPS_SEEN_REPLY:
        return False
    return (v[ctlayout.FAMILY], v[ctlayout.ORIG_SRC], v[ctlayout.ORIG_DST], v[ctlayout.ORIG_DPORT])


# -- buffers ---------------------------------------------------------------------------------


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
            msg_len, msg_type, flags, _seq, _pid = HDR.unpack_from(buf, offset)
            if msg_len < 16 or offset + msg_len > size:
                malformed += 1
                break
            if msg_type == NLMSG_DONE:
                done = True
            elif msg_type == NLMSG_ERROR:
                error, done = _error(buf, offset, msg_len)
                malformed += error < 0
                error = max(error, 0)
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


def _error(buf: Buf, offset: int, msg_len: int) -> tuple[int, bool]:
    """(errno, True) of an NLMSG_ERROR message (0: an ACK); (-1, True) when it is too
    short to say."""
    if msg_len < 20:
        return -1, True
    code = struct.unpack_from("=i", buf, offset + 16)[0]
    return (-code if code < 0 else code), True


def decode_event(buf: Buf) -> CtEvent | None:
    """One event per recv(): the first message as a CtEvent, or None.

    Same result as `decode(buf).events[0]` for a conntrack message; None for
    anything else (use `decode` to see errors and the end of dumps).
    """
    try:
        if len(buf) < 20:
            return None
        _len, msg_type, flags = _HEAD.unpack_from(buf, 0)
    except struct.error:
        return None
    if msg_type != MSG_CT_NEW and msg_type != MSG_CT_DELETE:
        return None
    entry = decode_entry(buf)
    return None if entry is None else _new_tuple(CtEvent, (_kind(msg_type, flags), entry))


def packed_event(buf: Buf) -> Packed | None:
    """The hot path: the first message of one recv() as a Packed, or None (as
    `decode_event`)."""
    try:
        if len(buf) < 20:
            return None
        msg_len, msg_type, flags = _HEAD.unpack_from(buf, 0)
        if msg_type == MSG_CT_NEW:
            tail = _NEW_TAILS[flags & _KIND_FLAGS]
        elif msg_type == MSG_CT_DELETE:
            tail = _RAW_TAILS[DESTROY]
        else:
            return None
        if msg_len < 20 or msg_len > len(buf):
            return None
        # ctlayout.layout() inlined: this runs for every event.
        layouts = _LEARNED.get(msg_len)
        if layouts is not None:
            shape = int.from_bytes(buf[16:msg_len], "big")
            for known in layouts:
                if shape & known.mask == known.expected:
                    return known.get_raw(known.unpack_raw(buf, 16) + tail)
        new = ctlayout.layout(buf, 0, msg_len)
        return None if new is None else new.raw(buf, 0, tail)
    except (struct.error, ValueError, IndexError):
        return None


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


# -- between the two forms ---------------------------------------------------------------


def entry_of(packed: Packed) -> CtEntry:
    """The CtEntry of a Packed."""
    (_, fam, osrc, odst, oproto, osport, odport, rsrc, rdst, rproto, rsport, rdport,
     status, zone, mark, timeout, ct_id, start) = packed
    frm = int.from_bytes
    return _entry((fam, osrc, odst, oproto, frm(osport, "big"), frm(odport, "big"),
                   rsrc, rdst, rproto, frm(rsport, "big"), frm(rdport, "big"),
                   status, zone, mark, timeout, ct_id, start))


def event_of(packed: Packed) -> CtEvent:
    """The CtEvent of a Packed."""
    return _new_tuple(CtEvent, (packed[0], entry_of(packed)))


def packed_of(entry: CtEntry, kind: int = DUMPED) -> Packed:
    """The Packed of a CtEntry (what an event or a dump of it would give)."""
    orig, reply = entry.orig, entry.reply
    pack = address_bytes
    return (
        kind, orig.family,
        pack(orig.src), pack(orig.dst), orig.proto, orig.sport.to_bytes(2, "big"),
        orig.dport.to_bytes(2, "big"),
        pack(reply.src), pack(reply.dst), reply.proto, reply.sport.to_bytes(2, "big"),
        reply.dport.to_bytes(2, "big"),
        entry.status, entry.zone, entry.mark, entry.timeout, entry.id, entry.start,
    )


# -- age and counters (the stale-nat checks only; never on the event hot path) ----------


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


_BE64 = struct.Struct(">Q")


def _u64_pair(buf: Buf, pos: int, end: int) -> tuple[int | None, int | None]:
    """(CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES) of a counters nest; the same for a
    timestamp nest (START, STOP)."""
    first = second = None
    for t, vs, ve in _attrs(buf, pos, end):
        if ve - vs >= 8:
            if t == CTA_COUNTERS_PACKETS:
                first = int(_BE64.unpack_from(buf, vs)[0])
            elif t == CTA_COUNTERS_BYTES:
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


__all__ = [
    "AF_INET", "AF_INET6", "CTA_COUNTERS_BYTES", "CTA_COUNTERS_ORIG", "CTA_COUNTERS_PACKETS",
    "CTA_COUNTERS_REPLY", "CTA_FILTER", "CTA_ID", "CTA_IP_V4_DST", "CTA_IP_V4_SRC",
    "CTA_IP_V6_DST", "CTA_IP_V6_SRC", "CTA_MARK", "CTA_PROTO_DST_PORT", "CTA_PROTO_NUM",
    "CTA_PROTO_SRC_PORT", "CTA_STATUS", "CTA_TIMEOUT", "CTA_TIMESTAMP", "CTA_TIMESTAMP_START",
    "CTA_TUPLE_IP", "CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO", "CTA_TUPLE_REPLY", "CTA_TUPLE_ZONE",
    "CTA_ZONE", "DESTROY", "DUMPED", "IPCTNL_MSG_CT_DELETE", "IPCTNL_MSG_CT_GET",
    "IPCTNL_MSG_CT_NEW", "IPPROTO_UDP", "IPS_ASSURED", "IPS_CONFIRMED", "IPS_DST_NAT",
    "IPS_EXPECTED", "IPS_SEEN_REPLY", "IPS_SRC_NAT", "MSG_CT_DELETE", "MSG_CT_NEW", "NEW",
    "NFNL_SUBSYS_CTNETLINK", "NLA_F_NESTED", "NLA_TYPE_MASK", "NLMSG_DONE", "NLMSG_ERROR",
    *(name for name in globals() if name.startswith("P_")),
    "NLM_F_ACK", "NLM_F_CREATE", "NLM_F_EXCL", "NLM_F_MULTI", "NLM_F_REQUEST", "UPDATE",
    "Batch", "Buf", "CtEntry", "CtEvent", "CtTuple", "CtUsage", "Packed",
    "address_bytes", "address_text", "decode", "decode_entry", "decode_event",
    "delete_request", "dump_request", "ends_dump", "entry_of", "event_of",
    "get_request", "nla", "packed_event", "packed_of", "usage_of",
]
