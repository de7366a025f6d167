"""What proves the bug in the lab: the two conntrack entries and the client's ICMP,
gathered as data (ctfix.lab.checks); ctfix.render.lab says it in words.

Know before changing: the ICMP sockets must be open *before* the client sends,
because a raw socket only sees packets that arrive while it exists; they are
opened in the host namespace, where the client's port-unreachable arrives.
"""

from __future__ import annotations

import select
import socket
import time
from types import TracebackType
from typing import NamedTuple

from ctfix.lab import topology as t
from ctfix.lab.checks import Check, ConntrackCheck, IcmpCheck
from ctfix.platform import icmp, netns


class PortUnreachable(NamedTuple):
    """An ICMP port unreachable: who sent it, about which UDP datagram (the reply)."""

    sender: str
    reply: icmp.Rejected


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
                parse = icmp.parse_icmp4 if sock.family == socket.AF_INET else icmp.parse_icmp6
                reply = parse(data)
                if reply is not None:
                    found.append(PortUnreachable(peer[0].split("%")[0], reply))
        return found

    def checks(self, port: int, ex: t.Exchange) -> list[Check]:
        """Checks for one exchange that went unanswered: conntrack, then ICMP."""
        client_addr, client_port = ex.client
        conntrack = self._conntrack_check(port, ex)
        hits = [
            u
            for u in self._unreachables(0.3)
            if u.reply.dport == client_port and u.reply.dst == client_addr
        ]
        sender, rejected = hits[0] if hits else (None, None)
        return [conntrack, IcmpCheck(ex.server[0], sender, rejected)]

    def _conntrack_check(self, port: int, ex: t.Exchange) -> ConntrackCheck:
        from ctfix.platform.conntrack import dump

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
        return ConntrackCheck(port, ex.server[0], request, reply)
