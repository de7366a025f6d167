"""`ctfix watch --track` leaves no table behind on any catchable signal, and the
next watch removes what a `kill -9` left (issue 9 item 4).

A leftover table still switches conntrack on: counted as "this namespace tracks",
it would hide from the next watch that it is blind once the table is gone. So the
next watch removes a dead watch's table first, says so, and only then looks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from ctfix.lab.topology import Topology, lab_topology
from ctfix.platform import watchtables
from tests.netns.test_watch import WATCH, _watching


@pytest.fixture
def lab_v6_untracked() -> Iterator[Topology]:
    with lab_topology(ipv6=True, netfilter="nft") as topo:
        topo.run(topo.host, "nft", "delete", "table", "ip6", "ctfix_lab")
        yield topo


def _watch_tables(topo: Topology) -> list[str]:
    listed = topo.run(topo.host, "nft", "list", "tables").split()
    return [word for word in listed if word.startswith(watchtables.PREFIX)]


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1])
def test_any_catchable_signal_removes_the_track_table(
    lab_v6_untracked: Topology, signum: int
) -> None:
    topo = lab_v6_untracked
    with _watching(topo, "--track") as watch:
        assert _watch_tables(topo)
        watch.send_signal(signum)
        watch.communicate(timeout=20)
        assert watch.returncode == 0, watch.stderr()
    assert _watch_tables(topo) == []


def test_the_next_watch_removes_what_a_kill_9_left_and_is_not_fooled_by_it(
    lab_v6_untracked: Topology,
) -> None:
    topo = lab_v6_untracked
    with _watching(topo, "--track") as watch:
        [left] = _watch_tables(topo)
        os.kill(watch.proc.pid, signal.SIGKILL)
        watch.proc.wait()
    assert _watch_tables(topo) == [left]
    # A table named for a live pid (this test's) that started at another time: the
    # pid was reused, the watch that made it is gone.
    reused = f"{watchtables.PREFIX}{os.getpid()}_1_{os.stat('/proc/self/ns/pid').st_ino}"
    topo.run(topo.host, "nft", "add", "table", "ip6", reused)

    after = subprocess.run(
        [*WATCH, "--netns", topo.host, "--duration", "0.2"],
        capture_output=True, text=True, timeout=30,
    )
    assert after.returncode == 0, after.stderr
    assert _watch_tables(topo) == []
    notes = [line for line in after.stderr.splitlines() if "no longer runs" in line]
    assert len(notes) == 2, after.stderr  # one per table (the kill -9 one is ip and ip6)
    assert left in after.stderr and reused in after.stderr
    # Not counted as tracking: without the leftover, IPv6 is not tracked here.
    assert "IPv6 is not tracked" in after.stderr


def test_a_live_watch_table_is_left_alone_and_not_counted_as_tracking(
    lab_v6_untracked: Topology,
) -> None:
    topo = lab_v6_untracked
    with _watching(topo, "--track") as first:
        [theirs] = _watch_tables(topo)
        second = subprocess.run(
            [*WATCH, "--netns", topo.host, "--duration", "0.2"],
            capture_output=True, text=True, timeout=30,
        )
        assert second.returncode == 0, second.stderr
        assert _watch_tables(topo) == [theirs]
        assert f"pid {first.proc.pid}" in second.stderr and "add --track" in second.stderr
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=20)
    deadline = time.monotonic() + 10
    while _watch_tables(topo) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _watch_tables(topo) == []
