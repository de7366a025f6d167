"""`ctfix fix --method snat-zone` for clients behind a DNAT: kube-proxy's ClusterIP
DNAT'd to the node's own address (kubernetes 95565), in the lab topology.

What a user notices: the pods get their replies, from the ClusterIP and port they
asked, for a same-port and an other-port service, IPv4 and IPv6, on both backends;
direct clients of the node's addresses stay answered; --revert leaves the ruleset
exactly as it was; and a fix that no longer covers a service (a DNAT made after it) is
named by --status, and by explain, as ineffective for its clients, with the evidence.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctfix.lab import clusterip
from ctfix.lab.clusterip import CLUSTER_IP_V4, CLUSTER_IP_V6
from ctfix.lab.topology import (
    BRIDGE_V4,
    BRIDGE_V6,
    UPLINK_V4,
    UPLINK_V6,
    Netfilter,
    Topology,
    udp_exchange,
)
from tests.netns.test_fix import _lab as broken_lab_of
from tests.netns.test_fix import ctfix_fix, kernel_state, without_loaded_raw

PORT = 56789
OTHER = clusterip.other_port(PORT)
LATER = PORT + 2  # a service port DNAT'd after the fix
SERVICES = [(ip, p) for ip in (CLUSTER_IP_V4, CLUSTER_IP_V6) for p in (PORT, OTHER)]


@contextlib.contextmanager
def _cluster(netfilter: Netfilter) -> Iterator[Topology]:
    """The lab with the ClusterIP's rules and a broken server; always torn down."""
    with contextlib.contextmanager(broken_lab_of)(netfilter) as topo:
        clusterip.load_service_rules(topo, PORT)
        yield topo


@pytest.fixture(params=["nft", "iptables-legacy"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Topology]:
    with _cluster(request.param) as topo:
        yield topo


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    return tmp_path


def reply_from(topo: Topology, address: str, port: int) -> tuple[str, int] | None:
    """Where a connected pod's reply came from (None: it got nothing)."""
    return udp_exchange(topo.container, address, port, timeout=0.5).reply_from


def as_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def forward_later(topo: Topology) -> None:
    """A Service port added after the fix: the ClusterIP's LATER, DNAT'd like OTHER."""
    if topo.netfilter == "nft":
        for nf, cluster_ip in (("ip", CLUSTER_IP_V4), ("ip6", CLUSTER_IP_V6)):
            topo.run(topo.host, "nft", "add", "rule", nf, "ctfix_lab_kube", "services",
                     nf, "daddr", cluster_ip, "udp", "dport", str(LATER), "jump",
                     "sep_other_port")
        return
    for tool, cluster_ip in (("iptables-legacy", CLUSTER_IP_V4),
                             ("ip6tables-legacy", CLUSTER_IP_V6)):
        topo.run(topo.host, tool, "-w", "-t", "nat", "-A", "KUBE-SERVICES", "-d", cluster_ip,
                 "-p", "udp", "-m", "udp", "--dport", str(LATER), "-j", "KUBE-SEP-OTHER")


def test_snat_zone_repairs_the_clusterip_clients_and_reverts_exactly(cluster: Topology) -> None:
    topo = cluster
    assert [reply_from(topo, ip, p) for ip, p in SERVICES] == [None] * 4
    before = kernel_state(topo)

    applied = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply", "--listen", "0",
                        "--json")
    assert applied.returncode == 0, applied.stderr
    covers = {c["service"] for c in as_json(applied)["plan"]["covers"]}
    assert {f"{ip}:{p}" if ":" not in ip else f"[{ip}]:{p}" for ip, p in SERVICES} <= covers

    # Twice each: the second request of a pod goes through the remembered path. Each
    # reply comes from exactly the ClusterIP and port the pod asked.
    for _ in range(2):
        assert [reply_from(topo, ip, p) for ip, p in SERVICES] == SERVICES
    # Clients of the node's own addresses stay answered, from the address they asked.
    for address in (UPLINK_V4, BRIDGE_V4, UPLINK_V6, BRIDGE_V6):
        assert reply_from(topo, address, PORT) == (address, PORT)

    status = ctfix_fix(topo, "--status", "--json")
    assert status.returncode == 0, status.stdout
    [fix] = as_json(status)["fixes"]
    assert fix["ok"] and fix["effect"]["verdict"] == "no-failure-seen"

    reverted = ctfix_fix(topo, "--revert", str(PORT))
    assert reverted.returncode == 0, reverted.stderr
    after = kernel_state(topo)
    if topo.netfilter == "iptables-legacy":
        after = without_loaded_raw(after, before)
    assert after == before
    assert reply_from(topo, CLUSTER_IP_V4, OTHER) is None


