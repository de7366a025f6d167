"""The conntrack dump request can ask the kernel for a reply tuple's source port.

That is how `ctfix explain P` finds requests a DNAT forwarded to P from another port
(orig dport 9053, reply sport P) without walking the whole table.
"""

from __future__ import annotations

import socket
import struct

from ctfix.core import ctnetlink, decode


def _attrs(raw: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    return {t: (vs, ve) for t, vs, ve in ctnetlink.attrs(raw, start, end)}


def test_reply_source_port_is_filtered_by_the_kernel() -> None:
    request = decode.dump_request(family=socket.AF_INET, proto=17, reply_sport=5353)
    top = _attrs(request, 20, len(request))
    # CTA_FILTER: ORIG_FLAGS = protocol only, REPLY_FLAGS = protocol and source port.
    vs, ve = top[decode.CTA_FILTER]
    flags = _attrs(request, vs, ve)
    assert struct.unpack_from("=I", request, flags[1][0])[0] == 1 << 3
    assert struct.unpack_from("=I", request, flags[2][0])[0] == (1 << 3) | (1 << 4)
    # CTA_TUPLE_REPLY carries the values: UDP, source port 5353.
    vs, ve = top[decode.CTA_TUPLE_REPLY]
    proto = _attrs(request, *_attrs(request, vs, ve)[decode.CTA_TUPLE_PROTO])
    assert request[proto[decode.CTA_PROTO_NUM][0]] == 17
    src = proto[decode.CTA_PROTO_SRC_PORT][0]
    assert struct.unpack_from(">H", request, src)[0] == 5353


def test_without_reply_sport_the_request_is_unchanged() -> None:
    plain = decode.dump_request(family=socket.AF_INET, proto=17, dport=5353)
    assert plain == decode.dump_request(
        family=socket.AF_INET, proto=17, dport=5353, reply_sport=None
    )
    assert decode.CTA_TUPLE_REPLY not in _attrs(plain, 20, len(plain))
