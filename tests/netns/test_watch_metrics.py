"""`ctfix watch --metrics` listens where ctfix was started, not in --netns, and a
client cannot hold it (issue 9 item 10); stale NAT entries and unanswered requests
reach it (QA F24).

ctfix is started in the lab's container namespace (standing for the host an operator
runs it on) and watches the lab's host namespace: the metrics answer in the first and
nothing listens in the second. Idle connections are closed, connections beyond the
limit get 503 at once, a non-loopback address is warned about.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO

import pytest

from ctfix.lab import stale_nat as stale_lab
from ctfix.lab.topology import UPLINK_V4, Topology, lab_topology, udp_exchange
from ctfix.platform import conntrack, metrics, netns
from tests.netns.logs import wait_for_text

PORT = 9464


@contextlib.contextmanager
def _watch(address: str) -> Iterator[tuple[Topology, IO[str]]]:
    """watch --netns HOST --metrics ADDRESS:9464, started in the container ns and
    ready; yields the topology and watch's stderr."""
    with lab_topology() as topo, tempfile.NamedTemporaryFile("w+") as log:
        topo.spawn(
            topo.container,
            [sys.executable, "-m", "ctfix", "watch", "--netns", topo.host,
             "--metrics", f"{address}:{PORT}"],
            stderr=log.fileno(),
        )
        wait_for_text(log, "ctfix watch: watching ")
        yield topo, log


@pytest.fixture
def watching() -> Iterator[tuple[Topology, IO[str]]]:
    with _watch("127.0.0.1") as started:
        yield started


def _connect(ns: str) -> socket.socket:
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(30)
    try:
        sock.connect(("127.0.0.1", PORT))
    except OSError:
        sock.close()
        raise
    return sock


def _get(ns: str) -> bytes:
    sock = _connect(ns)
    try:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        sock.close()


def test_metrics_listen_where_ctfix_was_started(watching: tuple[Topology, IO[str]]) -> None:
    topo, log = watching
    assert b"ctfix_watch_events" in _get(topo.container)
    with pytest.raises(ConnectionRefusedError):
        _connect(topo.host)
    assert "warning: --metrics" not in wait_for_text(log, "Prometheus metrics on")


def test_idle_connections_are_closed_and_their_number_is_bounded(
    watching: tuple[Topology, IO[str]],
) -> None:
    topo, _log = watching
    idle = [_connect(topo.container) for _ in range(metrics.MAX_CONNECTIONS)]
    try:
        extra = _connect(topo.container)
        try:
            assert extra.recv(100).startswith(b"HTTP/1.1 503")
        finally:
            extra.close()
        # Each idle connection is closed by the server (recv sees the end), in time.
        for sock in idle:
            assert sock.recv(100) == b""
    finally:
        for sock in idle:
            sock.close()
    assert b"ctfix_watch_events" in _get(topo.container)


def test_a_metrics_address_other_than_loopback_is_warned_about() -> None:
    with _watch("0.0.0.0") as (_topo, log):
        assert "warning: --metrics 0.0.0.0" in wait_for_text(log, "Prometheus metrics on")


def _series(ns: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples of one metric, scraped from watch's endpoint: labels -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    body = _get(ns).partition(b"\r\n\r\n")[2].decode()
    return {
        frozenset(sample.labels.items()): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == name
    }


def _poll(what: str, found: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not found():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_stale_nat_and_unanswered_requests_reach_the_metrics() -> None:
    """QA F24: a real watch --metrics sees a stale NAT entry (a DNAT moved from A to B
    under a one-way sender) and an unanswered request to a port where nothing is
    bound; the scrape has the stale-NAT gauge for (service, A) and the unanswered
    counter for (service, no-socket, one_way="false"). When the sender stops, its
    entry ends (a request to a stale target, unanswered: reason stale-nat) and the
    gauge falls back to 0 without any rule change (watch re-checks what is stale)."""
    port, closed = 5140, 7004
    service, a_at = f"{UPLINK_V4}:{port}", f"{stale_lab.BACKEND_A}:{port}"
    with lab_topology(ipv6=False, netfilter="nft") as topo, tempfile.NamedTemporaryFile(
        "w+"
    ) as log:
        # Unreplied entries end 3 s after their last datagram (the sysctl is per namespace).
        topo.run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=3")
        topo.ip(topo.upstream, "".join(
            f"addr add {address}/24 dev eth0\n"
            for address in (stale_lab.BACKEND_A, stale_lab.BACKEND_B)
        ))  # fmt: skip
        backend = stale_lab.Backend(topo, stale_lab.BACKEND_A, port)
        try:
            stale_lab.load_dnat(topo, port, stale_lab.BACKEND_A)
            topo.spawn(
                topo.container,
                [sys.executable, "-m", "ctfix", "watch", "--netns", topo.host,
                 "--metrics", f"127.0.0.1:{PORT}"],
                stderr=log.fileno(),
            )  # fmt: skip
            wait_for_text(log, "ctfix watch: watching ")
            sender = stale_lab.start_sender(topo, stale_lab.SENDER_PORT, port)
            _poll("A to receive the sender", lambda: bool(backend.drain()))
            stale_lab.move_dnat(topo, port, stale_lab.BACKEND_B)
            stale_key = frozenset(
                {("netns", topo.host), ("service", service), ("stale_target", a_at)}
            )

            def stale() -> float:
                return _series(topo.container, "ctfix_watch_stale_nat_entries").get(
                    stale_key, 0.0
                )

            _poll("the stale-NAT gauge", lambda: stale() >= 1)

            def unanswered(service: str, reason: str) -> float:
                key = frozenset({("netns", topo.host), ("service", service),
                                 ("reason", reason), ("one_way", "false")})  # fmt: skip
                with netns.entered(topo.host):
                    list(conntrack.dump(proto=17))  # reap what has expired (their DESTROY)
                return _series(topo.container, "ctfix_watch_unanswered_requests_total").get(
                    key, 0.0
                )

            udp_exchange(topo.container, UPLINK_V4, closed, timeout=0.2)  # nothing bound
            _poll("the no-socket count", lambda: unanswered(f"{UPLINK_V4}:{closed}",
                                                            "no-socket") == 1)  # fmt: skip
            topo.stop(sender)
            _poll("the stale-nat request's count",
                  lambda: unanswered(service, "stale-nat") >= 1)  # fmt: skip
            _poll("the stale-NAT gauge back at 0", lambda: stale() == 0)
        finally:
            backend.close()
