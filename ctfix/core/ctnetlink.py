"""The ctnetlink wire format's vocabulary: the kernel's numbers, and the attribute
(TLV) framing every reader and writer shares. Pure; a leaf (it imports no ctfix module).

Constants from linux/netlink.h, linux/netfilter/nfnetlink.h,
nfnetlink_conntrack.h and nf_conntrack_common.h. `ctfix.core.decode` re-exports them:
most callers know them as `decode.CTA_...`.

Know before changing: netlink headers (nlmsghdr, nlattr) are in host byte order;
attribute *values* (addresses, ports, status, timeout, mark, zone, id) are big-endian.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import TypeAlias

Buf: TypeAlias = bytes | bytearray | memoryview

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
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
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_ID = 12
CTA_ZONE = 18
CTA_TIMESTAMP = 20
CTA_FILTER = 25
CTA_TIMESTAMP_START = 1  # inside CTA_TIMESTAMP: u64 nanoseconds, wall clock
CTA_COUNTERS_PACKETS = 1  # inside CTA_COUNTERS_*: u64
CTA_COUNTERS_BYTES = 2

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

HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
NLA = struct.Struct("=HH")  # nlattr: length, type


def attrs(buf: Buf, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (type, value start, value end) of the attributes in buf[pos:end], up to
    the first one whose length does not fit."""
    while pos + 4 <= end:
        nla_len, nla_type = NLA.unpack_from(buf, pos)
        if nla_len < 4 or pos + nla_len > end:
            return
        yield nla_type & NLA_TYPE_MASK, pos + 4, pos + nla_len
        pos += (nla_len + 3) & ~3


def nla(nla_type: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = NLA.pack(4 + len(payload), nla_type) + payload
    return raw + b"\0" * ((-len(raw)) % 4)
