"""Small UDP servers for the evidence tests, run as their own process in a namespace:

    python3 tests/netns/udp_servers.py pktinfo-echo PORT
    python3 tests/netns/udp_servers.py tftp PORT right|wrong

`pktinfo-echo`: a wildcard IPv4 echo server that answers from the address each
request was sent to (IP_PKTINFO), written from scratch so that nothing recognises it
(not `ctfix serve`, not in the knowledge base): the correct program ctfix does not know.

`tftp`: TFTP's shape (RFC 1350): a read request on PORT is answered by a DATA block
from a new socket, that is from a new port (the transfer id), then the client's ACK
goes to that port. `right` binds the new socket to the address the request was sent
to (learnt with IP_PKTINFO, as tftpd-hpa does); `wrong` leaves it unbound, so the
kernel picks the source address by routing (the bug, from a new port).

Also the client side (`tftp_get`), used by the tests in-process.

Know before changing: each server prints `ready` on stdout once bound, and runs until
it is killed; only the standard library, so it runs with any python3.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys

IP_PKTINFO = 8  # Linux; Python 3.11 has no socket.IP_PKTINFO
_IN_PKTINFO = struct.Struct("=I4s4s")  # ifindex, spec_dst, addr

RRQ, DATA, ACK = 1, 3, 4
CONTENT = b"ctfix tftp test file\n"


def _wildcard(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    sock.bind(("0.0.0.0", port))
    return sock


def _receive(sock: socket.socket) -> tuple[bytes, tuple[str, int], str]:
    """One request: payload, the client, and the local address it was sent to."""
    data, ancillary, _flags, client = sock.recvmsg(2048, socket.CMSG_SPACE(_IN_PKTINFO.size))
    destination = "0.0.0.0"
    for level, kind, value in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            destination = socket.inet_ntoa(_IN_PKTINFO.unpack(value[: _IN_PKTINFO.size])[2])
    return data, client, destination


def pktinfo_echo(port: int) -> None:
    sock = _wildcard(port)
    print("ready", flush=True)
    while True:
        data, client, destination = _receive(sock)
        info = _IN_PKTINFO.pack(0, socket.inet_aton(destination), bytes(4))
        sock.sendmsg([data], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, client)


def tftp(port: int, mode: str) -> None:
    sock = _wildcard(port)
    print("ready", flush=True)
    while True:
        data, client, destination = _receive(sock)
        if len(data) < 4 or struct.unpack(">H", data[:2])[0] != RRQ:
            continue
        transfer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        transfer.bind((destination if mode == "right" else "0.0.0.0", 0))
        transfer.settimeout(1.0)
        transfer.sendto(struct.pack(">HH", DATA, 1) + CONTENT, client)
        with contextlib.suppress(TimeoutError, ConnectionRefusedError):
            transfer.recvfrom(512)  # the client's ACK, to the new port
        transfer.close()


def tftp_get(
    server: str, port: int, filename: str = "file", timeout: float = 1.0
) -> tuple[bytes, tuple[str, int]] | None:
    """A read request from an unconnected socket (a TFTP client must accept the reply
    from a new port); the first DATA block and where it came from, ACKed; None when no
    answer came. Call it inside the client's namespace (`netns.entered`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        request = struct.pack(">H", RRQ) + filename.encode() + b"\0octet\0"
        sock.sendto(request, (server, port))
        try:
            data, peer = sock.recvfrom(1024)
        except (TimeoutError, ConnectionRefusedError):
            return None
        if len(data) < 4 or struct.unpack(">H", data[:2])[0] != DATA:
            return None
        sock.sendto(struct.pack(">HH", ACK, 1), peer)
        return data[4:], (peer[0], peer[1])
    finally:
        sock.close()


if __name__ == "__main__":
    if sys.argv[1] == "pktinfo-echo":
        pktinfo_echo(int(sys.argv[2]))
    elif sys.argv[1] == "tftp":
        tftp(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(f"unknown server {sys.argv[1]!r}")
