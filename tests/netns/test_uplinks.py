"""Two uplinks, as a new user tries it: a host with wan1 and wan2 (a default route
each, metrics 100 and 200), two provider routers that drop what their customer sends
from another provider's network (BCP 38), a client on the internet behind both, and a
wildcard socat on the host.

What a user notices: explain names the uplink mismatch before any fix; after
`fix --method snat-zone --apply` the clients of both uplinks are answered and no reply
with wan2's address leaves by wan1 (the first provider counts what it drops); after
`--revert` the rules, routes and rulesets are what they were.
"""

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

from ctfix.lab.topology import Netfilter, family_of, udp_exchange, wait_udp_bound
from ctfix.lab.uplinks import (
    CLIENT_NET_V4,
    CLIENT_NET_V6,
    CLIENT_V4,
    ISP1_V4,
    ISP1_V6,
    ISP2_V4,
    ISP2_V6,
    WAN1_V4,
    WAN1_V6,
    WAN2_V4,
    WAN2_V6,
    TwoUplinks,
    uplinks_topology,
)
from ctfix.platform import netns
from tests.netns.kernel import namespace_state, without_loaded_tables

PORT = 40002
#: the addresses a client on the internet can send to, first provider's first
ADDRESSES = (WAN1_V4, WAN2_V4, WAN1_V6, WAN2_V6)


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    return tmp_path


def _topology(netfilter: Netfilter) -> Iterator[TwoUplinks]:
    with uplinks_topology(ipv6=True, netfilter=netfilter) as topo:
        # The wildcard server of the issue: socat answers with sendto() from whatever
        # source (and uplink) routing picks.
        for listen, wildcard in (
            (f"UDP4-RECVFROM:{PORT},fork", "0.0.0.0"),
            (f"UDP6-RECVFROM:{PORT},fork,ipv6only=1", "::"),
        ):
            server = topo.spawn(topo.host, ["socat", "-T", "3", listen, "EXEC:cat"])
            wait_udp_bound(server.pid, PORT, address=wildcard)
        yield topo


@pytest.fixture(params=["nft", "iptables-legacy"])
def uplinks(request: pytest.FixtureRequest) -> Iterator[TwoUplinks]:
    yield from _topology(request.param)


@pytest.fixture
def nft_uplinks() -> Iterator[TwoUplinks]:
    yield from _topology("nft")


def ctfix(topo: TwoUplinks, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctfix", *args, "--netns", topo.host],
        capture_output=True,
        text=True,
        timeout=60,
    )


def answered(topo: TwoUplinks) -> list[bool]:
    """A connect()ed client on the internet asks each address: answered (from it)?"""
    return [
        udp_exchange(topo.internet, address, PORT, timeout=1.0).answered
        for address in ADDRESSES
    ]


def explain_json(topo: TwoUplinks) -> dict[str, Any]:
    proc = ctfix(topo, "explain", str(PORT), "--json")
    assert proc.returncode in (0, 1), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def client_network(report: dict[str, Any], cidr: str) -> dict[str, Any]:
    found: dict[str, Any] = next(cn for cn in report["clients"] if cn["network"] == cidr)
    return found


def send_from(topo: TwoUplinks, source: str, destination: str) -> None:
    """One datagram from the host, bound to `source` (routed by its destination)."""
    with netns.entered(topo.host):
        sock = socket.socket(family_of(source), socket.SOCK_DGRAM)
    try:
        sock.bind((source, 0))
        sock.sendto(b"ctfix-probe", (destination, 9))
    finally:
        sock.close()


def wait_rejected(topo: TwoUplinks, isp: str, at_least: int) -> int:
    """The provider's count of dropped foreign-source packets, once it reaches
    `at_least` (or 10 s pass)."""
    deadline = time.monotonic() + 10
    count = topo.rejected(isp)
    while count < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
        count = topo.rejected(isp)
    return count


