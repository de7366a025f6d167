"""`ctfix watch` against real broken and correct servers in the lab topology.

Broken servers (nc, socat, `ctfix serve --broken --dual-stack`) and correct ones
(`ctfix serve`, dnsmasq) run in the host namespace, clients in the container. IPv6
is left untracked on purpose (the lab's ip6 table is removed) so that `--track` has
to switch it on; the test checks the table is gone again afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctfix.lab.topology import (
    BRIDGE_V4,
    CONTAINER_V4,
    UPLINK_V4,
    UPLINK_V6,
    Topology,
    lab_topology,
    udp_exchange,
    wait_udp_bound,
)
from ctfix.platform import netns

WATCH = [sys.executable, "-m", "ctfix", "watch"]


class Watch:
    """A running `ctfix watch --json`: stdout through a pipe, stderr into a file that
    is read for the readiness note (so that reading it never blocks the test)."""

    def __init__(self, proc: subprocess.Popen[str], errors: Any) -> None:
        self.proc = proc
        self.errors = errors

    def stderr(self) -> str:
        self.errors.flush()
        with open(self.errors.name) as fh:
            return fh.read()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until watch says it is watching: subscribed, addresses known, table dumped."""
        deadline = time.monotonic() + timeout
        while "ctfix watch: watching " not in self.stderr():
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, f"watch never got ready: {self.stderr()}"
            time.sleep(0.02)

    def communicate(self, timeout: float) -> tuple[str, str]:
        stdout, _ = self.proc.communicate(timeout=timeout)
        return stdout, self.stderr()

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


