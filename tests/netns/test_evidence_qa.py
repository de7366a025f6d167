"""QA round 4 (issues 8 and 12): explain's statements agree with what the kernel shows,
with real traffic in the lab topology. Tests branch on JSON keys and reason codes only.

- F1: one count of requests without a usable reply (`evidence.unanswered`).
- F4, F8: replies the snat-zone fix rewrote in ctfix's zones are the fix's, also in the
  seconds its entries outlive a revert.
- F13: a one-way knowledge-base service has its own reason code.
- F14: a netcat that died after answering from the wrong source: the headline, and
  scan/check list the port although no socket is left.
- F18: real tftpd-hpa: transfers from a new port are answers, and the first request
  after start (the knowledge base's caveat) is that caveat, not a contradiction.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctfix.core.diagnosis.blindness import TRACKING_OFF, TRACKING_ON
from ctfix.lab.topology import (
    BRIDGE_V4,
    UPLINK_V4,
    Topology,
    lab_topology,
    udp_exchange,
    wait_udp_bound,
)
from ctfix.platform import netns, snapshot
from tests.netns.test_evidence import broken_server, codes, explain, transfers
from tests.netns.udp_servers import CONTENT

PORT = 56789
CTFIX = [sys.executable, "-m", "ctfix"]
TFTPD_HPA = Path("/usr/sbin/in.tftpd")


@pytest.fixture
def lab4() -> Iterator[Topology]:
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        yield topo


def unanswered_flows(result: dict[str, Any]) -> int:
    return sum(u["flows"] for u in result["unanswered"] if not u["one_way"])


def test_replies_through_a_reverted_fix_are_the_fixs_not_the_servers(
    lab4: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F4, F8: right after `fix --revert`, the zone entries of the replies the fix
    rewrote are still in the table: explain must not credit them to the server (no
    `observed-right-source`, no ok verdict), must not call their requests unanswered,
    and a new plan must still find something to fix."""
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    broken_server(lab4)
    fix = [*CTFIX, "fix", str(PORT), "--netns", lab4.host]
    subprocess.run([*fix, "--method", "snat-zone", "--apply"], check=True, capture_output=True)
    try:
        replies = [udp_exchange(lab4.container, UPLINK_V4, PORT).reply_from for _ in range(2)]
    finally:
        subprocess.run([*fix, "--revert"], check=True, capture_output=True)
    assert replies == [(UPLINK_V4, PORT)] * 2  # answered, through the fix

    status, result = explain(lab4, PORT)
    found = codes(result)
    assert "observed-right-source" not in found, result["reasons"]
    assert "answered-through-fix" in found, result["reasons"]
    assert (status, result["verdict"]) == (1, "at-risk"), result["reasons"]
    assert result["evidence"]["through_fix"] == 2
    assert result["evidence"]["unanswered"] == 0 == unanswered_flows(result)
    uplink = [cn for cn in result["clients"] if UPLINK_V4 in cn["addressed"]]
    assert uplink and not any(cn["ok"] or UPLINK_V4 in cn["answered"] for cn in uplink)

    # The fix's dry run still has clients of the uplink address to cover.
    plan = subprocess.run(
        [*fix, "--method", "snat-zone", "--json"], capture_output=True, text=True, timeout=60
    )
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["plan"]["steps"], plan.stdout


def test_the_command_explain_suggests_switches_tracking_on_in_an_empty_namespace() -> None:
    """F11: the `not-tracked` reason's command must work where it is suggested: in a
    namespace without any ruleset (no `inet filter` table to add a rule to)."""
    with lab_topology(ipv6=False, netfilter="none") as topo:
        assert topo.run(topo.host, "nft", "list", "ruleset").strip() == ""
        with netns.entered(topo.host):
            assert snapshot.tracking() == {"ipv4": False, "ipv6": False}
        subprocess.run(["ip", "netns", "exec", topo.host, "sh", "-ec", TRACKING_ON], check=True)
        with netns.entered(topo.host):
            assert snapshot.tracking() == {"ipv4": True, "ipv6": True}
        subprocess.run(["ip", "netns", "exec", topo.host, "sh", "-ec", TRACKING_OFF], check=True)
        assert topo.run(topo.host, "nft", "list", "ruleset").strip() == ""


