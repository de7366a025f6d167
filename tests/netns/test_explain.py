"""`ctfix explain` in the write-up's lab topology, as a new user would try it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctfix.lab.topology import (
    BRIDGE_V4,
    CONTAINER_NET_V4,
    CONTAINER_V4,
    UPLINK_NET_V4,
    UPLINK_V4,
    Topology,
    lab_topology,
    udp_exchange,
    wait_udp_bound,
)
from ctfix.platform import netns

PORT = 56789
EXPLAIN = [sys.executable, "-m", "ctfix", "explain"]


def explain_port(topo: Topology, port: int, *extra: str) -> tuple[int, dict[str, Any]]:
    """`ctfix explain PORT --netns HOST --json`: its exit status and its JSON."""
    proc = subprocess.run(
        [*EXPLAIN, str(port), "--netns", topo.host, "--json", *extra],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stderr == "", proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    assert (result["schema"], result["netns"]) == (2, topo.host)
    assert all(set(reason) == {"code", "text"} for reason in result["reasons"])
    return proc.returncode, result


def explain(topo: Topology, *extra: str) -> tuple[int, dict[str, Any]]:
    return explain_port(topo, PORT, *extra)


def netcat(topo: Topology, *args: str) -> int:
    """Start netcat-openbsd on the host; it sends a line every 0.2 s once it has a peer."""
    shell = topo.spawn(
        topo.host,
        ["sh", "-c", f"while :; do echo pong; sleep 0.2; done | nc -ul {' '.join(args)} {PORT}"],
    )
    wait_udp_bound(shell.pid, PORT)
    out = topo.run(topo.host, "ss", "-Hunlp", f"sport = :{PORT}")
    pid = int(out.split("pid=", 1)[1].split(",", 1)[0])
    with open(f"/proc/{pid}/comm") as fh:
        assert fh.read().strip() == "nc"
    return pid


def kernel_state(topo: Topology) -> tuple[str, str, str]:
    """What explain must leave untouched: nft ruleset, legacy table lists, rules."""
    nft = topo.run(topo.host, "nft", "list", "ruleset")
    legacy = topo.run(topo.host, "cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names")
    rules = topo.run(topo.host, "ip", "rule") + topo.run(
        topo.host, "ip", "route", "show", "table", "all"
    )
    return nft, legacy, rules


@pytest.fixture
def lab4() -> Iterator[Topology]:
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        yield topo


def codes(result: dict[str, Any]) -> list[str]:
    """The reason codes of explain's JSON: what tests branch on, never the text."""
    return [r["code"] for r in result["reasons"]]


def client_network(result: dict[str, Any], network: str) -> dict[str, Any]:
    found = [c for c in result["clients"] if c["network"] == network]
    assert found, result["clients"]
    first: dict[str, Any] = found[0]
    return first


def test_netcat_is_at_risk_then_broken_with_evidence(lab4: Topology) -> None:
    pid = netcat(lab4)
    before = kernel_state(lab4)

    status, result = explain(lab4)
    assert (status, result["verdict"]) == (1, "at-risk")
    [nc] = result["listeners"]
    assert (nc["process"], nc["pid"], nc["address"], nc["state"]) == (
        "nc",
        pid,
        "0.0.0.0",
        "listening",
    )
    container = client_network(result, CONTAINER_NET_V4)
    assert container["predicted_source"] == BRIDGE_V4
    assert UPLINK_V4 in container["addressed"] and not container["ok"]

    # A client in the container sends to the uplink address. It stays open and
    # unconnected, so netcat's replies reach it and netcat stays alive.
    with netns.entered(lab4.container):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.settimeout(2.0)
        client.sendto(b"ping", (UPLINK_V4, PORT))
        _data, source = client.recvfrom(100)
        assert source[0] == BRIDGE_V4  # the bug itself: the reply's source is wrong
        status, result = explain(lab4)
    finally:
        client.close()
    assert (status, result["verdict"]) == (1, "broken")
    [wrong] = result["evidence"]["wrong_source"]
    assert wrong["service"] == f"{UPLINK_V4}:{PORT}"
    assert wrong["actual_source"] == f"{BRIDGE_V4}:{PORT}"
    assert wrong["client"].startswith(CONTAINER_V4 + ":")
    [nc] = result["listeners"]  # connect()ed to its client now, still found
    assert (nc["process"], nc["pid"], nc["state"]) == ("nc", pid, "connected")
    assert nc["peer"].startswith(CONTAINER_V4 + ":")
    assert {f["method"] for f in result["fixes"]} == {
        "pktinfo",
        "bind",
        "policy-route",
        "snat-zone",
    }
    assert kernel_state(lab4) == before


