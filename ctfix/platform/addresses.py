"""The current namespace's own addresses, kept up to date from rtnetlink events.

`LocalAddresses` lists the addresses once (pyroute2) and holds a raw NETLINK_ROUTE
socket subscribed to IPv4/IPv6 address events; when that socket becomes readable,
`refresh()` drains it and lists the addresses again. Watch uses the set to say
whether a wrong-source reply came from another address *of the same host*.

Know before changing: create it after entering the watched namespace (netlink
sockets stay in the namespace they were created in). Addresses are compared as
strings in the form `ipaddress` prints them (what the decoder produces).
"""

from __future__ import annotations

import socket
from typing import Any

RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


def list_addresses() -> frozenset[str]:
    """Every address configured in the current network namespace."""
    from pyroute2 import IPRoute

    found: set[str] = set()
    with IPRoute() as ipr:
        messages: Any = ipr.get_addr()
        for msg in messages:
            for attr in ("IFA_LOCAL", "IFA_ADDRESS"):
                value = msg.get_attr(attr)
                if value:
                    found.add(str(value).split("%", 1)[0])
    return frozenset(found)


class LocalAddresses:
    """The namespace's addresses, refreshed whenever the kernel announces a change."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        self.sock.setblocking(False)
        # Subscribe first, then list: a change in between is announced, not lost.
        self.addresses = list_addresses()

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
        new = list_addresses()
        changed = new != self.addresses
        self.addresses = new
        return changed

    def close(self) -> None:
        self.sock.close()
