"""The current namespace's own addresses, kept up to date from rtnetlink events.

`LocalAddresses` lists the addresses once (`ctfix.platform.routing.local_addresses`,
the dump explain uses) and holds a raw NETLINK_ROUTE socket subscribed to IPv4/IPv6
address events; when that socket becomes readable, `refresh()` drains it and lists
the addresses again. Watch uses the set to say whether a wrong-source reply came from
another address *of the same host*, and whether a flow's client is remote.

Know before changing: create it after entering the watched namespace (netlink
sockets stay in the namespace they were created in). Only the *local* end of an
address counts: on a point-to-point link (WireGuard, ppp, GRE, `ip addr add A peer
P`) IFA_ADDRESS is the peer, a remote client. Addresses are compared as strings in
the form inet_ntop prints them (what the decoder produces). `networks` is the same
listing's client networks (ctfix.core.clientnet), what findings are grouped by.
"""

from __future__ import annotations

import socket

from ctfix.core.clientnet import ClientNetworks, connected

RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


def list_addresses() -> frozenset[str]:
    """Every address configured in the current network namespace (local ends only)."""
    return _listing()[0]


def _listing() -> tuple[frozenset[str], ClientNetworks]:
    """The namespace's addresses and its client networks, from one dump."""
    from ctfix.platform import routing

    found = routing.local_addresses()
    networks = connected((a.address, a.prefixlen, a.interface, a.scope) for a in found)
    return frozenset(a.address for a in found), ClientNetworks(networks)


class LocalAddresses:
    """The namespace's addresses, refreshed whenever the kernel announces a change."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self.sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self.sock.setblocking(False)
            # Subscribe first, then list: a change in between is announced, not lost.
            self.addresses, self.networks = _listing()
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def refresh(self) -> bool:
        """Drain pending events and re-list; True when the set changed."""
        while True:
            try:
                self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:
                break  # ENOBUFS: we re-list anyway
        new, networks = _listing()
        changed = new != self.addresses or networks.networks != self.networks.networks
        self.addresses, self.networks = new, networks
        return changed

    def close(self) -> None:
        self.sock.close()
