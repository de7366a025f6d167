"""Where a ctnetlink conntrack message keeps its values: the walk, and the learned
layouts that replay it at the cost of one `struct` call. Pure.

The walk reads a message's attributes the way the kernel nests them (the first
CTA_TUPLE_ORIG and CTA_TUPLE_REPLY, each with its IP and PROTO nests; the scalars
after them, the last of each kind counting) and answers with *where* each value is:
its byte offset and size, and the offset of every attribute header it read to get
there (a header whose length does not fit included: it ended a loop). `ctfix.core.decode`
builds the values from those places.

Learned layouts. The attribute order of a message is fixed for a kernel, a family and
a kind of message (event or dump, with or without zone, mark, timestamp), so most
messages share a few shapes. A `Layout` is the walk of one message compiled: one
`struct.Struct` over the values' places, and a mask over every header the walk read
(the family byte too). Another message of the same length whose masked bytes are equal
would be walked exactly the same way, byte for byte, so its values are where the layout
says: that is the fast path, one comparison of the message as a big integer and one
unpack. A message of a new shape is walked once and its layout kept (at most
MAX_LAYOUTS, the oldest forgotten first).

Know before changing: the fast path is right by construction only as long as every
decision the walk takes depends on header bytes alone (lengths, types), never on a
value: keep it so (a value that must decide something is read after the walk, by
the caller). Tests compare a cached layout with a fresh walk on real, mutated and
overlapping messages.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from ctfix.core.ctnetlink import (
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
    CTA_ZONE,
    NLA,
    NLA_TYPE_MASK,
    Buf,
)

# The values a message gives, in this order (`Layout.values` answers them so).
FAMILY, ORIG_SRC, ORIG_DST, ORIG_PROTO, ORIG_SPORT, ORIG_DPORT = range(6)
REPLY_SRC, REPLY_DST, REPLY_PROTO, REPLY_SPORT, REPLY_DPORT = range(6, 11)
STATUS, ZONE, MARK, TIMEOUT, ID, START = range(11, 17)
FIELDS = 17
_SCALARS = {CTA_STATUS: STATUS, CTA_TIMEOUT: TIMEOUT, CTA_MARK: MARK, CTA_ID: ID}
_PORTS = (ORIG_SPORT, ORIG_DPORT, REPLY_SPORT, REPLY_DPORT)

#: layouts kept (a kernel makes a handful of shapes; hostile input cannot grow this)
MAX_LAYOUTS = 64


class Walk(NamedTuple):
    """Where a message's values are: field -> (offset, size), and the offsets of the
    attribute headers read. Offsets are from the message's start."""

    places: dict[int, tuple[int, int]]
    headers: list[int]


def _each(buf: Buf, pos: int, end: int, headers: list[int]) -> Any:
    """`ctfix.core.ctnetlink.attrs`, noting every header it reads."""
    while pos + 4 <= end:
        headers.append(pos)
        nla_len, nla_type = NLA.unpack_from(buf, pos)
        if nla_len < 4 or pos + nla_len > end:
            return
        yield nla_type & NLA_TYPE_MASK, pos + 4, pos + nla_len
        pos += (nla_len + 3) & ~3


def _walk_tuple(
    buf: Buf, pos: int, end: int, base: int, places: dict[int, tuple[int, int]],
    headers: list[int],
) -> bool:
    """One CTA_TUPLE_* nest into places[base + 0..4] (src, dst, proto, sport, dport);
    False when it lacks an address or the protocol."""
    src = dst = proto = None
    ports: dict[int, tuple[int, int]] = {}
    for t, vs, ve in _each(buf, pos, end, headers):
        if t == CTA_TUPLE_IP:
            for at, avs, ave in _each(buf, vs, ve, headers):
                size = ave - avs
                if at in (CTA_IP_V4_SRC, CTA_IP_V6_SRC) and size in (4, 16):
                    src = (avs, size)
                elif at in (CTA_IP_V4_DST, CTA_IP_V6_DST) and size in (4, 16):
                    dst = (avs, size)
        elif t == CTA_TUPLE_PROTO:
            for pt, pvs, pve in _each(buf, vs, ve, headers):
                if pt == CTA_PROTO_NUM and pve - pvs >= 1:
                    proto = (pvs, 1)
                elif pt == CTA_PROTO_SRC_PORT and pve - pvs >= 2:
                    ports[3] = (pvs, 2)
                elif pt == CTA_PROTO_DST_PORT and pve - pvs >= 2:
                    ports[4] = (pvs, 2)
    if src is None or dst is None or proto is None:
        return False
    places[base] = src
    places[base + 1] = dst
    places[base + 2] = proto
    for which, place in ports.items():
        places[base + which] = place
    return True