def test_server_bound_to_one_address_is_ok(lab4: Topology) -> None:
    netcat(lab4, BRIDGE_V4)
    status, result = explain(lab4)
    assert (status, result["verdict"]) == (0, "ok"), result["reasons"]
    assert result["listeners"][0]["address"] == BRIDGE_V4


def test_ctfix_serve_is_ok(lab4: Topology) -> None:
    server = lab4.spawn(lab4.host, [sys.executable, "-m", "ctfix", "serve", "--port", str(PORT)])
    wait_udp_bound(server.pid, PORT)
    status, result = explain(lab4)
    assert (status, result["verdict"]) == (0, "ok"), result["reasons"]
    assert all(lst["pid"] == server.pid for lst in result["listeners"])


def _snat_problem(result: dict[str, Any], backend: str) -> str:
    hits = [r for r in result["rules"] if r["backend"] == backend and "56789" in r["rule"]]
    assert hits, result["rules"]
    problem: str = hits[0]["problem"]
    return problem


def test_snat_rule_in_nftables_is_listed_with_its_problem(lab4: Topology) -> None:
    netcat(lab4)
    lab4.run(
        lab4.host,
        "nft",
        "-f",
        "-",
        stdin="table ip attempt {\n chain post {\n  type nat hook postrouting priority srcnat;\n"
        f"  ip saddr {BRIDGE_V4} udp sport {PORT} snat to {UPLINK_V4}:{PORT}\n }}\n}}\n",
    )
    status, result = explain(lab4)
    assert status == 1
    problem = _snat_problem(result, "nftables")
    assert "insert_failed" in problem and "EPERM" in problem


def test_snat_rule_in_iptables_legacy_is_listed_without_creating_tables() -> None:
    with lab_topology(ipv6=False, netfilter="iptables-legacy") as topo:
        netcat(topo)
        topo.run(
            topo.host,
            *["iptables-legacy", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", BRIDGE_V4],
            *[
                "-p",
                "udp",
                "--sport",
                str(PORT),
                "-j",
                "SNAT",
                "--to-source",
                f"{UPLINK_V4}:{PORT}",
            ],
        )
        before = kernel_state(topo)
        status, result = explain(topo)
        assert status == 1
        problem = _snat_problem(result, "iptables-legacy")
        assert "insert_failed" in problem
        [hit] = [r for r in result["rules"] if r["backend"] == "iptables-legacy" and r["problem"]]
        assert hit["rule"].startswith(
            f"-A POSTROUTING -s {BRIDGE_V4}/32 -p udp -m udp --sport {PORT}"
        )
        # Reading must not have created the filter/mangle/raw tables.
        assert kernel_state(topo) == before


def test_missing_namespace_is_one_line_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ctfix", "explain", "53", "--netns", "ctfix-no-such-ns"],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not found" in proc.stderr


def test_snat_zone_fix_reads_ok_and_its_rules_have_no_problem(
    lab4: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))  # not the machine's /run/ctfix
    netcat(lab4)
    assert explain(lab4)[1]["verdict"] == "at-risk"
    fix = [sys.executable, "-m", "ctfix", "fix", str(PORT), "--netns", lab4.host]
    subprocess.run([*fix, "--method", "snat-zone", "--apply"], check=True, capture_output=True)
    try:
        status, result = explain(lab4)
        assert (status, result["verdict"]) == (0, "ok"), result["reasons"]
        ours = [r for r in result["rules"] if "ctfix_" in r["table"]]
        assert ours and all(r["problem"] is None for r in ours)
    finally:
        subprocess.run([*fix, "--revert"], check=True, capture_output=True)
    assert explain(lab4)[1]["verdict"] == "at-risk"