def test_applying_again_names_a_service_forwarded_since_and_the_way_to_cover_it(
    cluster: Topology,
) -> None:
    """QA F9: the natural reflex, applying again, must not say "nothing to do" (exit 0)
    while the recorded fix misses a service a new plan would cover; the commands it
    gives cover it."""
    topo = cluster
    first = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply", "--listen", "0")
    assert first.returncode == 0, first.stderr
    same = as_json(ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply", "--json"))
    assert same["already_applied"] and same["ok"] and same["cover_with"] is None

    forward_later(topo)
    later = f"{CLUSTER_IP_V4}:{LATER}"
    again = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply", "--json")
    assert again.returncode == 1, again.stdout
    said = as_json(again)
    assert said["already_applied"] and not said["applied"] and not said["ok"]
    assert later in [s["service"] for s in said["effect"]["uncovered"]]
    assert reply_from(topo, CLUSTER_IP_V4, LATER) is None  # nothing changed

    # The way out it gives, run as given: the new service's pods are answered from it.
    for command in [*said["cover_with"], f"ctfix fix --revert --netns {topo.host}"]:
        words = shlex.split(command)
        assert words[:2] == ["ctfix", "fix"]
        if "--revert" not in words:  # before the last revert: the new service answered
            assert reply_from(topo, CLUSTER_IP_V4, LATER) is None
        # A bound, not a timing: iptables-legacy removes each of the ~40 rules in a
        # child of its own (python-iptables), minutes on a loaded machine.
        done = subprocess.run([sys.executable, "-m", "ctfix", *words[1:]],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        if words[2] == str(PORT):  # applied again: it covers the new service
            assert reply_from(topo, CLUSTER_IP_V4, LATER) == (CLUSTER_IP_V4, LATER)
            assert reply_from(topo, CLUSTER_IP_V4, OTHER) == (CLUSTER_IP_V4, OTHER)
            now = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply", "--json")
            assert now.returncode == 0 and as_json(now)["ok"], now.stdout


@pytest.mark.parametrize(
    ("netfilter", "timestamps"), [("nft", True), ("iptables-legacy", False)]
)
def test_a_service_forwarded_after_the_fix_is_not_covered_and_the_fix_ineffective_for_it(
    netfilter: Netfilter, timestamps: bool
) -> None:
    """With conntrack timestamps on, and without (then the entries' time left dates
    the wrong-source replies)."""
    with _cluster(netfilter) as topo:
        if timestamps:
            topo.run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=1")
        applied = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply",
                            "--listen", "0")
        assert applied.returncode == 0, applied.stderr
        forward_later(topo)
        later = f"{CLUSTER_IP_V4}:{LATER}"

        status = ctfix_fix(topo, "--status", "--json")
        assert status.returncode == 1
        [fix] = as_json(status)["fixes"]
        assert fix["whole"] and not fix["ok"]
        assert later in [s["service"] for s in fix["effect"]["uncovered"]]

        assert reply_from(topo, CLUSTER_IP_V4, OTHER) == (CLUSTER_IP_V4, OTHER)
        # Conntrack dates a reply to the second (it never dates one later than it
        # left): the pods of the new service ask until a reply is dated after the fix.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert reply_from(topo, CLUSTER_IP_V4, LATER) is None  # its pods: nothing
            status = ctfix_fix(topo, "--status", "--json")
            effect = as_json(status)["fixes"][0]["effect"]
            if effect["verdict"] == "ineffective":
                break
        assert status.returncode == 1
        assert effect["verdict"] == "ineffective"
        assert effect["ineffective_for"] == [later]
        evidence = effect["since_fix"][0]
        assert evidence["service"] == later and evidence["client"].startswith("192.0.2.3:")
        assert evidence["last_seen"] >= fix["applied"]
        assert ("conntrack timestamps" in effect["evidence"]) == timestamps
        text = ctfix_fix(topo, "--status")
        assert f"effect: INEFFECTIVE for clients of {later}" in text.stdout
        assert f"NOT COVERED: clients of {later}, DNAT'd to {UPLINK_V4}:{PORT}" in text.stdout

        explained = subprocess.run(
            [sys.executable, "-m", "ctfix", "explain", str(PORT), "--json",
             "--netns", topo.host],
            capture_output=True, text=True, timeout=60,
        )
        assert explained.returncode == 1
        found = as_json(explained)
        assert found["verdict"] == "broken"
        codes = [r["code"] for r in found["reasons"]]
        assert "fix-ineffective" in codes and "fix-not-covering" in codes
        assert found["fix_effect"]["ineffective_for"] == [later]

        assert ctfix_fix(topo, "--revert").returncode == 0


@contextlib.contextmanager
def _apply_in_background(
    topo: Topology, listen: str, state: Path
) -> Iterator[subprocess.Popen[str]]:
    """`fix --apply --listen S --json` running; yielded once its fix is recorded whole
    (then it listens); never left running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctfix", "fix", str(PORT), "--method", "snat-zone", "--apply",
         "--listen", listen, "--json", "--netns", topo.host],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    try:
        _wait_recorded(proc, state)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_recorded(proc: subprocess.Popen[str], state: Path) -> None:
    """Until the apply has recorded its fix whole (then it listens)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        records = [json.loads(Path(p).read_text()) for p in glob.glob(f"{state}/*.json")]
        if any(f["complete"] for r in records for f in r["fixes"].values()):
            return
        time.sleep(0.05)


def _ask_until_done(
    topo: Topology, proc: subprocess.Popen[str], address: str, port: int
) -> dict[str, Any]:
    """Ask address:port from the pod until the apply is done listening; its JSON."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        udp_exchange(topo.container, address, port, timeout=0.2)
    out, err = proc.communicate(timeout=30)
    assert out, err
    result: dict[str, Any] = json.loads(out)
    result["returncode"] = proc.returncode
    return result


def test_apply_listens_and_says_when_the_fix_does_not_stop_wrong_source_replies(
    state_dir: Path,
) -> None:
    """A Service port DNAT'd while the apply listens: its pods get wrong-source
    replies after the fix, and the apply says so (exit 1), naming the service."""
    with _cluster("nft") as topo:
        with _apply_in_background(topo, "6", state_dir) as proc:
            forward_later(topo)
            result = _ask_until_done(topo, proc, CLUSTER_IP_V4, LATER)
        assert result["returncode"] == 1
        assert result["effect"]["ineffective"]
        assert {w["service"] for w in result["effect"]["wrong_source"]} == {
            f"{CLUSTER_IP_V4}:{LATER}"
        }
        assert ctfix_fix(topo, "--revert").returncode == 0


def test_apply_listens_and_counts_the_requests_it_saw_answered(state_dir: Path) -> None:
    with _cluster("nft") as topo:
        assert reply_from(topo, CLUSTER_IP_V4, OTHER) is None
        with _apply_in_background(topo, "3", state_dir) as proc:
            result = _ask_until_done(topo, proc, CLUSTER_IP_V4, OTHER)
        assert result["returncode"] == 0
        effect = result["effect"]
        assert not effect["ineffective"] and effect["wrong_source"] == []
        assert effect["requests"] >= 1
        assert ctfix_fix(topo, "--revert").returncode == 0
