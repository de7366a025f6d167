"""`ctfix serve` cannot be made to loop or to reflect (issue 9 item 5).

Two echo servers on the same port (two hosts each running `ctfix serve --port 7000`)
and one spoofed datagram from one's port to the other's bounced for ever. A
datagram from the server's own port, or from a port below 1024 (the classic
reflection targets: echo, chargen, DNS, NTP...), is dropped, with a log line.
"""

from __future__ import annotations

import socket
import struct
import sys
import tempfile
from collections.abc import Iterator
from typing import IO

import pytest

from ctfix.lab.topology import BRIDGE_V4, Topology, lab_topology, wait_udp_bound
from ctfix.platform import netns
from tests.netns.logs import wait_for_text

PORT = 7000


@pytest.fixture(params=[(), ("--broken",)], ids=["pktinfo", "broken"])
def two_servers(request: pytest.FixtureRequest) -> Iterator[tuple[Topology, IO[str]]]:
    """`ctfix serve --port 7000` in the host (also `--broken`: the lab's server) and in
    the container namespace; yields the topology and the host server's stderr."""
    with lab_topology() as topo, tempfile.NamedTemporaryFile("w+") as log:
        host = topo.spawn(
            topo.host,
            [sys.executable, "-m", "ctfix", "serve", "--port", str(PORT), *request.param],
            stderr=log.fileno(),
        )
        peer = topo.spawn(
            topo.container, [sys.executable, "-m", "ctfix", "serve", "--port", str(PORT)]
        )
        wait_udp_bound(host.pid, PORT)
        wait_udp_bound(peer.pid, PORT)
        # Count what reaches the container from the host's server.
        topo.run(topo.container, "nft", "-f", "-", stdin=(
            "table inet count {\n chain input {\n  type filter hook input priority 0;\n"
            f"  udp sport {PORT} counter\n }}\n}}\n"
        ))
        yield topo, log


def _spoof(topo: Topology, source_port: int) -> None:
    """One datagram from the container's address and source_port, by hand (a raw
    socket: the container's server holds port 7000)."""
    with netns.entered(topo.container):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    try:
        raw.sendto(struct.pack("!HHHH", source_port, PORT, 8 + 4, 0) + b"loop", (BRIDGE_V4, 0))
    finally:
        raw.close()


def _replies_to_container(topo: Topology) -> int:
    listed = topo.run(topo.container, "nft", "list", "table", "inet", "count")
    return int(listed.split("counter packets ")[1].split()[0])


@pytest.mark.parametrize(
    ("source_port", "why"),
    [(PORT, "this server's own port"), (53, "below 1024")],
)
def test_a_datagram_that_could_loop_or_reflect_is_not_answered(
    two_servers: tuple[Topology, IO[str]], source_port: int, why: str
) -> None:
    topo, log = two_servers
    _spoof(topo, source_port)
    wait_for_text(log, why)
    assert _replies_to_container(topo) == 0
