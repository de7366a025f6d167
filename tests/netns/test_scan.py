"""`ctfix scan` on a host with a broken, an at-risk and a correct UDP service.

What a user notices: every service is listed, worst first, each with the verdict,
reasons and fixes `ctfix explain PORT` gives for it (the test runs both and compares);
a client's socket is not a service; the exit status says something is wrong.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ctfix.lab.topology import (
    BRIDGE_V4,
    CONTAINER_V4,
    UPLINK_V4,
    Topology,
    lab_topology,
    udp_exchange,
    wait_udp_bound,
)

#: below net.ipv4.ip_local_port_range (32768-60999): a connected netcat there is a service
BROKEN, AT_RISK, CORRECT, NETCAT = 20101, 20102, 20103, 20104
CTFIX = [sys.executable, "-m", "ctfix"]


@pytest.fixture
def host() -> Iterator[Topology]:
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        for port in (BROKEN, AT_RISK):
            socat = topo.spawn(topo.host, ["socat", f"UDP4-RECVFROM:{port},fork", "EXEC:cat"])
            wait_udp_bound(socat.pid, port)
        serve = topo.spawn(topo.host, [*CTFIX, "serve", "--port", str(CORRECT)])
        wait_udp_bound(serve.pid, CORRECT)
        # The bug, in conntrack: a client of the uplink address gets no answer.
        assert not udp_exchange(topo.container, UPLINK_V4, BROKEN, timeout=0.5).answered
        assert udp_exchange(topo.container, UPLINK_V4, CORRECT).answered
        yield topo


def netcat_connected(topo: Topology) -> None:
    """netcat after its first datagram: its socket is connect()ed to that client, on a
    port outside the ephemeral range, so it is still a service."""
    shell = topo.spawn(
        topo.host, ["sh", "-c", f"while :; do echo pong; sleep 0.2; done | nc -ul {NETCAT}"]
    )
    wait_udp_bound(shell.pid, NETCAT)
    # A client that stays: netcat quits when its peer's port goes away (ICMP).
    staying = (
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.connect(({BRIDGE_V4!r}, {NETCAT}))\n"
        "s.send(b'ping')\n"
        "while True:\n"
        "    s.recv(100)\n"
    )
    topo.spawn(topo.container, [sys.executable, "-c", staying])
    deadline = time.monotonic() + 10
    while not topo.run(topo.host, "ss", "-Hun", "state", "established", f"sport = :{NETCAT}"):
        assert time.monotonic() < deadline, "netcat never connected to its first client"
        time.sleep(0.05)


def a_client_socket(topo: Topology) -> int:
    """A connect()ed client socket in the host namespace; its (ephemeral) port."""
    program = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.connect(({CONTAINER_V4!r}, 9))\n"
        "print(s.getsockname()[1], flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = topo.spawn(topo.host, [sys.executable, "-c", program], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return int(proc.stdout.readline())


def ctfix(topo: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTFIX, *args, "--netns", topo.host], capture_output=True, text=True, timeout=60
    )


def comparable(service: dict[str, Any]) -> dict[str, Any]:
    """What scan and explain must agree on (the prose and the clock aside)."""
    return {
        "verdict": service["verdict"],
        "codes": [r["code"] for r in service["reasons"]],
        "fixes": [(f["method"], f["recommended"]) for f in service["fixes"]],
        "wrong_source": [
            (w["service"], w["actual_source"]) for w in service["evidence"]["wrong_source"]
        ],
        "clients": [(c["network"], c["ok"]) for c in service["clients"]],
        "listeners": [(lst["pid"], lst["state"]) for lst in service["listeners"]],
    }


def test_scan_lists_every_service_worst_first_as_explain_judges_it(host: Topology) -> None:
    netcat_connected(host)
    client_port = a_client_socket(host)

    scanned = ctfix(host, "scan", "--json")
    assert scanned.returncode == 1, scanned.stderr
    document = json.loads(scanned.stdout)
    assert (document["schema"], document["netns"]) == (2, host.host)
    assert {"generated", "host", "ctfix"} <= set(document)
    services = document["services"]
    ports = [s["port"] for s in services]
    assert set(ports) == {BROKEN, AT_RISK, CORRECT, NETCAT}, ports
    assert client_port not in ports
    rank = {"broken": 0, "at-risk": 1, "ok": 2}
    assert [rank[s["verdict"]] for s in services] == sorted(rank[s["verdict"]] for s in services)
    verdicts = {s["port"]: s["verdict"] for s in services}
    assert (verdicts[BROKEN], verdicts[AT_RISK], verdicts[CORRECT]) == ("broken", "at-risk", "ok")
    assert ports[0] == BROKEN
    assert document["counts"]["broken"] >= 1 and document["counts"]["ok"] >= 1

    for service in services:
        explained = ctfix(host, "explain", str(service["port"]), "--json")
        assert explained.returncode in (0, 1), explained.stderr
        assert comparable(service) == comparable(json.loads(explained.stdout)), service["port"]

    text = ctfix(host, "scan")
    assert text.returncode == 1, text.stderr
    row = re.compile(r"^  (BROKEN|AT RISK|OK|DOWN) +(\d+)  ")
    table = [
        (m.group(1), int(m.group(2))) for m in map(row.match, text.stdout.splitlines()) if m
    ]
    assert [port for _v, port in table] == ports
    assert ("BROKEN", BROKEN) in table and ("OK", CORRECT) in table
    broken_line = next(line for line in text.stdout.splitlines() if f" {BROKEN} " in line)
    assert "wrong-source-seen:" in broken_line
    # The details follow for the ports that are not ok, explain's write-up for each.
    assert f"UDP port {BROKEN} in namespace {host.host}: BROKEN" in text.stdout
    assert f"UDP port {CORRECT} in namespace" not in text.stdout
