"""Raw ICMP/ICMPv6 sockets that see clients reject UDP replies (port unreachable).

A client that `connect()`ed drops a reply from the wrong source and answers it with
ICMP port unreachable; seeing that message is the proof (`confirmed`) that a
wrong-source reply was lost. A raw socket gets a copy of every ICMP message the
namespace receives; no netfilter rule is involved.

Know before changing: the IPv4 socket delivers the IP header too; the ICMPv6
socket does not (it starts at the ICMPv6 header) and is narrowed with ICMP6_FILTER
to destination-unreachable messages. The quoted packet is the reply as the server
sent it (src = the actual source, dst = the client).
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

ICMP6_FILTER = 1
ICMP_DEST_UNREACH = 3
ICMP_PORT_UNREACH = 3
ICMP6_DST_UNREACH = 1
ICMP6_DST_UNREACH_NOPORT = 4


class Rejected(NamedTuple):
    """The UDP datagram a client rejected: its source (server) and destination."""

    src: str
    sport: int
    dst: str
    dport: int


def parse_icmp4(packet: bytes) -> Rejected | None:
    """IPv4 packet (with header) carrying ICMP port unreachable for a UDP datagram."""
    try:
        ihl = (packet[0] & 0x0F) * 4
        icmp = packet[ihl:]
        if icmp[0] != ICMP_DEST_UNREACH or icmp[1] != ICMP_PORT_UNREACH:
            return None
        inner = icmp[8:]
        inner_ihl = (inner[0] & 0x0F) * 4
        if inner[0] >> 4 != 4 or inner[9] != socket.IPPROTO_UDP:
            return None
        sport, dport = struct.unpack_from(">HH", inner, inner_ihl)
        return Rejected(
            socket.inet_ntop(socket.AF_INET, inner[12:16]),
            sport,
            socket.inet_ntop(socket.AF_INET, inner[16:20]),
            dport,
        )
    except (IndexError, struct.error, ValueError):
        return None


def parse_icmp6(message: bytes) -> Rejected | None:
    """ICMPv6 message (no IPv6 header) carrying port unreachable for a UDP datagram."""
    try:
        if message[0] != ICMP6_DST_UNREACH or message[1] != ICMP6_DST_UNREACH_NOPORT:
            return None
        inner = message[8:]
        if inner[0] >> 4 != 6 or inner[6] != socket.IPPROTO_UDP:
            return None  # extension headers before UDP: not worth following here
        sport, dport = struct.unpack_from(">HH", inner, 40)
        return Rejected(
            socket.inet_ntop(socket.AF_INET6, inner[8:24]),
            sport,
            socket.inet_ntop(socket.AF_INET6, inner[24:40]),
            dport,
        )
    except (IndexError, struct.error, ValueError):
        return None


class IcmpWatch:
    """One raw socket per family; `read(sock)` returns what a readable socket had."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.v4 = self._open(socket.AF_INET, socket.IPPROTO_ICMP)
        self.v6 = self._open(socket.AF_INET6, socket.IPPROTO_ICMPV6)
        if self.v6 is not None:
            # Block every ICMPv6 type except destination unreachable (bit set = block).
            blocked = bytearray(b"\xff" * 32)
            blocked[ICMP6_DST_UNREACH >> 3] &= ~(1 << (ICMP6_DST_UNREACH & 7)) & 0xFF
            self.v6.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, bytes(blocked))

    def _open(self, family: int, proto: int) -> socket.socket | None:
        try:
            sock = socket.socket(family, socket.SOCK_RAW, proto)
        except OSError:
            return None  # no CAP_NET_RAW or no IPv6: `confirmed` just stays false
        sock.setblocking(False)
        self.sockets.append(sock)
        return sock

    def read(self, sock: socket.socket) -> list[Rejected]:
        found = []
        parse = parse_icmp4 if sock is self.v4 else parse_icmp6
        for _ in range(64):
            try:
                packet = sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            rejected = parse(packet)
            if rejected is not None:
                found.append(rejected)
        return found

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
