"""What proves the bug in the lab: the two conntrack entries and the client's ICMP.

Know before changing: the ICMP sockets must be open *before* the client sends,
because a raw socket only sees packets that arrive while it exists; they are
opened in the host namespace, where the client's port-unreachable arrives.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from dataclasses import dataclass
from types import TracebackType

from ctfix.core.addr import endpoint
from ctfix.lab import topology as t
from ctfix.lab.scenario import Check
from ctfix.platform import netns

ICMP_DEST_UNREACH, ICMP_PORT_UNREACH = 3, 3
ICMP6_DST_UNREACH, ICMP6_DST_UNREACH_NOPORT = 1, 4


@dataclass(frozen=True, slots=True)
class PortUnreachable:
    """An ICMP port unreachable: who sent it, about which UDP datagram."""

    sender: str
    inner_src: str
    inner_dst: str
    inner_sport: int
    inner_dport: int


def parse_icmp4(packet: bytes) -> PortUnreachable | None:
    """Parse an IPv4 packet as read from a raw ICMP socket (IP header included)."""
    try:
        ihl = (packet[0] & 0x0F) * 4
        sender = socket.inet_ntoa(packet[12:16])
        icmp = packet[ihl:]
        if icmp[0] != ICMP_DEST_UNREACH or icmp[1] != ICMP_PORT_UNREACH:
            return None
        inner = icmp[8:]
        inner_ihl = (inner[0] & 0x0F) * 4
        if inner[9] != socket.IPPROTO_UDP:
            return None
        sport, dport = struct.unpack_from("!HH", inner, inner_ihl)
        return PortUnreachable(
            sender, socket.inet_ntoa(inner[12:16]), socket.inet_ntoa(inner[16:20]), sport, dport
        )
    except (IndexError, struct.error, OSError):
        return None


def parse_icmp6(message: bytes, sender: str) -> PortUnreachable | None:
    """Parse an ICMPv6 message as read from a raw ICMPv6 socket (no IPv6 header)."""
    try:
        if message[0] != ICMP6_DST_UNREACH or message[1] != ICMP6_DST_UNREACH_NOPORT:
            return None
        inner = message[8:]
        if inner[6] != socket.IPPROTO_UDP:
            return None
        src = str(ipaddress.IPv6Address(inner[8:24]))
        dst = str(ipaddress.IPv6Address(inner[24:40]))
        sport, dport = struct.unpack_from("!HH", inner, 40)
        return PortUnreachable(sender.split("%")[0], src, dst, sport, dport)
    except (IndexError, struct.error, ValueError):
        return None


class LabEvidence:
    """Open in the host namespace around the broken server's exchanges."""

    def __init__(self, topo: t.Topology) -> None:
        self.topo = topo
        self.sockets: list[socket.socket] = []

    def __enter__(self) -> LabEvidence:
        with netns.entered(self.topo.host):
            self.sockets.append(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
            if self.topo.ipv6:
                self.sockets.append(
                    socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
                )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    def _unreachables(self, wait: float) -> list[PortUnreachable]:
        found: list[PortUnreachable] = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(self.sockets, [], [], left)
            if not ready:
                break
            for sock in ready:
                data, peer = sock.recvfrom(65535)
                if sock.family == socket.AF_INET:
                    hit = parse_icmp4(data)
                else:
                    hit = parse_icmp6(data, peer[0])
                if hit is not None:
                    found.append(hit)
        return found

    def checks(self, port: int, ex: t.Exchange) -> list[Check]:
        """Checks for one exchange that went unanswered: conntrack, then ICMP."""
        client_addr, client_port = ex.client
        checks = [self._conntrack_check(port, ex)]
        hits = [
            u
            for u in self._unreachables(0.3)
            if u.inner_dport == client_port and u.inner_dst == client_addr
        ]
        if hits:
            u = hits[0]
            seen = (
                f"ICMP port unreachable from {u.sender} for the reply "
                f"{endpoint(u.inner_src, u.inner_sport)} -> {endpoint(u.inner_dst, u.inner_dport)}"
            )
        else:
            seen = "no ICMP port unreachable seen"
        checks.append(
            Check(
                "the client rejects the reply it did not expect",
                "ICMP port unreachable from the client, about a reply from another address",
                seen,
                bool(hits) and hits[0].inner_src != ex.server[0],
            )
        )
        return checks

    def _conntrack_check(self, port: int, ex: t.Exchange) -> Check:
        from ctfix.platform.conntrack import dump
        from ctfix.render.conntrack import conntrack_line

        client_addr, client_port = ex.client
        with netns.entered(self.topo.host):
            entries = [*dump(port=port), *dump(sport=port)]
        request = reply = None
        for entry in entries:
            o = entry.orig
            if (o.src, o.sport, o.dst, o.dport) == (client_addr, client_port, ex.server[0], port):
                request = entry
            elif o.dport == client_port and o.dst == client_addr and o.sport == port:
                reply = entry
        lines = [
            f"{label} {conntrack_line(entry) if entry else '(not found)'}"
            for label, entry in (("request", request), ("reply  ", reply))
        ]
        ok = request is not None and reply is not None and reply.orig.src != ex.server[0]
        seen = (
            f"a new flow from {endpoint(reply.orig.src, reply.orig.sport)}, not "
            f"{endpoint(ex.server[0], port)}"
            if reply is not None
            else "no second flow"
        )
        return Check(
            "conntrack in the host namespace",
            "the request, then the reply filed as a NEW flow from another address",
            seen,
            ok,
            tuple(lines),
        )
