"""What proves the bug in the lab: the two conntrack entries and the client's ICMP.

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

from ctfix.core.addr import endpoint
from ctfix.lab import topology as t
from ctfix.lab.scenario import Check
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
        checks = [self._conntrack_check(port, ex)]
        hits = [
            u
            for u in self._unreachables(0.3)
            if u.reply.dport == client_port and u.reply.dst == client_addr
        ]
        if hits:
            sender, r = hits[0]
            seen = (
                f"ICMP port unreachable from {sender} for the reply "
                f"{endpoint(r.src, r.sport)} -> {endpoint(r.dst, r.dport)}"
            )
        else:
            seen = "no ICMP port unreachable seen"
        checks.append(
            Check(
                "the client rejects the reply it did not expect",
                "ICMP port unreachable from the client, about a reply from another address",
                seen,
                bool(hits) and hits[0].reply.src != ex.server[0],
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
