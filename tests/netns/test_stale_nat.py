"""Stale NAT entries with a real DNAT (nftables, and iptables-legacy), as a user meets them.

In the lab topology the host forwards 198.51.100.13:5140 to backend A and :5141 to
backend C; one-way senders in the container keep their entries alive. The 5140 rule
moves to backend B and A's address goes: `ctfix watch` must report the pinned sender
(polling its output until a deadline: never a measured latency), `ctfix explain`
must say broken with the old and current targets, and `ctfix fix --method
flush-stale --apply` must make the next datagrams reach B while every other entry of
the table stays: the unchanged port's, a later client that the rule already sends to
B, an unforwarded port's. Nothing else may be called stale.
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
from collections.abc import Iterator
from typing import Any

import pytest

from ctfix.core.decode import CtEntry
from ctfix.lab import stale_nat as lab
from ctfix.lab.topology import CONTAINER_V4, UPLINK_V4, Netfilter, Topology, lab_topology
from ctfix.platform import conntrack, netns

CTFIX = [sys.executable, "-m", "ctfix"]
PORT, STEADY_PORT, LOOSE_PORT = 5140, 5141, 5999
PINNED, STEADY, LATE, LOOSE = 40514, 40516, 40518, 40517
C = "198.51.100.30"
SERVICE = f"{UPLINK_V4}:{PORT}"
A_AT, B_AT = f"{lab.BACKEND_A}:{PORT}", f"{lab.BACKEND_B}:{PORT}"


def _ctfix(topo: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTFIX, *args, "--netns", topo.host], capture_output=True, text=True, timeout=120
    )


def _table(topo: Topology) -> list[CtEntry]:
    with netns.entered(topo.host):
        return list(conntrack.dump(family=socket.AF_INET, proto=17))


def _entry_of(entries: list[CtEntry], source_port: int, port: int) -> CtEntry | None:
    return next(
        (
            e for e in entries
            if (e.orig.src, e.orig.sport, e.orig.dport) == (CONTAINER_V4, source_port, port)
        ),
        None,
    )


def _wait_for(what: str, check: Any, deadline: float) -> Any:
    """Poll `check()` until it returns something true, or fail at the deadline."""
    end = time.monotonic() + deadline
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < end, f"not within {deadline:g} s: {what}"
        time.sleep(0.1)


class _Watch:
    """`ctfix watch --json` in the host namespace, its stdout in a file read as it grows."""

    def __init__(self, topo: Topology, out: Any, err: Any) -> None:
        self.out, self.err = out, err
        self.proc = subprocess.Popen(
            [*CTFIX, "watch", "--netns", topo.host, "--json"], stdout=out, stderr=err, text=True
        )

    def records(self) -> list[dict[str, Any]]:
        self.out.flush()
        with open(self.out.name) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def stale(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["kind"] == "stale-nat"]

    def stderr(self) -> str:
        with open(self.err.name) as fh:
            return fh.read()

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.stderr()
        return "ctfix watch: watching " in self.stderr()


@contextlib.contextmanager
def _watching(topo: Topology) -> Iterator[_Watch]:
    with (
        tempfile.NamedTemporaryFile("w+", prefix="ctfix-watch-out-") as out,
        tempfile.NamedTemporaryFile("w+", prefix="ctfix-watch-err-") as err,
    ):
        watch = _Watch(topo, out, err)
        try:
            _wait_for("watch is ready", watch.ready, 20.0)
            yield watch
        finally:
            watch.stop()


@contextlib.contextmanager
def _backends(topo: Topology) -> Iterator[dict[str, lab.Backend]]:
    topo.ip(topo.upstream, "".join(
        f"addr add {address}/24 dev eth0\n" for address in (lab.BACKEND_A, lab.BACKEND_B, C)
    ))
    made = {
        "A": lab.Backend(topo, lab.BACKEND_A, PORT),
        "B": lab.Backend(topo, lab.BACKEND_B, PORT),
        "C": lab.Backend(topo, C, STEADY_PORT),
    }
    try:
        yield made
    finally:
        for backend in made.values():
            backend.close()


def _identity(entry: CtEntry) -> tuple[Any, ...]:
    return (entry.orig, entry.reply, entry.zone, entry.id)


@pytest.mark.parametrize(
    ("netfilter", "tool"),
    [("nft", "nft"), ("iptables-legacy", "iptables-legacy"), ("nft", "iptables-nft")],
    ids=["nftables", "iptables-legacy", "iptables-nft"],
)
def test_a_sender_pinned_to_a_moved_backend_is_found_and_flushed_exactly(
    netfilter: Netfilter, tool: lab.RuleTool
) -> None:
    """iptables-nft is Docker's and kube-proxy's way: rules in nftables whose DNAT and
    addrtype are `xt` expressions."""
    with lab_topology(netfilter=netfilter) as topo, _backends(topo) as at:
        topo.run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=1",
                 "net.netfilter.nf_conntrack_acct=1")
        lab.load_dnat(topo, PORT, lab.BACKEND_A, tool)
        lab.load_dnat(topo, STEADY_PORT, C, tool)
        for source, port in ((PINNED, PORT), (STEADY, STEADY_PORT), (LOOSE, LOOSE_PORT)):
            lab.start_sender(topo, source, port)
        _wait_for("A receives the pinned sender", lambda: at["A"].drain(PINNED), 10.0)
        _wait_for("C receives the steady sender", lambda: at["C"].drain(STEADY), 10.0)

        with _watching(topo) as watch:
            lab.move_dnat(topo, PORT, lab.BACKEND_B, tool)
            topo.ip(topo.upstream, f"addr del {lab.BACKEND_A}/24 dev eth0\n")
            # Within 10 s of the change: a deadline for polling, not a measured latency.
            [record] = _wait_for("watch reports the pinned sender", watch.stale, 10.0)
            assert record["service"] == SERVICE
            assert (record["stale_target"], record["current_targets"]) == (A_AT, [B_AT])
            assert (record["clients"], record["entries"], record["existing"]) == (1, 1, False)
            assert record["why"] == "rule-changed" and record["netns"] == topo.host
            assert record["pinned"][0]["client"] == f"{CONTAINER_V4}:{PINNED}"

            # The black hole: B gets nothing from the pinned sender.
            at["B"].drain()
            assert at["B"].receives(1.0, PINNED) == 0

            # A client that starts now is sent to B by the rule: a still-correct DNAT.
            lab.start_sender(topo, LATE, PORT)
            _wait_for("B receives the late sender", lambda: at["B"].drain(LATE), 10.0)

            explained = _ctfix(topo, "explain", str(PORT), "--json")
            assert explained.returncode == 1, explained.stderr
            diagnosis = json.loads(explained.stdout)
            assert diagnosis["verdict"] == "broken"
            assert "stale-nat" in [r["code"] for r in diagnosis["reasons"]]
            [stale] = diagnosis["stale_nat"]
            assert (stale["stale_target"], stale["current_targets"]) == (A_AT, [B_AT])
            assert [p["client"] for p in stale["pinned"]] == [f"{CONTAINER_V4}:{PINNED}"]

            steady = json.loads(_ctfix(topo, "explain", str(STEADY_PORT), "--json").stdout)
            assert steady["stale_nat"] == []
            assert "stale-nat" not in [r["code"] for r in steady["reasons"]]

            # scan: the forwarded ports are services too (no socket needed), judged alike.
            scanned = json.loads(_ctfix(topo, "scan", "--json").stdout)
            by_port = {service["port"]: service for service in scanned["services"]}
            assert by_port[PORT]["verdict"] == "broken"
            assert [s["stale_target"] for s in by_port[PORT]["stale_nat"]] == [A_AT]
            assert by_port[STEADY_PORT]["stale_nat"] == []

            dry = _ctfix(topo, "fix", str(PORT), "--method", "flush-stale", "--json")
            assert dry.returncode == 0, dry.stderr
            [step] = json.loads(dry.stdout)["plan"]["steps"]
            assert (step["spec"]["sport"], step["spec"]["reply_src"]) == (PINNED, lab.BACKEND_A)

            before = _table(topo)
            pinned = _entry_of(before, PINNED, PORT)
            assert pinned is not None and pinned.reply.src == lab.BACKEND_A
            applied = _ctfix(topo, "fix", str(PORT), "--method", "flush-stale", "--apply",
                             "--json")
            assert applied.returncode == 0, applied.stdout + applied.stderr
            result = json.loads(applied.stdout)
            assert (result["deleted"], result["recorded"]) == (1, False)
            # fix saw the client's next entry go to B (the sender never pauses).
            [after_flush] = result["next_entries"]
            assert (after_flush["target"], after_flush["follows_rules"]) == (B_AT, True)
            after = _table(topo)
            others = {_identity(e) for e in before} - {_identity(pinned)}
            assert others <= {_identity(e) for e in after}
            assert _identity(pinned) not in {_identity(e) for e in after}
            for source, port in ((STEADY, STEADY_PORT), (LATE, PORT), (LOOSE, LOOSE_PORT)):
                assert _entry_of(before, source, port) is not None  # they were there to keep

            # The next datagrams of the pinned sender reach B.
            _wait_for("B receives the pinned sender", lambda: at["B"].drain(PINNED), 10.0)
            renewed = _entry_of(_table(topo), PINNED, PORT)
            assert renewed is not None and renewed.reply.src == lab.BACKEND_B

            # Nothing to revert, nothing recorded: --status and --revert agree.
            status = json.loads(_ctfix(topo, "fix", "--status", "--json").stdout)
            assert status["fixes"] == []
            again = _ctfix(topo, "fix", str(PORT), "--method", "flush-stale")
            assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
            assert "no stale NAT entries" in again.stderr

            # Over the whole watch (and its summary at exit): the pinned sender only.
            assert watch.stop() == 0, watch.stderr()
            services = {(r["service"], r["stale_target"]) for r in watch.stale()}
            assert services == {(SERVICE, A_AT)}


def test_entries_made_before_the_dnat_existed_are_stale_too() -> None:
    with lab_topology(netfilter="nft") as topo, _backends(topo) as at:
        # Nothing forwards the port yet: the sender's datagrams end at the host.
        lab.start_sender(topo, PINNED, PORT)
        _wait_for("the sender's entry", lambda: _entry_of(_table(topo), PINNED, PORT), 10.0)
        with _watching(topo) as watch:
            lab.load_dnat(topo, PORT, lab.BACKEND_B)
            [record] = _wait_for("watch reports the entry", watch.stale, 10.0)
            assert (record["why"], record["stale_target"], record["current_targets"]) == (
                "never-natted", SERVICE, [B_AT])
            applied = _ctfix(topo, "fix", str(PORT), "--method", "flush-stale", "--apply",
                             "--json")
            assert json.loads(applied.stdout)["deleted"] == 1, applied.stderr
            _wait_for("B receives the sender", lambda: at["B"].drain(PINNED), 10.0)