def walk(buf: Buf, offset: int, msg_len: int) -> Walk | None:
    """Where the values of the conntrack message at buf[offset:offset + msg_len] are;
    None when its first original or reply tuple is incomplete (or missing)."""
    end = offset + msg_len
    places: dict[int, tuple[int, int]] = {FAMILY: (offset + 16, 1)}
    headers: list[int] = []
    tuples = 0
    seen_orig = seen_reply = False
    for t, vs, ve in _each(buf, offset + 20, end, headers):
        size = ve - vs
        if t == CTA_TUPLE_ORIG and not seen_orig:
            seen_orig = True
            tuples += _walk_tuple(buf, vs, ve, ORIG_SRC, places, headers)
        elif t == CTA_TUPLE_REPLY and not seen_reply:
            seen_reply = True
            tuples += _walk_tuple(buf, vs, ve, REPLY_SRC, places, headers)
        elif size >= 4 and t in _SCALARS:
            places[_SCALARS[t]] = (vs, 4)
        elif size >= 4 and t == CTA_TIMESTAMP:
            places.pop(START, None)  # the last timestamp counts, even without a start
            for st, svs, sve in _each(buf, vs, ve, headers):
                if st == CTA_TIMESTAMP_START and sve - svs >= 8:
                    places[START] = (svs, 8)
                    break
        elif t == CTA_ZONE and size >= 2:
            places[ZONE] = (vs, 2)
    if tuples != 2:
        return None
    return Walk({k: (pos - offset, size) for k, (pos, size) in places.items()},
                [h - offset for h in headers])


_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_ADDRESSES = (ORIG_SRC, ORIG_DST, REPLY_SRC, REPLY_DST)
_ZERO = (ORIG_SPORT, ORIG_DPORT, REPLY_SPORT, REPLY_DPORT, STATUS, ZONE)

#: What `Layout.values` appends to the values it unpacks: absent ones come from it.
TAIL = (0, None)
#: What `Layout.raw` appends (then the caller's `kind`): an absent port is b"\0\0".
RAW_TAIL = (b"\0\0", 0, None)


class Layout(NamedTuple):
    """A walk compiled (module doc).

    `values(buf, offset)`: the FIELDS values, addresses as bytes, ports as ints.
    `raw(buf, offset, tail)`: (kind, then the FIELDS values with each port as its two
    big-endian bytes), where tail is RAW_TAIL + (kind,): the hot path's form, which
    builds no object it does not need (hot loops inline it:
    `get_raw(unpack_raw(buf, offset + 16) + tail)`). `ports(buf, offset)`: orig sport,
    orig dport, reply sport alone.
    """

    msg_len: int
    mask: int
    expected: int
    unpack: Callable[[Buf, int], tuple[Any, ...]]
    get: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    unpack_raw: Callable[[Buf, int], tuple[Any, ...]]
    get_raw: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    ports: Callable[[Buf, int], tuple[int, int, int]]

    def values(self, buf: Buf, offset: int) -> tuple[Any, ...]:
        return self.get(self.unpack(buf, offset + 16) + TAIL)

    def raw(self, buf: Buf, offset: int, tail: tuple[Any, ...]) -> tuple[Any, ...]:
        return self.get_raw(self.unpack_raw(buf, offset + 16) + tail)


