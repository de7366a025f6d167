"""A minimal netlink client in the standard library: one request, its replies.

Used by routing.py (rtnetlink) and sockdiag.py (sock_diag). pyroute2 would do, but
its rtmsg does not know RTA_IP_PROTO/RTA_SPORT/RTA_DPORT (so a route lookup through
it silently ignores policy rules on ports) and importing it costs ~0.12 s of explain's
speed budget.

Know before changing: the socket is created in the calling thread's network
namespace, so enter the namespace first; attributes are 4-byte aligned and their
payload layout depends on the message family, so decoding stays with the caller.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

from ctfix.errors import CtfixError, PrivilegeError

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300

_HEADER = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_RECV_BUFFER = 1 << 20


def attributes(data: bytes | memoryview, offset: int, end: int) -> dict[int, bytes]:
    """Attributes (type -> payload) from offset to end; nested bit stripped."""
    found: dict[int, bytes] = {}
    while offset + 4 <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = bytes(data[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return found


def attribute(kind: int, payload: bytes) -> bytes:
    """Encode one attribute, padded."""
    raw = _ATTR.pack(4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def request(
    protocol: int, msg_type: int, payload: bytes, *, dump: bool, what: str
) -> Iterator[tuple[int, bytes]]:
    """Send one request; yield (type, body) of each reply message (header stripped).

    A negative errno in an NLMSG_ERROR becomes CtfixError (EPERM: PrivilegeError).
    """
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    except OSError as err:
        raise CtfixError(f"cannot open a netlink socket for {what}: {err.strerror}") from None
    try:
        sock.bind((0, 0))
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        seq = 1
        sock.send(_HEADER.pack(_HEADER.size + len(payload), msg_type, flags, seq, 0) + payload)
        while True:
            data = sock.recv(_RECV_BUFFER)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _flags, msg_seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    return
                body = data[offset + _HEADER.size : offset + length]
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code == 0:  # the ack that follows a non-dump request's answer
                        return
                    if code == errno.EPERM:
                        raise PrivilegeError(what)
                    raise NetlinkError(code, what)
                yield kind, body
    finally:
        sock.close()


class NetlinkError(CtfixError):
    """The kernel refused a request; `code` is the errno."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(code)}")
        self.code = code