def test_real_tftpd_hpa_first_request_is_the_caveat_and_transfers_are_answers(
    lab4: Topology, tmp_path: Path
) -> None:
    """F18: Debian's in.tftpd answers the first request after it starts from the
    address routing picks (its knowledge-base entry's documented caveat), every later
    one from the address asked, each from a new port. explain: no request it answered
    is unanswered (TFTP replies come from a new port, so the request's own entry stays
    unreplied, as watch knows), and the one wrong reply is the caveat, not a
    contradiction of the knowledge base."""
    if not TFTPD_HPA.exists():
        pytest.skip("tftpd-hpa is not installed: run scripts/setup")
    root = tmp_path / "tftp"
    root.mkdir()
    (root / "file").write_bytes(CONTENT)
    server = lab4.spawn(
        lab4.host, [str(TFTPD_HPA), "-L", "-a", "0.0.0.0:69", "-s", str(root)]
    )
    wait_udp_bound(server.pid, 69)
    got = (
        transfers(lab4, UPLINK_V4, 1, port=69)
        + transfers(lab4, BRIDGE_V4, 1, port=69)
        + transfers(lab4, UPLINK_V4, 2, port=69)
    )
    assert [(g[0], g[1][0]) for g in got if g] == [
        (CONTENT, BRIDGE_V4),  # the first request after start: the caveat
        (CONTENT, BRIDGE_V4),
        (CONTENT, UPLINK_V4),
        (CONTENT, UPLINK_V4),
    ]
    status, result = explain(lab4, 69)
    found = codes(result)
    assert "first-reply-caveat" in found, result["reasons"]
    assert "knowledge-base-contradicted" not in found, result["reasons"]
    assert (status, result["verdict"]) == (0, "ok"), result["reasons"]
    (wrong,) = result["evidence"]["wrong_source"]
    assert (wrong["service"], wrong["actual_source"], wrong["count"]) == (
        f"{UPLINK_V4}:69",
        BRIDGE_V4,
        1,
    )
    # Only the first request's reply was refused-worthy; the other three were answered.
    assert result["evidence"]["healthy"] == 3
    assert [(u["service"], u["reason"], u["flows"]) for u in result["unanswered"]] == [
        (f"{UPLINK_V4}:69", "wrong-source", 1)
    ]
    assert result["evidence"]["unanswered"] == 1 == unanswered_flows(result)


def _run_json(*argv: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([*CTFIX, *argv, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    document: dict[str, Any] = json.loads(proc.stdout)
    return proc.returncode, document


def test_a_netcat_gone_after_a_wrong_source_reply_is_listed_by_scan_and_check(
    lab4: Topology,
) -> None:
    """F14: netcat-openbsd answers its first client from the routing source, gets the
    client's ICMP port unreachable and exits: no socket is left, only the evidence.
    explain says broken (and that nothing answers now); scan and check list the port
    with the same verdict, though no socket is bound."""
    port = 6100
    nc = lab4.spawn(
        lab4.host,
        ["sh", "-c", f"while :; do echo pong; sleep 0.1; done | exec nc.openbsd -4 -u -l {port}"],
    )
    wait_udp_bound(nc.pid, port)
    assert not udp_exchange(lab4.container, UPLINK_V4, port, timeout=1.0).answered
    nc.wait(timeout=30)  # it exits on the ICMP error
    assert lab4.run(lab4.host, "ss", "-Hulnp", f"sport = :{port}").strip() == ""

    status, result = explain(lab4, port)
    assert (status, result["verdict"], result["service_down"]) == (1, "broken", True)
    assert result["listeners"] == [] and result["evidence"]["wrong_source"]

    scan_status, scanned = _run_json("scan", "--netns", lab4.host)
    by_port = {s["port"]: s for s in scanned["services"]}
    assert port in by_port, sorted(by_port)
    assert by_port[port]["verdict"] == "broken" and scan_status == 1
    def wrong(document: dict[str, Any]) -> list[tuple[str, str, int]]:
        return [
            (w["service"], w["actual_source"], w["count"])
            for w in document["evidence"]["wrong_source"]
        ]

    assert wrong(by_port[port]) == wrong(result)

    _check_status, checked = _run_json("check", "--netns", lab4.host)
    assert any(p["port"] == port for p in checked["problems"]), checked