def test_evidence_from_before_a_fix_does_not_read_as_broken(
    lab4: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `ctfix fix --apply`, the wrong-source entries still in conntrack are
    history: explain says so and reads ok; after --revert the port is broken again."""
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    server = lab4.spawn(
        lab4.host, [sys.executable, "-m", "ctfix", "serve", "--broken", "--port", str(PORT)]
    )
    wait_udp_bound(server.pid, PORT)
    assert not udp_exchange(lab4.container, UPLINK_V4, PORT).answered
    assert explain(lab4)[1]["verdict"] == "broken"
    fix = [sys.executable, "-m", "ctfix", "fix", str(PORT), "--netns", lab4.host]
    subprocess.run([*fix, "--method", "snat-zone", "--apply"], check=True, capture_output=True)
    try:
        status, result = explain(lab4)
        assert (status, result["verdict"]) == (0, "ok"), result["reasons"]
        assert result["evidence"]["wrong_source"], "the old entry is still shown as evidence"
        assert "history-predates-fix" in codes(result)
        assert udp_exchange(lab4.container, UPLINK_V4, PORT).reply_from == (UPLINK_V4, PORT)
    finally:
        subprocess.run([*fix, "--revert"], check=True, capture_output=True)
    assert explain(lab4)[1]["verdict"] == "broken"


def socat_cat(topo: Topology, port: int = PORT) -> None:
    """socat's fork-per-client echo server: each client gets its own wrong-source reply."""
    server = topo.spawn(topo.host, ["socat", f"UDP4-RECVFROM:{port},fork", "EXEC:cat"])
    wait_udp_bound(server.pid, port)


def test_two_clients_answered_from_the_wrong_source_are_two_not_one_unanswered(
    lab4: Topology,
) -> None:
    """QA P2.5: two clients, two wrong-source replies; both are requests without a
    usable reply, counted once: `evidence.unanswered` is the unanswered records' count
    (round 4 F1), and each is `wrong-source`, none `no-reply`."""
    socat_cat(lab4)
    first, second = (udp_exchange(lab4.container, UPLINK_V4, PORT, timeout=0.5) for _ in "12")
    assert not first.answered and not second.answered
    status, result = explain(lab4)
    assert (status, result["verdict"]) == (1, "broken")
    [wrong] = result["evidence"]["wrong_source"]
    assert (wrong["service"], wrong["actual_source"]) == (
        f"{UPLINK_V4}:{PORT}",
        f"{BRIDGE_V4}:{PORT}",
    )
    assert (wrong["count"], wrong["clients"]) == (2, 2)
    assert wrong["client_network"] == CONTAINER_NET_V4
    assert [(u["reason"], u["flows"]) for u in result["unanswered"]] == [("wrong-source", 2)]
    assert result["evidence"]["unanswered"] == 2


def test_after_a_working_snat_zone_fix_no_client_is_the_server_itself(
    lab4: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QA P2.3: the remedy's zoned replies start at the server's address; paired with
    the next client they read `wrong source: 192.0.2.1:P -> 192.0.2.3:Q (port mismatch)`."""
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    socat_cat(lab4)
    fix = [sys.executable, "-m", "ctfix", "fix", str(PORT), "--netns", lab4.host]
    subprocess.run([*fix, "--method", "snat-zone", "--apply"], check=True, capture_output=True)
    try:
        exchanges = [
            udp_exchange(lab4.container, a, PORT) for a in (UPLINK_V4, UPLINK_V4, BRIDGE_V4)
        ]
        assert [e.reply_from for e in exchanges] == [
            (UPLINK_V4, PORT),
            (UPLINK_V4, PORT),
            (BRIDGE_V4, PORT),
        ]  # the fix works on the wire
        status, result = explain(lab4)
    finally:
        subprocess.run([*fix, "--revert"], check=True, capture_output=True)
    assert (status, result["verdict"]) == (0, "ok"), result["evidence"]
    assert result["evidence"]["wrong_source"] == []
    assert (result["evidence"]["healthy"], result["evidence"]["unanswered"]) == (3, 0)


# -- second QA pass: P1 (a trusted name), P3 (DNAT), P7 (forced policy-route) ----------


def test_a_broken_server_named_like_a_trusted_one_is_broken(lab4: Topology, tmp_path: Path) -> None:
    """QA2 P1: socat copied to a file named dnsmasq. The knowledge base says dnsmasq
    answers from the address asked; the conntrack evidence says this one does not."""
    fake = tmp_path / "dnsmasq"
    fake.write_bytes(Path("/usr/bin/socat").read_bytes())
    fake.chmod(0o755)
    server = lab4.spawn(lab4.host, [str(fake), f"UDP4-RECVFROM:{PORT},fork", "EXEC:cat"])
    wait_udp_bound(server.pid, PORT)

    # The request is sent while explain listens: live evidence.
    listening = subprocess.Popen(
        [*EXPLAIN, str(PORT), "--netns", lab4.host, "--json", "--listen", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.8)  # explain subscribes to events first thing
        assert not udp_exchange(lab4.container, UPLINK_V4, PORT, timeout=0.5).answered
        out, err = listening.communicate(timeout=30)
    finally:
        if listening.poll() is None:
            listening.kill()
            listening.wait()
    assert err == "", err
    result = json.loads(out)
    assert (listening.returncode, result["verdict"]) == (1, "broken"), result["reasons"]
    assert result["service"] and "dnsmasq" in result["service"]
    assert {lst["process"] for lst in result["listeners"]} == {"dnsmasq"}
    assert "knowledge-base-contradicted" in codes(result), result["reasons"]
    assert "wrong-source-live" in codes(result)
    assert "history-predates-fix" not in codes(result)
    [wrong] = result["evidence"]["wrong_source"]
    assert wrong["actual_source"] == f"{BRIDGE_V4}:{PORT}"

    # And from the table alone, afterwards.
    status, result = explain(lab4)
    assert (status, result["verdict"]) == (1, "broken"), result["reasons"]


DNAT_PORT = 9053


def test_a_dnat_forwarded_port_counts_for_the_service_and_points_to_it(lab4: Topology) -> None:
    """QA2 P3: UPLINK:9053 is DNAT'd to BRIDGE:PORT, where a wildcard server answers
    the upstream client from the uplink address (routing), which conntrack cannot
    translate back: the client gets nothing."""
    lab4.run(
        lab4.host,
        "nft",
        "-f",
        "-",
        stdin="table ip qa_dnat {\n chain prerouting {\n"
        "  type nat hook prerouting priority dstnat;\n"
        f"  ip daddr {UPLINK_V4} udp dport {DNAT_PORT} dnat to {BRIDGE_V4}:{PORT}\n }}\n}}\n",
    )
    server = lab4.spawn(
        lab4.host, [sys.executable, "-m", "ctfix", "serve", "--broken", "--port", str(PORT)]
    )
    wait_udp_bound(server.pid, PORT)
    assert not udp_exchange(lab4.upstream, UPLINK_V4, DNAT_PORT, timeout=0.5).answered

    status, result = explain_port(lab4, PORT)
    assert (status, result["verdict"]) == (1, "broken"), result["reasons"]
    [wrong] = result["evidence"]["wrong_source"]
    assert wrong["service"] == f"{UPLINK_V4}:{DNAT_PORT}"
    assert wrong["expected_source"] == f"{BRIDGE_V4}:{PORT}"
    assert wrong["actual_source"] == f"{UPLINK_V4}:{PORT}"
    assert client_network(result, UPLINK_NET_V4)["addressed"] == [BRIDGE_V4]

    status, result = explain_port(lab4, DNAT_PORT)
    assert result["forwarded_to"] == [f"{BRIDGE_V4}:{PORT}"]
    assert result["service_down"] is False
    assert codes(result)[0] == "forwarded-by-dnat" and "nothing-answers" not in codes(result)
    assert (status, result["verdict"]) == (1, "broken")  # the same evidence, seen from 9053
    assert any("dnat to" in r["rule"] for r in result["rules"])


def test_evidence_from_before_a_forced_policy_route_is_history(
    lab4: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QA2 P7: after `fix --method policy-route --force --apply`, the reply to the
    container's client is right; the wrong one before it is history, and explain reads
    at-risk for the clients of the gateway address that the route strands."""
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    server = lab4.spawn(
        lab4.host, [sys.executable, "-m", "ctfix", "serve", "--broken", "--port", str(PORT)]
    )
    wait_udp_bound(server.pid, PORT)
    assert not udp_exchange(lab4.container, UPLINK_V4, PORT, timeout=0.5).answered
    assert explain(lab4)[1]["verdict"] == "broken"
    fix = [sys.executable, "-m", "ctfix", "fix", str(PORT), "--netns", lab4.host]
    subprocess.run(
        [*fix, "--method", "policy-route", "--force", "--apply"], check=True, capture_output=True
    )
    try:
        assert udp_exchange(lab4.container, UPLINK_V4, PORT).reply_from == (UPLINK_V4, PORT)
        status, result = explain(lab4)
        assert (status, result["verdict"]) == (1, "at-risk"), result["reasons"]
        assert result["evidence"]["wrong_source"], "the old entry is still shown"
        assert {"history-predates-fix", "client-network-exposed"} <= set(codes(result))
        gateway = client_network(result, "192.0.2.0/24")
        assert (gateway["ok"], gateway["onlink"]) == (False, [BRIDGE_V4]), result["reasons"]
    finally:
        subprocess.run([*fix, "--revert"], check=True, capture_output=True)
    assert explain(lab4)[1]["verdict"] == "broken"
