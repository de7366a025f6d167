"""Many small namespaces at once, a few of them with a broken UDP service: what
`--all-netns` is tested and measured against (tests/netns, bench/).

    bK-srv  lo 198.51.100.13/32 (the address clients use)   for each broken K
            eth0 192.0.2.1/24   a wildcard socat on PORT, conntrack on
       |  (veth)
    bK-cli  eth0 192.0.2.3/24, 198.51.100.13 via 192.0.2.1; asks 198.51.100.13:PORT
            and the reply comes from 192.0.2.1 (wrong source, in bK-srv's conntrack)

    okN     a pair with a socat bound to 203.0.113.1 only (answers from it: ok)
    pN      the rest: loopback up and a veth to the next one, nothing listening

Know before changing: as in ctfix.lab.topology, every interface is made inside a
namespace of this run (named `ctfix-<run>-<role>`), only documentation ranges are
used, and `built()` always removes everything. The broken servers' UDP conntrack
timeout is raised so the evidence outlives a slow scan of many namespaces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from ctfix.lab.topology import (
    Namespaces,
    built,
    new_run_id,
    require_tools,
    udp_exchange,
    wait_udp_bound,
)

SERVICE_V4 = "198.51.100.13"  # the broken server's address its clients use
SERVER_V4 = "192.0.2.1"  # its address on the clients' link (the reply's source)
CLIENT_V4 = "192.0.2.3"
OK_V4 = "203.0.113.1"
#: the broken services' port (below the ephemeral range, as a server's)
BROKEN_PORT = 20201
OK_PORT = 20202

_TRACKING = (
    "table ip ctfix_fleet {\n chain pre {\n"
    "  type filter hook prerouting priority 0; policy accept;\n  ct state new counter\n }\n}\n"
)


@dataclass
class Fleet(Namespaces):
    """`count` namespaces: `broken` server/client pairs, one ok pair, the rest plain."""

    count: int
    broken: int

    @property
    def broken_servers(self) -> tuple[str, ...]:
        return tuple(self.name(f"b{k}-srv") for k in range(self.broken))

    def broken_client(self, k: int) -> str:
        return self.name(f"b{k}-cli")

    @property
    def ok_server(self) -> str:
        return self.name("ok-srv")

    @property
    def namespaces(self) -> tuple[str, ...]:
        servers = self.broken_servers
        pairs = [ns for k in range(self.broken) for ns in (servers[k], self.broken_client(k))]
        pairs += [self.ok_server, self.name("ok-cli")]
        plain = [self.name(f"p{index:02d}") for index in range(max(self.count - len(pairs), 0))]
        return (*pairs, *plain)

    def build(self) -> None:
        require_tools("ip", "sysctl", "nft", "socat")
        self.create_namespaces()
        names = self.namespaces
        for ns in names:
            self.ip(ns, "link set lo up\n")
        for k, server in enumerate(self.broken_servers):
            client = self.broken_client(k)
            self.veth(server, "eth0", client, "eth0")
            self.ip(server, f"addr add {SERVER_V4}/24 dev eth0\naddr add {SERVICE_V4}/32 dev lo\n")
            self.ip(
                client,
                f"addr add {CLIENT_V4}/24 dev eth0\nroute add {SERVICE_V4}/32 via {SERVER_V4}\n",
            )
            self.run(server, "nft", "-f", "-", stdin=_TRACKING)
            self.run(server, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
        self.veth(self.ok_server, "eth0", self.name("ok-cli"), "eth0")
        self.ip(self.ok_server, f"addr add {OK_V4}/24 dev eth0\n")
        plain = names[2 * self.broken + 2 :]
        for left, right in zip(plain[::2], plain[1::2], strict=False):
            self.veth(left, "eth0", right, "eth0")

    def start_services(self) -> None:
        """The wildcard servers (broken) and the bound one (ok), each ready on return."""
        for server in self.broken_servers:
            socat = self.spawn(server, ["socat", f"UDP4-RECVFROM:{BROKEN_PORT},fork", "EXEC:cat"])
            wait_udp_bound(socat.pid, BROKEN_PORT)
        bound = f"UDP4-RECVFROM:{OK_PORT},bind={OK_V4},fork"
        socat = self.spawn(self.ok_server, ["socat", bound, "EXEC:cat"])
        wait_udp_bound(socat.pid, OK_PORT, address=OK_V4)

    def ask_broken(self) -> None:
        """Each broken server's client asks once; no answer comes (wrong source)."""
        for k in range(self.broken):
            exchange = udp_exchange(self.broken_client(k), SERVICE_V4, BROKEN_PORT, timeout=0.5)
            if exchange.answered:
                raise AssertionError(f"{self.broken_servers[k]} answered from the right source")


@contextlib.contextmanager
def fleet_topology(count: int = 50, broken: int = 3, run_id: str | None = None) -> Iterator[Fleet]:
    """Build `count` namespaces with `broken` wrong-source services running and asked,
    yield them, and always tear them down."""
    with built(Fleet(run_id or new_run_id(), count=count, broken=broken)) as fleet:
        fleet.start_services()
        fleet.ask_broken()
        yield fleet
