"""Unanswered UDP requests, classified, against real sockets in the lab topology.

The host namespace gets a short nf_conntrack_udp_timeout (it is per namespace), so
that unreplied entries end, and their DESTROY events come, within seconds. Servers
run in the host namespace, clients in the container. Nothing here waits a fixed time:
each test polls watch's output, or the conntrack table, with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctfix.core.decode import CtEntry
from ctfix.lab import stale_nat as stale_lab
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
from ctfix.platform import conntrack, netns
from tests.netns import kb_lab
from tests.netns.test_kb_daemons import rsyslogd

WATCH = [sys.executable, "-m", "ctfix", "watch", "--json"]
SHORT_TIMEOUT = 3  # seconds an unreplied UDP entry lives in the host namespace

#: A server that receives and never answers.
SILENT = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[2], int(sys.argv[1])))
while True:
    sock.recv(2048)
"""


@pytest.fixture
def short_lab() -> Iterator[Topology]:
    with lab_topology(ipv6=True, netfilter="nft") as topo:
        sysctl = f"net.netfilter.nf_conntrack_udp_timeout={SHORT_TIMEOUT}"
        topo.run(topo.host, "sysctl", "-qw", sysctl)
        yield topo


def _until(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Watch:
    """`ctfix watch --json` with stdout in a file, so the test reads records as they
    come; stopped with SIGTERM (a normal end, with the final records and a summary).

    While it waits for a record, it dumps the host namespace's UDP table now and then:
    a dump makes the kernel remove the expired entries it meets at once (their DESTROY
    events follow), where its garbage collector may take up to a minute."""

    def __init__(self, proc: subprocess.Popen[str], out: Any, err: Any, topo: Topology) -> None:
        self.proc, self.out, self.err, self.topo = proc, out, err, topo

    def records(self) -> list[dict[str, Any]]:
        self.out.flush()
        text = Path(self.out.name).read_text()
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def stderr(self) -> str:
        return Path(self.err.name).read_text()

    def wait_for(self, what: str, test: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            assert self.proc.poll() is None, self.stderr()
            found[:] = [r for r in self.records() if test(r)]
            if not found:
                with netns.entered(self.topo.host):
                    list(conntrack.dump(proto=17))  # reap what has expired
            return bool(found)

        _until(what, seen)
        return found[0]

    def stop(self) -> list[dict[str, Any]]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        return self.records()


@contextlib.contextmanager
def _watching(topo: Topology, *extra: str) -> Iterator[Watch]:
    with (
        tempfile.NamedTemporaryFile("w+", prefix="ctfix-watch-out-") as out,
        tempfile.NamedTemporaryFile("w+", prefix="ctfix-watch-err-") as err,
    ):
        proc = subprocess.Popen(
            [*WATCH, "--netns", topo.host, *extra], stdout=out, stderr=err, text=True
        )
        try:
            watch = Watch(proc, out, err, topo)
            _until(
                "watch to get ready",
                lambda: "watching " in watch.stderr() or proc.poll() is not None,
            )
            assert proc.poll() is None, watch.stderr()
            yield watch
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _unanswered(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The last (final) unanswered record of each (service, reason)."""
    return {(r["service"], r["reason"]): r for r in records if r["kind"] == "unanswered"}


def _silent(topo: Topology, port: int, address: str = "0.0.0.0") -> subprocess.Popen[bytes]:
    proc = topo.spawn(topo.host, [sys.executable, "-c", SILENT, str(port), address])
    wait_udp_bound(proc.pid, port)
    return proc


def test_a_silent_socket_is_no_reply_and_an_unbound_port_is_no_socket(short_lab: Topology) -> None:
    topo = short_lab
    _silent(topo, 7000)
    with _watching(topo) as watch:
        asked = [
            udp_exchange(topo.container, UPLINK_V4, 7000, timeout=0.2),
            udp_exchange(topo.container, UPLINK_V4, 7001, timeout=0.2),  # nothing bound
            udp_exchange(topo.container, UPLINK_V6, 7001, timeout=0.2),
        ]
        assert not any(e.answered for e in asked)  # what the users see
        live = [
            watch.wait_for("no-reply on 7000", lambda r: r.get("service") == f"{UPLINK_V4}:7000"),
            watch.wait_for("no-socket on 7001", lambda r: r.get("service") == f"{UPLINK_V4}:7001"),
            watch.wait_for("IPv6 on 7001", lambda r: r.get("service") == f"[{UPLINK_V6}]:7001"),
        ]
        records = watch.stop()
    assert [(r["reason"], r["family"]) for r in live] == [
        ("no-reply", "ipv4"), ("no-socket", "ipv4"), ("no-socket", "ipv6"),
    ]
    assert live[0]["program"] == Path(sys.executable).name[:15]  # its comm
    assert all(r["netns"] == topo.host and not r["one_way"] and not r["existing"] for r in live)
    final = _unanswered(records)
    assert set(final) == {
        (f"{UPLINK_V4}:7000", "no-reply"),
        (f"{UPLINK_V4}:7001", "no-socket"),
        (f"[{UPLINK_V6}]:7001", "no-socket"),
    }
    for exchange in asked:
        address, port = exchange.server
        service = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        [record] = [r for key, r in final.items() if key[0] == service]
        assert (record["flows"], record["clients"]) == (1, 1)
        assert record["client"].endswith(f":{exchange.client[1]}")
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["unanswered"] == 3


def test_a_rule_that_drops_the_replies_is_named_with_its_no_reply(short_lab: Topology) -> None:
    """The server answers, but a rule drops its replies before conntrack sees them: the
    socket is bound, so it is no-reply, and the rule is named."""
    topo = short_lab
    server = topo.spawn(topo.host, [sys.executable, "-m", "ctfix", "serve", "--port", "7002"])
    wait_udp_bound(server.pid, 7002)
    assert udp_exchange(topo.container, UPLINK_V4, 7002).answered  # it does answer
    topo.run(
        topo.host,
        "nft",
        "add table inet ctfix_fw; add chain inet ctfix_fw out { type filter hook output "
        "priority raw; }; add rule inet ctfix_fw out udp sport 7002 drop",
    )
    with _watching(topo) as watch:
        assert not udp_exchange(topo.container, UPLINK_V4, 7002, timeout=0.2).answered
        record = watch.wait_for(
            "no-reply on 7002", lambda r: r.get("service") == f"{UPLINK_V4}:7002"
        )
        watch.stop()
    assert record["reason"] == "no-reply"
    assert [rule.split(": ", 1)[0] for rule in record["rules"]] == [
        "nftables inet ctfix_fw out"
    ]


def test_the_hosts_port_unreachable_confirms_no_socket_once_the_tap_is_open(
    short_lab: Topology,
) -> None:
    """The first no-socket flow opens the ICMP tap; the next request's port
    unreachable, sent by the host, is seen and confirms the finding."""
    topo = short_lab
    with _watching(topo) as watch:
        udp_exchange(topo.container, UPLINK_V4, 7008, timeout=0.2)
        first = watch.wait_for(
            "no-socket on 7008", lambda r: r.get("service", "").endswith(":7008")
        )
        assert (first["reason"], first["confirmed"]) == ("no-socket", False)
        udp_exchange(topo.container, UPLINK_V4, 7008, timeout=0.2)
        _until("its entry to end", lambda: not _entries(topo, 7008))
        # Events come in order: once the marker's record is out, the second request's
        # DESTROY was read too.
        udp_exchange(topo.container, UPLINK_V4, 7009, timeout=0.2)
        watch.wait_for("the marker", lambda r: r.get("service", "").endswith(":7009"))
        records = watch.stop()
    final = _unanswered(records)[(f"{UPLINK_V4}:7008", "no-socket")]
    assert (final["flows"], final["confirmed"]) == (2, True)


def test_unanswered_clients_of_a_wrong_source_server_are_wrong_source(short_lab: Topology) -> None:
    topo = short_lab
    broken = topo.spawn(
        topo.host, [sys.executable, "-m", "ctfix", "serve", "--port", "7003", "--broken"]
    )
    wait_udp_bound(broken.pid, 7003)
    with _watching(topo) as watch:
        # The server answers from the bridge address: the connected client refuses it.
        exchange = udp_exchange(topo.container, UPLINK_V4, 7003, timeout=0.3)
        assert not exchange.answered
        record = watch.wait_for(
            "the unanswered request", lambda r: r["kind"] == "unanswered"
        )
        records = watch.stop()
    assert (record["service"], record["reason"]) == (f"{UPLINK_V4}:7003", "wrong-source")
    assert record["client"].endswith(f":{exchange.client[1]}")
    wrong = [r for r in records if r["kind"] == "wrong-source-reply"]
    assert {r["actual_source"] for r in wrong} == {f"{BRIDGE_V4}:7003"}


def _syslog(topo: Topology, port: int = 514) -> None:
    for _ in range(3):
        # Fire and forget, as syslog senders do: nothing is expected back.
        with netns.entered(topo.container):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.sendto(kb_lab.syslog_line("ctfix-unanswered-test"), (UPLINK_V4, port))


def _rsyslog(topo: Topology, directory: Path) -> None:
    argv = rsyslogd(directory)
    assert Path(argv[0]).exists(), "rsyslogd is unpacked by scripts/setup: run it first"
    proc = topo.spawn(topo.host, argv)
    wait_udp_bound(proc.pid, 514, address="0.0.0.0")


def test_a_one_way_service_raises_nothing(short_lab: Topology, tmp_path: Path) -> None:
    """The real rsyslogd receives and never answers: its flows are counted apart
    (`one_way`), never printed live, never a problem. A no-socket request sent after
    them shows that their DESTROY events were read (events come in order)."""
    topo = short_lab
    _rsyslog(topo, tmp_path)
    with _watching(topo) as watch:
        _syslog(topo)
        _until("rsyslogd's entries to end", lambda: not _entries(topo, 514))
        udp_exchange(topo.container, UPLINK_V4, 7004, timeout=0.2)  # nothing bound
        watch.wait_for("the marker", lambda r: r.get("service") == f"{UPLINK_V4}:7004")
        live = watch.records()
        records = watch.stop()
    assert not [r for r in live if r.get("service", "").endswith(":514")]
    final = _unanswered(records)
    syslog = final[(f"{UPLINK_V4}:514", "no-reply")]
    assert syslog["one_way"] is True and syslog["flows"] == 3
    assert syslog["program"] == "rsyslogd"
    assert final[(f"{UPLINK_V4}:7004", "no-socket")]["one_way"] is False


def _entries(topo: Topology, port: int) -> list[CtEntry]:
    with netns.entered(topo.host):
        return list(conntrack.dump(proto=17, port=port))


def _aged(topo: Topology, port: int) -> Callable[[], bool]:
    """The port's entries are there, each a few seconds past its last datagram (under
    the default 30 s timeout, at most 27 s left): requests nobody answered promptly."""

    def aged() -> bool:
        entries = _entries(topo, port)
        return bool(entries) and all(e.timeout is not None and e.timeout <= 27 for e in entries)

    return aged


def test_requests_already_in_the_table_are_history(tmp_path: Path) -> None:
    """Requests already in the table when watch starts are counted from its start-up
    dump as `existing` records (the kernel sends no DESTROY for them: they were made
    while nothing listened): printed once, never findings, never in the exit status
    (as for wrong-source replies); the one-way service's stay one-way."""
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        _rsyslog(topo, tmp_path)
        _syslog(topo)
        udp_exchange(topo.container, UPLINK_V4, 7005, timeout=0.2)  # nothing bound
        for port in (514, 7005):
            _until(f"port {port}'s entries to age", _aged(topo, port))
        proc = subprocess.run(
            [*WATCH, "--netns", topo.host, "--duration", "0.5"], capture_output=True, text=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    final = _unanswered(records)
    syslog = final[(f"{UPLINK_V4}:514", "no-reply")]
    assert (syslog["one_way"], syslog["existing"], syslog["flows"]) == (True, True, 3)
    down = final[(f"{UPLINK_V4}:7005", "no-socket")]
    assert (down["one_way"], down["existing"], down["flows"]) == (False, True, 1)
    summary = records[-1]
    assert (summary["findings"], summary["existing"], summary["unanswered"]) == (0, 2, 4)


def test_the_kernel_passes_only_destroy_events_of_unreplied_entries(short_lab: Topology) -> None:
    topo = short_lab
    server = topo.spawn(topo.host, [sys.executable, "-m", "ctfix", "serve", "--port", "7006"])
    wait_udp_bound(server.pid, 7006)
    with netns.entered(topo.host):
        events = conntrack.EventSocket(groups=(conntrack.NFNLGRP_CONNTRACK_DESTROY,))
    with contextlib.closing(events):
        answered = udp_exchange(topo.container, UPLINK_V4, 7006)
        assert answered.answered
        unanswered = udp_exchange(topo.container, UPLINK_V4, 7007, timeout=0.2)
        ended: list[CtEntry] = []

        def both_gone() -> bool:
            ended.extend(event.entry for event in events.read())
            return not _entries(topo, 7006) and not _entries(topo, 7007)

        _until("both entries to end", both_gone)
        ended.extend(event.entry for event in events.read())
    # The kernel deleted both; only the unanswered one's DESTROY reached user space.
    assert [(e.orig.dport, e.orig.sport) for e in ended] == [(7007, unanswered.client[1])]


def _explain(topo: Topology, port: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "ctfix", "explain", str(port), "--netns", topo.host, "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode in (0, 1), proc.stderr
    document: dict[str, Any] = json.loads(proc.stdout)
    return document


def test_explain_gives_the_same_reasons_from_the_table(tmp_path: Path) -> None:
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        _silent(topo, 7010)
        _rsyslog(topo, tmp_path)
        udp_exchange(topo.container, UPLINK_V4, 7010, timeout=0.2)
        udp_exchange(topo.container, UPLINK_V4, 7011, timeout=0.2)  # nothing bound
        _syslog(topo)
        for port in (7010, 7011, 514):
            _until(f"port {port}'s entries to age", _aged(topo, port))
        silent, down, syslog = (_explain(topo, port) for port in (7010, 7011, 514))

    def codes(document: dict[str, Any]) -> list[str]:
        return [r["code"] for r in document["reasons"] if r["code"].startswith("unanswered-")]

    assert codes(silent) == ["unanswered-no-reply"]
    assert [(u["service"], u["flows"]) for u in silent["unanswered"]] == [(f"{UPLINK_V4}:7010", 1)]
    assert silent["unanswered"][0]["program"] == Path(sys.executable).name[:15]
    assert codes(down) == ["unanswered-no-socket"]
    assert down["service_down"] is True
    assert codes(syslog) == ["unanswered-one-way"]
    # QA F13: its program is named one-way, not "answers from the destination"; QA F1:
    # one count of requests without a usable reply, the records' (one-way apart).
    every = {r["code"] for r in syslog["reasons"]}
    assert "one-way-service" in every and "answers-from-destination" not in every
    assert (syslog["evidence"]["unanswered"], silent["evidence"]["unanswered"]) == (0, 1)
    assert down["evidence"]["unanswered"] == 1
    assert [(u["reason"], u["one_way"], u["flows"]) for u in syslog["unanswered"]] == [
        ("no-reply", True, 3)
    ]


def test_scan_shows_each_service_ports_unanswered_requests_as_explain_does() -> None:
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        _silent(topo, 7012, UPLINK_V4)  # one address: never at risk, ok about sources
        udp_exchange(topo.container, UPLINK_V4, 7012, timeout=0.2)
        _until("the entry to age", _aged(topo, 7012))
        proc = subprocess.run(
            [sys.executable, "-m", "ctfix", "scan", "--netns", topo.host, "--json"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode in (0, 1), proc.stderr
        text = subprocess.run(
            [sys.executable, "-m", "ctfix", "scan", "--netns", topo.host],
            capture_output=True, text=True, timeout=120,
        ).stdout
        explained = _explain(topo, 7012)
    [service] = [s for s in json.loads(proc.stdout)["services"] if s["port"] == 7012]
    assert service["unanswered"] == explained["unanswered"]
    assert [u["reason"] for u in service["unanswered"]] == ["no-reply"]
    # The port's line says it, although the verdict (about wrong sources) is ok.
    assert service["verdict"] == "ok"
    line = next(line for line in text.splitlines() if " 7012 " in line)
    assert "unanswered-no-reply" in line


def test_a_sender_pinned_to_a_moved_backend_ends_unanswered_as_stale_nat(
    short_lab: Topology,
) -> None:
    """A DNAT moves from backend A to B while a one-way sender keeps its entry pinned to
    A: watch's stale-nat detector reports the entry; when the sender stops and the
    entry ends, its requests are unanswered for that reason, with A as the target.
    watch starts first: the kernel sends no DESTROY event for an entry made while
    nobody listened to conntrack events (it has no event extension)."""
    topo = short_lab
    port, a_at = 5140, f"{stale_lab.BACKEND_A}:5140"
    topo.ip(topo.upstream, "".join(
        f"addr add {address}/24 dev eth0\n"
        for address in (stale_lab.BACKEND_A, stale_lab.BACKEND_B)
    ))
    backend = stale_lab.Backend(topo, stale_lab.BACKEND_A, port)
    try:
        stale_lab.load_dnat(topo, port, stale_lab.BACKEND_A)
        with _watching(topo) as watch:
            sender = stale_lab.start_sender(topo, stale_lab.SENDER_PORT, port)
            _until("A to receive the sender", lambda: bool(backend.drain()))
            stale_lab.move_dnat(topo, port, stale_lab.BACKEND_B)
            watch.wait_for("the stale-nat record", lambda r: r["kind"] == "stale-nat")
            topo.stop(sender)
            record = watch.wait_for(
                "the unanswered record", lambda r: r["kind"] == "unanswered"
            )
            watch.stop()
    finally:
        backend.close()
    assert (record["service"], record["reason"], record["target"]) == (
        f"{UPLINK_V4}:{port}", "stale-nat", a_at
    )
    assert record["client"] == f"{CONTAINER_V4}:{stale_lab.SENDER_PORT}"