def test_explain_names_the_uplink_mismatch_before_any_fix(nft_uplinks: TwoUplinks) -> None:
    topo = nft_uplinks
    assert answered(topo) == [True, False, True, False]
    report = explain_json(topo)
    assert report["verdict"] == "broken"
    codes = [r["code"] for r in report["reasons"]]
    assert codes.count("reply-leaves-other-uplink") == 2  # IPv4 and IPv6
    for cidr, egress_gateway, address, gateway in (
        (CLIENT_NET_V4, ISP1_V4, WAN2_V4, ISP2_V4),
        (CLIENT_NET_V6, ISP1_V6, WAN2_V6, ISP2_V6),
    ):
        cn = client_network(report, cidr)
        assert (cn["egress"], cn["egress_gateway"], cn["ok"]) == ("wan1", egress_gateway, False)
        [uplink] = cn["uplinks"]
        assert (uplink["address"], uplink["interface"], uplink["gateway"]) == (
            address, "wan2", gateway,
        )
        assert uplink["routed"] and not uplink["rerouted"] and not uplink["ok"]
        assert uplink["source_routed"] is False  # no `ip rule from` on this host

    text = ctfix(topo, "explain", str(PORT))
    assert text.returncode == 1, text.stderr
    # Both uplinks and both gateways are named, for each family.
    for name in ("wan1", "wan2", ISP1_V4, ISP2_V4, ISP1_V6, ISP2_V6):
        assert name in text.stdout

    # A --gateway on no uplink of these clients is bad input: one line, nothing done.
    before = namespace_state(topo, topo.host)
    refused = ctfix(
        topo, "fix", str(PORT), "--method", "snat-zone", "--gateway", "203.0.113.1", "--apply"
    )
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "--gateway 203.0.113.1" in line
    assert namespace_state(topo, topo.host) == before