def compile_walk(found: Walk, buf: Buf, offset: int, msg_len: int) -> Layout | None:
    """The Layout of a walk of the message at buf[offset:offset + msg_len]; None when
    it cannot be one struct (places that overlap or odd sizes: damage)."""
    ordered = sorted(found.places.items(), key=lambda item: item[1][0])
    fmt = [">"]
    fmt_raw = [">"]
    at = 16
    for field, (pos, size) in ordered:
        code = f"{size}s" if field in _ADDRESSES else _CODES.get(size, "")
        if pos < at or not code:
            return None
        gap = "x" * (pos - at)
        fmt.append(gap + code)
        fmt_raw.append(gap + ("2s" if size == 2 and field in _PORTS else code))
        at = pos + size
    if at > msg_len:
        return None
    present = [field for field, _place in ordered]
    n = len(present)
    index = [
        present.index(f) if f in found.places else n + (0 if f in _ZERO else 1)
        for f in range(FIELDS)
    ]
    raw_index = [n + len(RAW_TAIL)] + [
        present.index(f) if f in found.places
        else n + (0 if f in _PORTS else 1 if f in _ZERO else 2)
        for f in range(FIELDS)
    ]
    region = msg_len - 16
    mask = 0xFF << (8 * (region - 1))  # the family byte
    for header in found.headers:
        mask |= 0xFFFFFFFF << (8 * (region - (header - 16) - 4))
    expected = int.from_bytes(buf[offset + 16 : offset + msg_len], "big") & mask
    return Layout(
        msg_len, mask, expected,
        struct.Struct("".join(fmt)).unpack_from, operator.itemgetter(*index),
        struct.Struct("".join(fmt_raw)).unpack_from, operator.itemgetter(*raw_index),
        _ports(found),
    )


def _ports(found: Walk) -> Callable[[Buf, int], tuple[int, int, int]]:
    wanted = (ORIG_SPORT, ORIG_DPORT, REPLY_SPORT)
    places = sorted((found.places[f][0], f) for f in wanted if f in found.places)
    fmt = ">"
    at = 0
    for pos, _field in places:
        fmt += "x" * (pos - at) + "H"
        at = pos + 2
    unpack = struct.Struct(fmt).unpack_from
    get = operator.itemgetter(*[
        [f for _pos, f in places].index(f) if f in found.places else len(places)
        for f in wanted
    ])

    def ports(data: Buf, off: int) -> tuple[int, int, int]:
        return get((*unpack(data, off), 0))  # type: ignore[no-any-return]

    return ports


# -- the cache of learned layouts -------------------------------------------------------

#: msg_len -> the learned layouts of that length, the latest first (hot loops read it)
LEARNED: dict[int, list[Layout]] = {}
_COUNT = 0


def cached(buf: Buf, offset: int, msg_len: int) -> Layout | None:
    """The learned layout this message has, if any (the fast path)."""
    layouts = LEARNED.get(msg_len)
    if layouts is not None:
        shape = int.from_bytes(buf[offset + 16 : offset + msg_len], "big")
        for known in layouts:
            if shape & known.mask == known.expected:
                return known
    return None


def layout(buf: Buf, offset: int, msg_len: int, *, learn: bool = True) -> Layout | None:
    """This message's layout: a learned one, or its own walk compiled (and kept when
    `learn`); None when the walk finds no complete tuples."""
    found = cached(buf, offset, msg_len) if learn else None
    if found is not None:
        return found
    walked = walk(buf, offset, msg_len)
    if walked is None:
        return None
    new = compile_walk(walked, buf, offset, msg_len)
    if new is not None and learn:
        _keep(new)
    return new


def _keep(new: Layout) -> None:
    global _COUNT
    if _COUNT >= MAX_LAYOUTS:
        oldest = next(iter(LEARNED))
        _COUNT -= len(LEARNED.pop(oldest))
    LEARNED.setdefault(new.msg_len, []).insert(0, new)
    _COUNT += 1