@contextlib.contextmanager
def _watching(topo: Topology, *extra: str) -> Iterator[Watch]:
    """Start watch in the host namespace, wait until it is ready; whatever happens in
    the test, it does not outlive the block (killed by pid, then reaped)."""
    with tempfile.NamedTemporaryFile("w+", prefix="ctfix-watch-stderr-") as errors:
        proc = subprocess.Popen(
            [*WATCH, "--netns", topo.host, "--json", *extra],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        try:
            watch = Watch(proc, errors)
            watch.wait_ready()
            yield watch
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def _records(stdout: str) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, Any]]:
    findings: dict[tuple[str, str], dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    for line in stdout.splitlines():
        record = json.loads(line)
        if record["kind"] == "summary":
            summary = record
        elif record["kind"] == "unanswered":
            continue  # tests/netns/test_unanswered.py
        else:
            assert record["kind"] == "wrong-source-reply"
            findings[(record["service"], record["actual_source"])] = record  # last wins
    return findings, summary


def _unanswered_keys(stdout: str) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(service, reason) of the unanswered records (findings too, in the summary):
    those in the table at start-up (existing), and those that ended while watching."""
    records = [json.loads(line) for line in stdout.splitlines()]
    silent = [r for r in records if r["kind"] == "unanswered"]
    old = {(r["service"], r["reason"]) for r in silent if r["existing"]}
    return old, {(r["service"], r["reason"]) for r in silent if not r["existing"]}


def _dns_query(ns: str, server: str, port: int) -> tuple[bytes, tuple[str, int]] | None:
    query = struct.pack(">HHHHHH", 0x4354, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p for p in (b"ctfix", b"test")) + b"\0"
    query += struct.pack(">HH", 1, 1)
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(1.0)
        sock.connect((server, port))
        sock.send(query)
        data, peer = sock.recvfrom(4096)
        return data, peer[:2]
    except (TimeoutError, ConnectionRefusedError):
        return None
    finally:
        sock.close()


def _serve(topo: Topology, *args: str) -> subprocess.Popen[bytes]:
    return topo.spawn(topo.host, [sys.executable, "-m", "ctfix", "serve", *args])


@pytest.fixture
def lab_v6_untracked() -> Any:
    with lab_topology(ipv6=True, netfilter="nft") as topo:
        # IPv6 has no stateful rule now: the kernel does not track it in the host.
        topo.run(topo.host, "nft", "delete", "table", "ip6", "ctfix_lab")
        yield topo


def test_watch_reports_broken_servers_and_not_correct_ones(lab_v6_untracked: Topology) -> None:
    topo = lab_v6_untracked
    nc = topo.spawn(topo.host, ["nc", "-ul", "56789"], stdin=subprocess.PIPE)
    socat = topo.spawn(topo.host, ["socat", "UDP6-RECVFROM:5353,fork", "EXEC:cat"])
    dual = _serve(topo, "--port", "7001", "--broken", "--dual-stack")
    good = _serve(topo, "--port", "7000")
    dnsmasq = topo.spawn(
        topo.host,
        [
            "dnsmasq",
            "--no-daemon",
            "--port=5300",
            "--no-resolv",
            "--no-hosts",
            "-C",
            "/dev/null",
            "--pid-file=",
            "--address=/ctfix.test/192.0.2.55",
        ],
    )
    for proc, port in ((nc, 56789), (socat, 5353), (dual, 7001), (good, 7000), (dnsmasq, 5300)):
        wait_udp_bound(proc.pid, port)
    with _watching(topo, "--track", "--duration", "4") as watch:
        # nc answers with what it reads on stdin, after connect()ing to the first client.
        assert nc.stdin is not None
        nc.stdin.write(b"hello\n")
        nc.stdin.flush()
        # The wrong-source reply comes within milliseconds; 0.3 s keeps the three
        # unanswered exchanges well inside --duration on a loaded machine.
        broken = [
            udp_exchange(topo.container, UPLINK_V4, 56789, timeout=0.3),
            udp_exchange(topo.container, UPLINK_V6, 5353, timeout=0.3),
            udp_exchange(topo.container, UPLINK_V4, 7001, timeout=0.3),
        ]
        assert not any(exchange.answered for exchange in broken)  # the bug, as users see it
        correct = [
            udp_exchange(topo.container, UPLINK_V4, 7000),
            udp_exchange(topo.container, UPLINK_V6, 7000),
        ]
        assert [e.reply_from for e in correct] == [(UPLINK_V4, 7000), (UPLINK_V6, 7000)]
        dns = _dns_query(topo.container, UPLINK_V4, 5300)
        assert dns is not None and dns[1] == (UPLINK_V4, 5300)
        assert bytes([192, 0, 2, 55]) in dns[0]  # a real answer, not just any datagram

        stdout, stderr = watch.communicate(timeout=15)
    assert watch.returncode == 1, stderr  # --duration ended with findings
    findings, summary = _records(stdout)
    clients = {e.server[1]: e.client for e in broken}
    expected = {
        ("198.51.100.13:56789", "192.0.2.1:56789"): clients[56789],
        ("[2001:db8:2::13]:5353", "[2001:db8:1::1]:5353"): clients[5353],
        ("198.51.100.13:7001", "192.0.2.1:7001"): clients[7001],
    }
    assert set(findings) == set(expected)
    for (service, actual), client in expected.items():
        record = findings[(service, actual)]
        assert record["expected_source"] == service
        assert record["mismatch"] == "address"
        assert record["local"] is True
        assert record["client"].endswith(f":{client[1]}")
        assert record["netns"] == topo.host
    # The connected clients rejected the replies: ICMP port unreachable was seen.
    assert findings[("198.51.100.13:56789", "192.0.2.1:56789")]["confirmed"] is True
    assert summary["findings"] == 3 and summary["lost"] == 0
    assert summary["new_flows"] >= 9  # 6 requests (+1 DNS) and 3 wrong-source replies
    assert "not tracked" not in stderr
    assert "ctfix_watch_" not in topo.run(topo.host, "nft", "list", "tables")


def test_watch_warns_about_untracked_ipv6_and_cleans_up_on_sigterm(
    lab_v6_untracked: Topology,
) -> None:
    topo = lab_v6_untracked
    plain = subprocess.run(
        [*WATCH, "--netns", topo.host, "--duration", "0.2"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert plain.returncode == 0
    assert "IPv6 is not tracked" in plain.stderr and "IPv4" not in plain.stderr
    assert " 0 findings" in plain.stdout

    with _watching(topo, "--track") as watch:
        assert "ctfix_watch_" in topo.run(topo.host, "nft", "list", "tables")
        watch.send_signal(signal.SIGTERM)
        stdout, _ = watch.communicate(timeout=10)
    assert watch.returncode == 0
    assert json.loads(stdout.splitlines()[-1])["kind"] == "summary"
    assert "ctfix_watch_" not in topo.run(topo.host, "nft", "list", "tables")


@pytest.mark.parametrize("step", ["track-loaded", "subscribing"])
def test_a_stop_during_start_up_ends_normally_and_removes_the_track_table(
    lab_v6_untracked: Topology, step: str
) -> None:
    """SIGTERM right after libnftables committed the --track table (before watch had
    noted it) or while subscribing: exit 0 with a summary, and no table left behind."""
    topo = lab_v6_untracked
    proc = subprocess.run(
        [*WATCH, "--netns", topo.host, "--json", "--track"],
        capture_output=True,
        text=True,
        timeout=20,
        env=dict(os.environ, CTFIX_WATCH_TEST_SIGNAL_AT=step),
    )
    assert proc.returncode == 0, proc.stderr
    assert "internal error" not in proc.stderr
    assert "watching" not in proc.stderr  # it was stopped before it watched
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert {k: v for k, v in summary.items() if k != "tracking"} == {
        "kind": "summary",
        "events": 0,
        "new_flows": 0,
        "lost": 0,
        "resyncs": 0,
        "findings": 0,
        "existing": 0,
        "started": None,  # stopped before it subscribed: it never watched
        "unanswered": 0,
        "unanswered_uncounted": 0,
        "netns": topo.host,
        "netns_container": None,  # an `ip netns` of the lab: no container's
        "hidden": 0,
    }
    assert "ctfix_watch_" not in topo.run(topo.host, "nft", "list", "tables")


PEER_LOCAL, PEER_REMOTE = "203.0.113.1", "203.0.113.99"


def test_a_client_at_the_far_end_of_a_point_to_point_address_is_remote(lab: Topology) -> None:
    """`ip addr add A peer P` (WireGuard, ppp, GRE look like this): P is the other end,
    a client. Its wrong-source reply is reported, from the local end A, as `local`."""
    topo = lab
    topo.ip(topo.host, f"addr add {PEER_LOCAL} peer {PEER_REMOTE}/32 dev {topo.uplink}")
    topo.ip(topo.upstream, f"addr add {PEER_REMOTE}/32 dev eth0\nroute add {PEER_LOCAL} dev eth0")

    from ctfix.platform.addresses import LocalAddresses

    with netns.entered(topo.host):
        addresses = LocalAddresses()
    with contextlib.closing(addresses):
        assert PEER_LOCAL in addresses.addresses
        assert PEER_REMOTE not in addresses.addresses

    # A server on 0.0.0.0 answers with sendto(): the kernel picks the source of the
    # route to the peer, A, not the uplink address the client asked.
    with netns.entered(topo.host):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns.entered(topo.upstream):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server, client, _watching(topo, "--duration", "1.5") as watch:
        server.settimeout(1.0)
        server.bind(("0.0.0.0", 7200))
        client.bind((PEER_REMOTE, 0))
        client.connect((UPLINK_V4, 7200))
        client.send(b"ctfix-peer")
        client_port = client.getsockname()[1]
        data, peer = server.recvfrom(2048)
        assert peer[0] == PEER_REMOTE
        server.sendto(data, peer)
        stdout, stderr = watch.communicate(timeout=15)
    findings, summary = _records(stdout)
    assert set(findings) == {(f"{UPLINK_V4}:7200", f"{PEER_LOCAL}:7200")}, stderr
    finding = findings[(f"{UPLINK_V4}:7200", f"{PEER_LOCAL}:7200")]
    assert finding["client"] == f"{PEER_REMOTE}:{client_port}"
    assert finding["mismatch"] == "address" and finding["local"] is True
    assert summary["findings"] == 1


def test_watch_errors_are_one_line() -> None:
    proc = subprocess.run(
        [*WATCH, "--netns", "ctfix-no-such-namespace"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not found" in proc.stderr


def test_watch_pairs_no_server_flow_with_a_client_and_counts_clients(
    lab_v6_untracked: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QA P2.3 and P2.5 in the lab: the server's own flows (a wrong-source reply still
    in the table, snat-zone's zoned replies, a datagram it sends first) are never a
    client's request, at start-up (dump) or live; two clients count as two."""
    topo = lab_v6_untracked
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    socat = topo.spawn(topo.host, ["socat", "UDP4-RECVFROM:5000,fork", "EXEC:cat"])
    nc = topo.spawn(topo.host, ["sh", "-c", "while :; do echo pong; sleep 0.2; done | nc -ul 5001"])
    wait_udp_bound(socat.pid, 5000)
    wait_udp_bound(nc.pid, 5001)
    # Before watch starts, so its start-up dump holds them: two clients answered from
    # the bridge address on 5000; nc's first client too, then one it ignores.
    before = [udp_exchange(topo.container, UPLINK_V4, 5000, timeout=0.5) for _ in "12"]
    before.append(udp_exchange(topo.container, UPLINK_V4, 5001, timeout=0.5))
    before.append(udp_exchange(topo.container, BRIDGE_V4, 5001, timeout=0.3))
    assert not any(e.answered for e in before)
    fix = [sys.executable, "-m", "ctfix", "fix", "5000", "--netns", topo.host]
    subprocess.run([*fix, "--method", "snat-zone", "--apply"], check=True, capture_output=True)
    try:
        fixed = [udp_exchange(topo.container, a, 5000) for a in (UPLINK_V4, BRIDGE_V4)]
        assert [e.reply_from for e in fixed] == [(UPLINK_V4, 5000), (BRIDGE_V4, 5000)]
        with _watching(topo, "--duration", "2") as watch:
            # Ready (subscribed, then dumped): the start-up dump's findings are out.
            # Live: the server sends first (as a DNS NOTIFY or an SNMP trap would), then
            # a client asks that address and port; and more clients of the fixed port.
            with netns.entered(topo.host):
                sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sender:
                sender.bind((BRIDGE_V4, 5002))
                sender.sendto(b"notify", (CONTAINER_V4, 40999))
            udp_exchange(topo.container, BRIDGE_V4, 5002, timeout=0.2)
            assert udp_exchange(topo.container, UPLINK_V4, 5000).reply_from == (UPLINK_V4, 5000)
            stdout, stderr = watch.communicate(timeout=15)
    finally:
        subprocess.run([*fix, "--revert"], check=True, capture_output=True)
    findings, summary = _records(stdout)
    assert set(findings) == {
        (f"{UPLINK_V4}:5000", f"{BRIDGE_V4}:5000"),
        (f"{UPLINK_V4}:5001", f"{BRIDGE_V4}:5001"),
    }, stdout
    assert all(f["client"].startswith(f"{CONTAINER_V4}:") for f in findings.values())
    socat_finding = findings[(f"{UPLINK_V4}:5000", f"{BRIDGE_V4}:5000")]
    assert (socat_finding["count"], socat_finding["clients"]) == (2, 2)
    # All from before the watch: history, printed once, not counted as findings; the
    # requests that got no reply are unanswered records, history too.
    assert all(f["existing"] for f in findings.values())
    old, new = _unanswered_keys(stdout)
    assert not new and (summary["findings"], summary["existing"]) == (0, 2 + len(old)), stderr
