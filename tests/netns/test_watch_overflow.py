"""`ctfix watch` when the kernel drops conntrack events (ENOBUFS), for real.

The watch runs with a small event receive buffer (the test-only CTFIX_WATCH_RCVBUF)
and is stopped with SIGSTOP while a burst of new UDP flows goes through the lab's
host namespace, so the kernel must drop events; a wrong-source reply made while it
is stopped is lost with them. After SIGCONT the watch has to notice the loss, rebuild
its state from a dump (finding the lost reply there, and not counting again the one
it had already reported), say so (summary, metric, warning line) and go on: a
wrong-source reply after the burst is still reported.

Know before changing: the broken servers are plain sockets of this process (bound
to 0.0.0.0 in the host namespace, answering with sendto(), so the kernel picks the
bridge address: the bug); everything stays in the namespaces the test built.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from bench.flows import blast
from ctfix.lab.topology import BRIDGE_V4, CONTAINER_V4, UPLINK_V4, Topology
from ctfix.platform import netns
from tests.netns.logs import JsonLines

BURST = 4000  # flows; each event is ~1 KiB of receive buffer, the buffer ~128 KiB
SMALL_RCVBUF = 64 << 10
METRICS_PORT = 9464


class Watch:
    """`ctfix watch --json` of the lab's host namespace, its lines collected as they
    come. Started in the lab's upstream namespace: --metrics listen where ctfix was
    started, and a test's traffic stays in namespaces of its own."""

    def __init__(self, topo: Topology, *extra: str) -> None:
        env = dict(os.environ, CTFIX_WATCH_RCVBUF=str(SMALL_RCVBUF))
        self.proc = subprocess.Popen(
            topo.exec_argv(
                topo.upstream,
                [sys.executable, "-m", "ctfix", "watch", "--netns", topo.host, "--json", *extra],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        self.lines = JsonLines(self.proc.stdout)
        self.records = self.lines.records
        self._stderr: str | None = None

    def finding_for(self, port: int, timeout: float) -> dict[str, Any] | None:
        """The first finding line for service UPLINK_V4:port, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for record in list(self.records):
                if record["kind"] == "wrong-source-reply" and record["service"].endswith(
                    f":{port}"
                ):
                    return record
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return None
            time.sleep(0.02)

    def stop(self) -> tuple[list[dict[str, Any]], str]:
        """SIGTERM; return every record printed and stderr (again on later calls)."""
        if self._stderr is not None:
            return list(self.records), self._stderr
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.lines.join(timeout=5)
        assert self.proc.stderr is not None
        self._stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        return list(self.records), self._stderr


class BrokenServers:
    """UDP services on 0.0.0.0:port in the host namespace that answer from the wrong
    address, and connected clients in the container that ask them."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.sockets: list[socket.socket] = []

    def serve(self, port: int) -> socket.socket:
        with netns.entered(self.topo.host):
            server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sockets.append(server)
        server.settimeout(1.0)
        server.bind(("0.0.0.0", port))
        return server

    def wrong_source_reply(self, server: socket.socket) -> tuple[str, int]:
        """One request to UPLINK_V4 and its reply from BRIDGE_V4; the client's address."""
        with netns.entered(self.topo.container):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sockets.append(client)
        client.connect((UPLINK_V4, server.getsockname()[1]))
        client.send(b"ctfix-overflow")
        data, peer = server.recvfrom(2048)
        server.sendto(data, peer)
        address: tuple[str, int] = client.getsockname()
        return address

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def servers(lab: Topology) -> Iterator[BrokenServers]:
    broken = BrokenServers(lab)
    try:
        yield broken
    finally:
        broken.close()


def _lost_metric(topo: Topology, timeout: float) -> float:
    """ctfix_watch_lost_events_total as scraped from the loopback of the namespace
    watch was started in (the lab's upstream)."""
    deadline = time.monotonic() + timeout
    value = 0.0
    while time.monotonic() < deadline:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        # urllib connects in this thread, so inside the namespace.
        with netns.entered(topo.upstream), urllib.request.urlopen(url, timeout=1) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("ctfix_watch_lost_events_total{"):
                value = float(line.rsplit(" ", 1)[1])
        if value > 0:
            return value
        time.sleep(0.2)
    return value


def test_overflow_is_counted_resynced_reported_and_watching_goes_on(
    lab: Topology, servers: BrokenServers
) -> None:
    before, during, after = servers.serve(7101), servers.serve(7102), servers.serve(7103)
    watch = Watch(lab, "--metrics", f"127.0.0.1:{METRICS_PORT}")
    try:
        # Ready when a wrong-source reply is reported (start-up takes a second or so).
        replies_before = 0
        while True:
            servers.wrong_source_reply(before)
            replies_before += 1
            if watch.finding_for(7101, timeout=0.5) is not None:
                break
            assert replies_before < 20, watch.stop()

        watch.proc.send_signal(signal.SIGSTOP)
        try:
            blast(lab.container, CONTAINER_V4, UPLINK_V4, BURST, (7, 9))
            # The buffer is full by now: this reply's events are dropped too.
            lost_client = servers.wrong_source_reply(during)
        finally:
            watch.proc.send_signal(signal.SIGCONT)

        # Found again only by the resync's dump.
        recovered = watch.finding_for(7102, timeout=5)
        assert recovered is not None, watch.stop()
        assert recovered["client"] == f"{lost_client[0]}:{lost_client[1]}"
        assert recovered["actual_source"] == f"{BRIDGE_V4}:7102"
        assert _lost_metric(lab, timeout=3) > 0

        later_client = servers.wrong_source_reply(after)
        later = watch.finding_for(7103, timeout=3)
        records, stderr = watch.stop()
    finally:
        watch.stop()

    assert watch.proc.returncode == 0, stderr
    assert later is not None, stderr
    assert later["client"] == f"{later_client[0]}:{later_client[1]}"
    assert (later["expected_source"], later["actual_source"]) == (
        f"{UPLINK_V4}:7103",
        f"{BRIDGE_V4}:7103",
    )
    summary = records[-1]
    assert summary["kind"] == "summary"
    assert summary["lost"] > 0 and summary["resyncs"] >= 1
    # Some of the burst's flows were seen as events, not all of them.
    assert summary["new_flows"] < BURST
    warnings = [line for line in stderr.splitlines() if "dropped conntrack events" in line]
    assert warnings and warnings[0].startswith("ctfix watch: warning:")
    # The last record of each finding carries its count: every wrong-source reply
    # exactly once, the ones the dump showed again included. A reply made before watch
    # subscribed is in its own, existing, finding (history, apart from the news).
    last = {
        (r["service"], r["existing"]): r["count"]
        for r in records
        if r["kind"] == "wrong-source-reply"
    }
    assert {(f"{UPLINK_V4}:7102", False), (f"{UPLINK_V4}:7103", False)} <= set(last)
    # The burst's requests that went unanswered are findings too (test_unanswered.py).
    silent = {
        (r["service"], r["reason"], r["existing"]) for r in records if r["kind"] == "unanswered"
    }
    news = sum(1 for *_key, existing in silent if not existing)
    assert summary["findings"] == news + sum(1 for _service, existing in last if not existing)
    assert summary["existing"] == len(silent) - news + sum(1 for _s, existing in last if existing)
    final: dict[str, int] = {}
    for (service, _existing), count in last.items():
        final[service] = final.get(service, 0) + count
    assert final == {
        f"{UPLINK_V4}:7101": replies_before,
        f"{UPLINK_V4}:7102": 1,
        f"{UPLINK_V4}:7103": 1,
    }
