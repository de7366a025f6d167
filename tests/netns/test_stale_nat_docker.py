"""Stale NAT with a real Docker engine (Debian's docker.io 20.10, iptables-nft rules):
a published UDP port moves to a new container.

Measured here: on `docker rm`, Docker deletes the conntrack entries of the removed
container's address itself; but a one-way sender's datagrams in the gap before the
new container publishes the port make an entry that was never DNAT'd (it goes to the
host, where docker-proxy will listen), and it stays for as long as the sender sends
(moby 8795). Docker's rule matches on the input interface (`! -i docker0`), which
conntrack does not record: ctfix stands in the route to the client for it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ctfix.core.decode import CtEntry
from ctfix.lab import stale_nat as lab
from ctfix.lab.topology import CONTAINER_V4, UPLINK_V4, Topology, lab_topology
from ctfix.platform import conntrack, netns
from tests.netns.docker_engine import DockerEngine, docker_engine

PORT, SENDER = 5140, 40514


@pytest.fixture
def docker_lab() -> Iterator[tuple[Topology, DockerEngine]]:
    with lab_topology(ipv6=False, netfilter="nft") as topo, docker_engine(topo.host) as engine:
        yield topo, engine


def _sender_entry(topo: Topology) -> CtEntry | None:
    with netns.entered(topo.host):
        return next(
            (
                e for e in conntrack.dump(proto=17, port=PORT)
                if (e.orig.src, e.orig.sport) == (CONTAINER_V4, SENDER)
            ),
            None,
        )


def _until(what: str, check: object, seconds: float = 30.0) -> CtEntry:
    import time

    deadline = time.monotonic() + seconds
    while True:
        found = check()  # type: ignore[operator]  # a zero-argument callable
        if found:
            return found  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"not within {seconds:g} s: {what}"
        time.sleep(0.1)


def _ctfix(engine: DockerEngine, topo: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctfix", *args, "--netns", topo.host, "--json"],
        capture_output=True, text=True, timeout=120, env=engine.env(),
    )


def test_a_published_port_moved_to_a_new_container(
    docker_lab: tuple[Topology, DockerEngine],
) -> None:
    topo, engine = docker_lab
    engine.run("syslog-a", "sleep", "3600", publish=[f"{PORT}:{PORT}/udp"])
    old = engine.address_of("syslog-a")
    lab.start_sender(topo, SENDER, PORT)
    _until("the sender is DNAT'd to syslog-a",
           lambda: (e := _sender_entry(topo)) is not None and e.reply.src == old and e)
    engine.docker("rm", "-f", "syslog-a")
    # In the gap the sender's datagrams make an entry to the host itself.
    _until("an entry that was never DNAT'd",
           lambda: (e := _sender_entry(topo)) is not None and e.reply.src == UPLINK_V4 and e)
    engine.run("filler-2", "sleep", "3600")  # takes the freed address: the move is real
    engine.run("syslog-b", "sleep", "3600", publish=[f"{PORT}:{PORT}/udp"])
    new = engine.address_of("syslog-b")
    assert new != old

    explained = _ctfix(engine, topo, "explain", str(PORT))
    diagnosis = json.loads(explained.stdout)
    assert diagnosis["verdict"] == "broken", explained.stderr
    [stale] = diagnosis["stale_nat"]
    assert (stale["why"], stale["stale_target"], stale["current_targets"]) == (
        "never-natted", f"{UPLINK_V4}:{PORT}", [f"{new}:{PORT}"])
    assert stale["arrival"] == topo.bridge  # the lab's container network comes in by br0

    applied = _ctfix(engine, topo, "fix", str(PORT), "--method", "flush-stale", "--apply")
    assert json.loads(applied.stdout)["deleted"] == 1, applied.stderr
    _until("the sender's next entry goes to syslog-b",
           lambda: (e := _sender_entry(topo)) is not None and e.reply.src == new and e)
