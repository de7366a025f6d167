"""`ctfix watch --metrics` listens where ctfix was started, not in --netns, and a
client cannot hold it (issue 9 item 10).

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
from collections.abc import Iterator
from typing import IO

import pytest

from ctfix.lab.topology import Topology, lab_topology
from ctfix.platform import metrics, netns
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
