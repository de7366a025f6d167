"""The ctnetlink requests ctfix sends: a (filtered) dump, the GET and the DELETE of one
entry. Pure: values in, bytes out (`ctfix.platform.conntrack` sends them). Re-exported
by `ctfix.core.decode`.
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING

from ctfix.core.ctnetlink import (
    AF_INET6,
    CTA_FILTER,
    CTA_ID,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    CTA_ZONE,
    HDR,
    IPCTNL_MSG_CT_GET,
    MSG_CT_DELETE,
    NFNL_SUBSYS_CTNETLINK,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_REQUEST,
    nla,
)

if TYPE_CHECKING:
    from ctfix.core.decode import CtEntry, CtTuple

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")


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
        orig_attrs = ip_attrs + nla(CTA_TUPLE_PROTO | NLA_F_NESTED, proto_attrs)
        attrs += nla(CTA_TUPLE_ORIG | NLA_F_NESTED, orig_attrs)
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
    return HDR.pack(16 + len(body), msg_type, 0x1 | 0x300, seq, 0) + body


def tuple_attrs(which: int, tup: CtTuple) -> bytes:
    """A CTA_TUPLE_ORIG or CTA_TUPLE_REPLY nest for this tuple."""
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
    attrs = tuple_attrs(CTA_TUPLE_ORIG, entry.orig)
    if entry.zone:
        attrs += nla(CTA_ZONE, _BE16.pack(entry.zone))
    if with_id and entry.id is not None:
        attrs += nla(CTA_ID, _BE32.pack(entry.id))
    body = struct.pack("=BBH", entry.orig.family, 0, 0) + attrs
    return HDR.pack(16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


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