def test_policy_route_refusal_says_what_routing_would_do_and_this_namespace_timeout(
    nft_uplinks: TwoUplinks,
) -> None:
    """QA F23: only clients of wan2 seen; those that may address wan1's address are two
    routers away (wan1's address is not their gateway): they would be answered from
    wan2's. And conntrack's memory is this namespace's nf_conntrack_udp_timeout."""
    topo = nft_uplinks
    topo.run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=7")
    topo.run(topo.host, "conntrack", "-F")
    assert not udp_exchange(topo.internet, WAN2_V4, PORT, timeout=1.0).answered
    report = explain_json(topo)
    assert client_network(report, CLIENT_NET_V4)["addressed"] == [WAN2_V4]
    before = namespace_state(topo, topo.host)
    refused = ctfix(topo, "fix", str(PORT), "--method", "policy-route")
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert f"that address {WAN1_V4} (the host's own address on wan1) from {WAN2_V4}" in line
    assert "their gateway" not in line
    assert "after 7 s (nf_conntrack_udp_timeout in this namespace)" in line
    forced = ctfix(topo, "fix", str(PORT), "--method", "policy-route", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    [warning] = [w for w in json.loads(forced.stdout)["plan"]["warnings"] if WAN1_V4 in w]
    assert "their gateway" not in warning
    assert namespace_state(topo, topo.host) == before


def test_snat_zone_sends_replies_out_by_their_own_uplink_and_reverts_exactly(
    uplinks: TwoUplinks,
) -> None:
    topo = uplinks
    # The first provider's count is live: a packet with wan2's address that leaves by
    # wan1 (its default route has the lower metric) is counted there.
    send_from(topo, WAN2_V4, CLIENT_V4)
    baseline = wait_rejected(topo, topo.isp1, 1)
    assert baseline >= 1
    assert answered(topo) == [True, False, True, False]
    before = namespace_state(topo, topo.host)

    applied = ctfix(topo, "fix", str(PORT), "--method", "snat-zone", "--apply")
    assert applied.returncode == 0, applied.stderr
    # Twice each: the second request of a client goes through the remembered path.
    for _ in range(2):
        assert answered(topo) == [True, True, True, True]
    # Answered from wan2's address, through the second provider: nothing went out by
    # wan1 with wan2's address (the first provider would have dropped and counted it).
    assert topo.rejected(topo.isp1) == baseline
    assert topo.rejected(topo.isp2) == 0

    report = explain_json(topo)
    codes = [r["code"] for r in report["reasons"]]
    assert "reply-leaves-other-uplink" not in codes
    assert codes.count("reroute-in-place") == 2
    assert all(cn["ok"] for cn in report["clients"])

    status = ctfix(topo, "fix", "--status", "--json")
    assert status.returncode == 0, status.stdout
    document = json.loads(status.stdout)
    [fix] = document["fixes"]
    assert fix["complete"] and all(step["present"] for step in fix["steps"])
    # The reroute's fwmark rules, tables and default routes are explained by the record,
    # not mistaken for orphans.
    assert document["unrecorded"] == []

    reverted = ctfix(topo, "fix", "--revert")
    assert reverted.returncode == 0, reverted.stderr
    after = namespace_state(topo, topo.host)
    if topo.netfilter == "iptables-legacy":
        assert "cannot unload" in applied.stdout
        after = without_loaded_tables(after, before)
    assert after == before
    assert answered(topo) == [True, False, True, False]


def test_without_the_reroute_the_first_provider_drops_the_rewritten_replies(
    nft_uplinks: TwoUplinks,
) -> None:
    """What the first release did (the source rewritten, the uplink not): take the
    reroute's rule away and the replies with wan2's address leave by wan1, where the
    provider drops them. The fix's own status says it is no longer whole."""
    topo = nft_uplinks
    applied = ctfix(topo, "fix", str(PORT), "--method", "snat-zone", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert answered(topo) == [True, True, True, True]
    baseline = topo.rejected(topo.isp1)
    rule = f"priority 32100 fwmark {0xC7F00000 + PORT:#x} ipproto udp sport {PORT}"
    topo.run(topo.host, "ip", "rule", "del", *rule.split())

    assert answered(topo) == [True, False, True, True]
    assert wait_rejected(topo, topo.isp1, baseline + 1) > baseline
    status = ctfix(topo, "fix", "--status")
    assert status.returncode == 1 and "MISSING" in status.stdout
    assert ctfix(topo, "fix", "--revert").returncode == 0


def test_routes_are_read_with_their_gateways_metrics_and_every_next_hop(
    nft_uplinks: TwoUplinks,
) -> None:
    from ctfix.platform import routing

    topo = nft_uplinks
    topo.ip(
        topo.host,
        f"route add 203.0.113.128/25 table 77 nexthop via {ISP1_V4} dev wan1 "
        f"nexthop via {ISP2_V4} dev wan2\n",
    )
    with netns.entered(topo.host):
        table = routing.route_table()
    defaults = {
        (r.family, r.interface, r.gateway, r.metric)
        for r in table
        if r.destination in ("0.0.0.0/0", "::/0") and r.table == 254
    }
    assert defaults == {
        ("ipv4", "wan1", ISP1_V4, 100),
        ("ipv4", "wan2", ISP2_V4, 200),
        ("ipv6", "wan1", ISP1_V6, 100),
        ("ipv6", "wan2", ISP2_V6, 200),
    }
    multipath = {(r.interface, r.gateway) for r in table if r.table == 77}
    assert multipath == {("wan1", ISP1_V4), ("wan2", ISP2_V4)}
    assert os.geteuid() == 0


def test_a_lost_state_file_still_finds_and_removes_the_reroute(
    nft_uplinks: TwoUplinks, state_dir: Path
) -> None:
    """The reroute's objects (fwmark rules, default routes via the uplink's gateway in
    ctfix's reroute tables) carry ctfix's marks: with the record gone, --status names
    them and --revert PORT removes them, back to the namespace as it was."""
    topo = nft_uplinks
    before = namespace_state(topo, topo.host)
    applied = ctfix(topo, "fix", str(PORT), "--method", "snat-zone", "--apply")
    assert applied.returncode == 0, applied.stderr
    for path in state_dir.iterdir():
        path.unlink()

    status = ctfix(topo, "fix", "--status", "--json")
    assert status.returncode == 1
    kinds = {(m["kind"], m["port"]) for m in json.loads(status.stdout)["unrecorded"]}
    assert {("rule", PORT), ("route", PORT), ("nft-table", PORT)} <= kinds

    reverted = ctfix(topo, "fix", "--revert", str(PORT))
    assert reverted.returncode == 0, reverted.stderr
    assert namespace_state(topo, topo.host) == before
    assert ctfix(topo, "fix", "--status").returncode == 0
