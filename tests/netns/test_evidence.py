"""Issue 8: every statement of watch and explain agrees with what the kernel shows.

One test (or two) per case the issue saw: history reported as news (1), port-changing
protocols (2), claims the evidence contradicts (3), silent blindness (4), two client
network definitions (6). Servers run in the lab's host namespace, clients in the
container (or upstream) namespace; tests branch on JSON keys and reason codes only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctfix.lab.topology import (
    BRIDGE_V4,
    CONTAINER_NET_V4,
    CONTAINER_V4,
    UPLINK_V4,
    Topology,
    lab_topology,
    udp_exchange,
    wait_udp_bound,
)
from ctfix.platform import netns
from tests.netns.test_explain import explain_port
from tests.netns.test_watch import _watching
from tests.netns.udp_servers import CONTENT, tftp_get

PORT = 56789
SERVERS = str(Path(__file__).with_name("udp_servers.py"))
CTFIX = [sys.executable, "-m", "ctfix"]
TFTPD_HPA = Path("/usr/sbin/in.tftpd")
KB_ROOT = Path(__file__).resolve().parents[2] / ".venv" / "kb-root"
ATFTPD = KB_ROOT / "atftpd" / "usr" / "sbin" / "atftpd"


@pytest.fixture
def lab4() -> Iterator[Topology]:
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        yield topo


def records(stdout: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """watch --json: every finding record (in order), and the summary."""
    findings, summary = [], {}
    for line in stdout.splitlines():
        record = json.loads(line)
        if record["kind"] == "summary":
            summary = record
        else:
            findings.append(record)
    return findings, summary


def latest(findings: list[dict[str, Any]]) -> dict[tuple[str, str, bool], dict[str, Any]]:
    """The last record of each finding (watch prints a finding again at exit)."""
    return {(f["service"], f["actual_source"], f["existing"]): f for f in findings}


def watch_for(topo: Topology, seconds: float, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTFIX, "watch", "--netns", topo.host, "--json", "--duration", str(seconds), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def explain(topo: Topology, port: int, *extra: str) -> tuple[int, dict[str, Any]]:
    return explain_port(topo, port, *extra)


def codes(result: dict[str, Any]) -> set[str]:
    return {r["code"] for r in result["reasons"]}


def broken_server(topo: Topology, port: int = PORT) -> None:
    """A wildcard recvfrom/sendto echo server: answers by routing (the bug)."""
    server = topo.spawn(topo.host, [*CTFIX, "serve", "--broken", "--port", str(port)])
    wait_udp_bound(server.pid, port)


def test_server(topo: Topology, *argv: str) -> subprocess.Popen[bytes]:
    """One of tests/netns/udp_servers.py's servers on the host, once it says ready."""
    proc = topo.spawn(topo.host, [sys.executable, SERVERS, *argv], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


test_server.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def rules_dir(tmp_path: Path, entry: str) -> Path:
    """A user knowledge-base directory holding one entry (YAML, indented as a list item)."""
    directory = tmp_path / "rules"
    directory.mkdir(exist_ok=True)
    (directory / "test.yaml").write_text(
        "version: 1\nservices:\n" + textwrap.indent(textwrap.dedent(entry).strip(), "  ") + "\n"
    )
    return directory


# -- 1. history is not news -------------------------------------------------------------


@pytest.mark.parametrize("timestamps", [True, False], ids=["kernel-timestamps", "no-timestamps"])
def test_a_watch_started_after_the_broken_traffic_reports_it_as_existing(
    lab4: Topology, timestamps: bool
) -> None:
    if timestamps:  # per namespace and writable (FACTS.md)
        lab4.run(lab4.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=1")
    broken_server(lab4)
    before = [udp_exchange(lab4.container, UPLINK_V4, PORT, timeout=0.3) for _ in "12"]
    assert not any(e.answered for e in before)  # the bug, before the watch

    quiet = watch_for(lab4, 1)
    assert quiet.returncode == 0, quiet.stderr  # nothing happened while it watched
    findings, summary = records(quiet.stdout)
    assert findings and all(f["existing"] is True for f in findings), quiet.stdout
    (record,) = latest(findings).values()
    assert (record["service"], record["actual_source"]) == (
        f"{UPLINK_V4}:{PORT}",
        f"{BRIDGE_V4}:{PORT}",
    )
    assert record["count"] == 2
    if timestamps:  # the kernel's own time of the replies, before the watch began
        assert record["first_seen"] is not None and record["last_seen"] is not None
        assert record["first_seen"] <= record["last_seen"] < record["seen_before"]
    else:  # no made-up time: only that it happened before the watch began
        assert record["first_seen"] is None and record["last_seen"] is None
        assert record["seen_before"] == summary["started"]
    assert (summary["findings"], summary["existing"]) == (0, 1)

    with _watching(lab4, "--duration", "3") as watch:
        assert not udp_exchange(lab4.container, UPLINK_V4, PORT, timeout=0.3).answered
        stdout, stderr = watch.communicate(timeout=30)
    assert watch.returncode == 1, stderr  # news: a wrong-source reply during the watch
    findings, summary = records(stdout)
    live = latest(findings)[(f"{UPLINK_V4}:{PORT}", f"{BRIDGE_V4}:{PORT}", False)]
    assert live["count"] == 1 and live["seen_before"] is None
    assert (summary["findings"], summary["existing"]) == (1, 1)


def test_right_after_a_working_fix_watch_exits_0(
    lab4: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runbook's Verify step: fix --apply, then watch while clients retry."""
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    broken_server(lab4)
    assert not udp_exchange(lab4.container, UPLINK_V4, PORT, timeout=0.3).answered
    fix = [*CTFIX, "fix", str(PORT), "--netns", lab4.host]
    subprocess.run([*fix, "--method", "snat-zone", "--apply"], check=True, capture_output=True)
    try:
        with _watching(lab4, "--duration", "3") as watch:
            retry = udp_exchange(lab4.container, UPLINK_V4, PORT)
            stdout, stderr = watch.communicate(timeout=30)
    finally:
        subprocess.run([*fix, "--revert"], check=True, capture_output=True)
    assert retry.reply_from == (UPLINK_V4, PORT)
    assert watch.returncode == 0, stdout + stderr
    findings, summary = records(stdout)
    assert all(f["existing"] for f in findings)
    assert (summary["findings"], summary["existing"]) == (0, 1)


# -- 2. port-changing protocols (TFTP) -----------------------------------------------------

TFTP_PORT = 6969
TFTP_RULE = r"""
- id: test-tftp
  name: the test's TFTP-like server
  cmdline_patterns: ['udp_servers\.py tftp']
  ports: [6969]
  affected_when_wildcard: depends
  replies_from_other_port: true
  why: A TFTP-like server answers each request from a new port (RFC 1350).
  fix: Bind the transfer socket to the address the request was sent to.
  reference: https://www.rfc-editor.org/rfc/rfc1350
  confidence: high
"""


def transfers(topo: Topology, address: str, count: int, port: int = TFTP_PORT) -> list[Any]:
    with netns.entered(topo.container):
        return [tftp_get(address, port) for _ in range(count)]


def test_tftp_transfers_are_no_finding_and_a_wrong_address_is_one(
    lab4: Topology, tmp_path: Path
) -> None:
    rules = rules_dir(tmp_path, TFTP_RULE)
    with _watching(lab4, "--duration", "8", "--rules", str(rules)) as watch:
        right = test_server(lab4, "tftp", str(TFTP_PORT), "right")
        good = transfers(lab4, UPLINK_V4, 3) + transfers(lab4, BRIDGE_V4, 1)
        assert [(g[0], g[1][0]) for g in good] == [(CONTENT, UPLINK_V4)] * 3 + [
            (CONTENT, BRIDGE_V4)
        ]
        assert all(g[1][1] != TFTP_PORT for g in good)  # each from a new port

        status, result = explain(lab4, TFTP_PORT, "--rules", str(rules))
        assert (status, result["verdict"]) == (0, "ok"), result["reasons"]
        assert result["evidence"]["wrong_source"] == []
        assert (result["evidence"]["healthy"], result["evidence"]["unanswered"]) == (4, 0)

        lab4.stop(right)
        test_server(lab4, "tftp", str(TFTP_PORT), "wrong")
        bad = transfers(lab4, UPLINK_V4, 3)
        assert [b[1][0] for b in bad if b] == [BRIDGE_V4] * 3  # from the wrong address
        stdout, stderr = watch.communicate(timeout=30)
    assert watch.returncode == 1, stderr
    findings, summary = records(stdout)
    assert summary["findings"] == 1, stdout
    (finding,) = latest(findings).values()
    assert (finding["service"], finding["actual_source"]) == (f"{UPLINK_V4}:{TFTP_PORT}", BRIDGE_V4)
    assert finding["mismatch"] == "address+port" and finding["replies_from_other_port"] is True
    assert (finding["count"], finding["client_network"]) == (3, CONTAINER_NET_V4)

    status, result = explain(lab4, TFTP_PORT, "--rules", str(rules))
    assert (status, result["verdict"]) == (1, "broken"), result["reasons"]
    (wrong,) = result["evidence"]["wrong_source"]
    assert (wrong["service"], wrong["actual_source"]) == (f"{UPLINK_V4}:{TFTP_PORT}", BRIDGE_V4)
    assert (wrong["mismatch"], wrong["count"]) == ("address+port", 3)
    assert wrong["client_network"] == CONTAINER_NET_V4


@pytest.mark.parametrize("daemon", ["tftpd-hpa", "atftpd"])
def test_real_tftp_daemons_transfers_are_no_finding(
    lab4: Topology, tmp_path: Path, daemon: str
) -> None:
    """tftpd-hpa and atftpd answer from the address asked, from a new port: no finding
    in watch (the knowledge base marks the port's program) nor in explain. A first
    transfer to the bridge address (which routing picks anyway) before the watch:
    Debian 12's in.tftpd answers the very first request after start from the wildcard
    (rules/infra.yaml says why)."""
    root = tmp_path / "tftp"
    root.mkdir()
    (root / "file").write_bytes(CONTENT)
    if daemon == "tftpd-hpa":
        if not TFTPD_HPA.exists():
            pytest.skip("tftpd-hpa is not installed: run scripts/setup")
        argv = [str(TFTPD_HPA), "-L", "-a", "0.0.0.0:69", "-s", str(root)]
    else:
        if not ATFTPD.exists():
            pytest.skip("atftpd is not unpacked: run scripts/setup")
        argv = [str(ATFTPD), "--daemon", "--no-fork", "--logfile", "-", "--user", "root.root"]
        argv += ["--port", "69", str(root)]
    server = lab4.spawn(lab4.host, argv)
    wait_udp_bound(server.pid, 69)
    first = transfers(lab4, BRIDGE_V4, 1, port=69)
    with _watching(lab4, "--duration", "5") as watch:
        got = transfers(lab4, UPLINK_V4, 2, port=69) + transfers(lab4, BRIDGE_V4, 1, port=69)
        assert [(g[0], g[1][0]) for g in first + got if g] == [(CONTENT, BRIDGE_V4)] + [
            (CONTENT, UPLINK_V4)
        ] * 2 + [(CONTENT, BRIDGE_V4)]
        status, result = explain(lab4, 69)
        stdout, stderr = watch.communicate(timeout=30)
    assert watch.returncode == 0, stdout + stderr
    findings, summary = records(stdout)
    assert findings == [] and summary["findings"] == 0
    assert result["evidence"]["wrong_source"] == [], result["evidence"]
    assert (result["evidence"]["healthy"], result["evidence"]["unanswered"]) == (4, 0)
    assert (status, result["verdict"]) == (0, "ok"), result["reasons"]


# -- 3. evidence beats prediction --------------------------------------------------------

CLAIMS_NO_ANSWER = {"client-network-exposed", "only-matching-clients-seen", "wildcard-socket"}


def test_a_correct_server_ctfix_does_not_know_reads_ok_from_its_replies(lab4: Topology) -> None:
    test_server(lab4, "pktinfo-echo", str(PORT))
    exchanges = [udp_exchange(lab4.container, a, PORT) for a in (UPLINK_V4, BRIDGE_V4, UPLINK_V4)]
    assert [e.reply_from for e in exchanges] == [
        (UPLINK_V4, PORT),
        (BRIDGE_V4, PORT),
        (UPLINK_V4, PORT),
    ]
    status, result = explain(lab4, PORT)
    assert (status, result["verdict"]) == (0, "ok"), result["reasons"]
    assert "observed-right-source" in codes(result)
    assert not codes(result) & CLAIMS_NO_ANSWER, result["reasons"]
    assert all(cn["ok"] for cn in result["clients"]), result["clients"]
    (container,) = [cn for cn in result["clients"] if cn["network"] == CONTAINER_NET_V4]
    assert sorted(container["answered"]) == sorted([UPLINK_V4, BRIDGE_V4])
    assert result["fixes"] == []


def test_after_a_working_snat_zone_fix_no_sentence_says_no_answer(
    lab4: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    broken_server(lab4)
    fix = [*CTFIX, "fix", str(PORT), "--netns", lab4.host]
    subprocess.run([*fix, "--method", "snat-zone", "--apply"], check=True, capture_output=True)
    try:
        replies = [udp_exchange(lab4.container, a, PORT).reply_from for a in (UPLINK_V4, BRIDGE_V4)]
        status, result = explain(lab4, PORT)
    finally:
        subprocess.run([*fix, "--revert"], check=True, capture_output=True)
    assert replies == [(UPLINK_V4, PORT), (BRIDGE_V4, PORT)]
    assert (status, result["verdict"]) == (0, "ok"), result["reasons"]
    assert "snat-zone-in-place" in codes(result)
    assert not codes(result) & {"client-network-exposed", "only-matching-clients-seen"}


CONFIG_RULE = """
- id: test-echo
  name: the test's echo server
  cmdline_patterns: ['udp_servers\\.py pktinfo-echo']
  ports: [{port}]
  affected_when_wildcard: true
  why: It answers from the routing source unless reply-from-destination is set.
  fix: Set reply-from-destination = yes in {config}.
  fixed_if_config:
    - file: '{config}'
      pattern: '^\\s*reply-from-destination\\s*=\\s*yes'
  reference: https://example.org/test-echo
  confidence: high
"""


def test_a_fix_already_in_the_config_file_is_not_recommended_again(
    lab4: Topology, tmp_path: Path
) -> None:
    config = tmp_path / "echo.conf"
    config.write_text("# reply-from-destination = yes\nlog = quiet\n")
    rules = rules_dir(tmp_path, CONFIG_RULE.format(port=PORT, config=config))
    test_server(lab4, "pktinfo-echo", str(PORT))

    status, result = explain(lab4, PORT, "--rules", str(rules))
    assert (status, result["verdict"]) == (1, "at-risk"), result["reasons"]
    assert any(f["method"] == "bind" and "echo server" in f["summary"] for f in result["fixes"])

    config.write_text("log = quiet\nreply-from-destination = yes\n")
    status, result = explain(lab4, PORT, "--rules", str(rules))
    assert (status, result["verdict"]) == (0, "ok"), result["reasons"]
    assert "fix-already-in-effect" in codes(result)
    assert result["fixes"] == []


# -- 4. blindness is a finding ----------------------------------------------------------

TRUSTING_RULE = """
- id: trusted-socat
  name: socat (claimed, wrongly, to answer from the address asked)
  processes: [socat]
  ports: [{port}]
  affected_when_wildcard: false
  why: The test claims it; conntrack is the judge.
  fix: Nothing.
  reference: https://example.org/socat
  confidence: high
"""


@pytest.fixture
def untracked() -> Iterator[Topology]:
    """The lab without any netfilter rule: the host namespace tracks nothing."""
    with lab_topology(ipv6=False, netfilter="none") as topo:
        yield topo


def ctfix_tables(topo: Topology) -> list[str]:
    tables = topo.run(topo.host, "nft", "list", "tables").splitlines()
    return [t for t in tables if "ctfix" in t]


def test_explain_in_an_untracked_namespace_says_it_cannot_see(
    untracked: Topology, tmp_path: Path
) -> None:
    topo = untracked
    rules = rules_dir(tmp_path, TRUSTING_RULE.format(port=PORT))
    server = topo.spawn(topo.host, ["socat", f"UDP4-RECVFROM:{PORT},fork", "EXEC:cat"])
    wait_udp_bound(server.pid, PORT)
    assert not udp_exchange(topo.container, UPLINK_V4, PORT, timeout=0.3).answered

    status, result = explain(topo, PORT, "--rules", str(rules))
    assert result["tracking"] == {"ipv4": False, "ipv6": False}
    assert "not-tracked" in codes(result)
    assert result["verdict"] == "unknown" and status == 1, result["reasons"]

    text = subprocess.run(
        [*CTFIX, "explain", str(PORT), "--netns", topo.host, "--rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 1

    listening = subprocess.Popen(
        [
            *CTFIX,
            "explain",
            str(PORT),
            "--netns",
            topo.host,
            "--json",
            "--listen",
            "3",
            "--rules",
            str(rules),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Tracking is switched on once explain has subscribed to events: wait for it.
        wait_for(lambda: bool(ctfix_tables(topo)) or listening.poll() is not None)
        assert not udp_exchange(topo.container, UPLINK_V4, PORT, timeout=0.3).answered
        out, err = listening.communicate(timeout=30)
    finally:
        if listening.poll() is None:
            listening.kill()
            listening.communicate()
    assert err == "", err
    result = json.loads(out)
    assert (listening.returncode, result["verdict"]) == (1, "broken"), result["reasons"]
    assert {"wrong-source-live", "tracking-switched-on"} <= codes(result)
    assert result["tracking_switched_on"] == ["ipv4"] or result["tracking_switched_on"] == [
        "ipv4",
        "ipv6",
    ]
    assert ctfix_tables(topo) == []  # removed afterwards


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never came true"
        time.sleep(0.02)


def test_watch_summary_names_the_blind_families(untracked: Topology) -> None:
    plain = watch_for(untracked, 0.3)
    assert plain.returncode == 0, plain.stderr
    assert records(plain.stdout)[1]["tracking"] == {"ipv4": False, "ipv6": False}
    tracked = watch_for(untracked, 0.3, "--track")
    assert records(tracked.stdout)[1]["tracking"] == {"ipv4": True, "ipv6": True}
    assert ctfix_tables(untracked) == []


# -- 6. one client network definition --------------------------------------------------

LOW, HIGH = "192.0.2.0/25", "192.0.2.128/25"
HOST_HIGH, UPSTREAM_HIGH = "192.0.2.129", "192.0.2.130"
ANYCAST = "203.0.113.5"


@pytest.fixture
def split24() -> Iterator[Topology]:
    """The bridge and the uplink share 192.0.2.0/24: 192.0.2.0/25 on br0 (the
    container), 192.0.2.128/25 on the uplink (upstream); a /32 on lo; IPv4 tracked."""
    with lab_topology(ipv6=False, netfilter="none") as topo:
        topo.ip(topo.host, f"addr flush dev br0\naddr add {BRIDGE_V4}/25 dev br0")
        topo.ip(topo.host, f"addr add {HOST_HIGH}/25 dev eth0\naddr add {ANYCAST}/32 dev lo")
        topo.ip(
            topo.container,
            f"addr flush dev eth0\naddr add {CONTAINER_V4}/25 dev eth0\n"
            f"route add default via {BRIDGE_V4}",
        )
        topo.ip(topo.upstream, f"addr add {UPSTREAM_HIGH}/25 dev eth0")
        topo.ip(topo.upstream, f"route add {LOW} via {HOST_HIGH}")
        topo.run(
            topo.host,
            "nft",
            "-f",
            "-",
            stdin="table ip track {\n chain pre {\n  type filter hook prerouting priority 0;\n"
            "  ct state new counter\n }\n}\n",
        )
        yield topo


def test_one_client_network_definition_in_watch_and_explain(split24: Topology) -> None:
    topo = split24
    with _watching(topo, "--duration", "4") as watch:
        broken_server(topo)
        # The container asks the uplink side's address, upstream the bridge's: each
        # reply leaves from the address on the client's own side.
        assert not udp_exchange(topo.container, HOST_HIGH, PORT, timeout=0.3).answered
        assert not udp_exchange(topo.upstream, BRIDGE_V4, PORT, timeout=0.3).answered
        stdout, stderr = watch.communicate(timeout=30)
    findings, _summary = records(stdout)
    watched = {f["service"]: f["client_network"] for f in findings}
    assert watched == {f"{HOST_HIGH}:{PORT}": LOW, f"{BRIDGE_V4}:{PORT}": HIGH}, stderr

    _status, result = explain(topo, PORT)
    explained = {w["service"]: w["client_network"] for w in result["evidence"]["wrong_source"]}
    assert explained == watched
    networks = {cn["network"] for cn in result["clients"]}
    assert {LOW, HIGH} <= networks, result["clients"]
    assert not any(n.endswith("/32") for n in networks), networks
