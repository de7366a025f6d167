"""Raw ICMP/ICMPv6 sockets that see clients reject UDP replies (port unreachable).

A client that `connect()`ed drops a reply from the wrong source and answers it with
ICMP port unreachable; seeing that message is the proof (`confirmed`) that a
wrong-source reply was lost. A raw socket gets a copy of every ICMP message the
namespace receives; no netfilter rule is involved.

`SentUnreachable` sees the other direction: the port unreachable messages the
namespace *sends* (a request came to a port nothing is bound to), which confirm the
unanswered detector's `no-socket`. A raw ICMP socket never sees locally generated
ICMP (measured), so this is a packet socket on every interface that takes outgoing
packets only, narrowed in the kernel to ICMP(v6) port unreachable.

Know before changing: the IPv4 socket delivers the IP header too; the ICMPv6
socket does not (it starts at the ICMPv6 header) and is narrowed with ICMP6_FILTER
to destination-unreachable messages. The quoted packet is the reply as the server
sent it (src = the actual source, dst = the client). A packet socket that takes
outgoing packets makes the kernel clone every packet the namespace transmits before
the filter runs: watch opens `SentUnreachable` only once a flow was found unanswered
with nothing bound, never on a host where everything answers.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from ctfix.platform import bpf

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


# -- port unreachable sent by this namespace ---------------------------------------------

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4
_SKF_AD_OFF = -0x1000
_SKF_AD_PROTOCOL = 0
_SKF_AD_PKTTYPE = 4


def _bpf_sent_unreachable() -> bytes:
    """Classic BPF over a cooked packet (it starts at the IP header): outgoing ICMP
    port unreachable, or ICMPv6 port unreachable right after the IPv6 header."""
    ld_w_abs, ld_b_abs, ldx_msh, ld_b_ind, jeq, ret = 0x20, 0x30, 0xB1, 0x50, 0x15, 0x06
    program = [
        (ld_w_abs, 0, 0, (_SKF_AD_OFF + _SKF_AD_PKTTYPE) & 0xFFFFFFFF),
        (jeq, 0, 15, PACKET_OUTGOING),  # -> reject
        (ld_w_abs, 0, 0, (_SKF_AD_OFF + _SKF_AD_PROTOCOL) & 0xFFFFFFFF),
        (jeq, 0, 7, ETH_P_IP),  # -> v6 test
        (ld_b_abs, 0, 0, 9),  # IPv4 protocol
        (jeq, 0, 11, socket.IPPROTO_ICMP),
        (ldx_msh, 0, 0, 0),  # X = IPv4 header length
        (ld_b_ind, 0, 0, 0),  # ICMP type
        (jeq, 0, 8, ICMP_DEST_UNREACH),
        (ld_b_ind, 0, 0, 1),  # ICMP code
        (jeq, 5, 6, ICMP_PORT_UNREACH),  # -> accept / reject
        (jeq, 0, 5, ETH_P_IPV6),
        (ld_b_abs, 0, 0, 6),  # IPv6 next header
        (jeq, 0, 3, socket.IPPROTO_ICMPV6),
        (ld_b_abs, 0, 0, 41),  # ICMPv6 code (type at 40)
        (jeq, 0, 1, ICMP6_DST_UNREACH_NOPORT),
        (ret, 0, 0, 256),  # accept: enough for the quoted headers
        (ret, 0, 0, 0),
    ]
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in program)


class SentUnreachable:
    """Port unreachable messages this namespace sends; `read()` returns the rejected
    requests (src = the client, dst = the address:port it sent to)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        try:
            bpf.attach(self.sock, _bpf_sent_unreachable())
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[Rejected]:
        found = []
        for _ in range(256):
            try:
                packet, address = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            protocol = address[1] if len(address) > 1 else 0
            if protocol == ETH_P_IP:
                rejected = parse_icmp4(packet)
            elif protocol == ETH_P_IPV6 and len(packet) > 48 and packet[6] == 58:
                rejected = parse_icmp6(packet[40:])
            else:
                rejected = None
            if rejected is not None:
                found.append(rejected)
        return found

    def close(self) -> None:
        self.sock.close()
