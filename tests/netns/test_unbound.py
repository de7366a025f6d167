"""`ctfix scan` on a host where clients send to ports with nothing bound.

What a user notices: scan lists its one real service as before (ok, exit 0), and a
section counts the requests to each address:port with nothing bound (unreplied
requests, client hosts), the same count `ctfix explain PORT` gives for that port
(`unanswered-no-socket`); syslog's port, one-way by the knowledge base, is left out;
`scan --all-netns` says the same for this namespace. Nothing waits a fixed time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ctfix.lab.topology import (
    UPLINK_V4,
    Topology,
    lab_topology,
    udp_exchange,
    wait_udp_bound,
)

CTFIX = [sys.executable, "-m", "ctfix"]
SERVED, BUSY, QUIET, SYSLOG = 7020, 7021, 7022, 514


@pytest.fixture
def host() -> Iterator[Topology]:
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        # The entries must outlive a slow scan and explain on a loaded machine (this
        # namespace's own sysctl; the default is 30 s).
        topo.run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
        serve = topo.spawn(topo.host, [*CTFIX, "serve", "--port", str(SERVED)])
        wait_udp_bound(serve.pid, SERVED)
        assert udp_exchange(topo.container, UPLINK_V4, SERVED).answered
        asked = [
            udp_exchange(topo.container, UPLINK_V4, BUSY, timeout=0.2),
            udp_exchange(topo.container, UPLINK_V4, BUSY, timeout=0.2),
            udp_exchange(topo.upstream, UPLINK_V4, BUSY, timeout=0.2),  # a second host
            udp_exchange(topo.container, UPLINK_V4, QUIET, timeout=0.2),
            udp_exchange(topo.container, UPLINK_V4, SYSLOG, timeout=0.2),
        ]
        assert not any(exchange.answered for exchange in asked)  # what clients see
        yield topo


def ctfix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTFIX, *args], capture_output=True, text=True, timeout=300)


def counted(unbound: list[dict[str, Any]]) -> dict[str, tuple[str, int, int]]:
    return {u["service"]: (u["family"], u["flows"], u["clients"]) for u in unbound}


def test_scan_counts_requests_to_ports_with_nothing_bound_as_explain_does(host: Topology) -> None:
    scanned = ctfix("scan", "--netns", host.host, "--json")
    assert scanned.returncode == 0, scanned.stderr  # information, not a verdict
    document = json.loads(scanned.stdout)
    assert [(s["port"], s["verdict"]) for s in document["services"]] == [(SERVED, "ok")]
    assert document["counts"] == {"broken": 0, "at-risk": 0, "unknown": 0, "ok": 1}
    busy, quiet = f"{UPLINK_V4}:{BUSY}", f"{UPLINK_V4}:{QUIET}"
    assert counted(document["unbound"]) == {busy: ("ipv4", 3, 2), quiet: ("ipv4", 1, 1)}
    assert [u["service"] for u in document["unbound"]] == [busy, quiet]  # most first
    assert (document["unbound_more"], document["unbound_error"]) == (0, None)

    explained = ctfix("explain", str(BUSY), "--netns", host.host, "--json")
    assert explained.returncode == 1, explained.stderr  # nothing answers: an outage
    port = json.loads(explained.stdout)
    assert [r["code"] for r in port["reasons"] if r["code"].startswith("unanswered-")] == [
        "unanswered-no-socket"
    ]
    assert [(u["service"], u["reason"], u["flows"], u["clients"]) for u in port["unanswered"]] == [
        (busy, "no-socket", 3, 2)
    ]

    text = ctfix("scan", "--netns", host.host)
    assert text.returncode == 0, text.stderr
    assert busy in text.stdout and quiet in text.stdout
    assert f"{UPLINK_V4}:{SYSLOG}" not in text.stdout
    markdown = ctfix("scan", "--netns", host.host, "--format", "markdown").stdout
    assert f"`{busy}`" in markdown

    checked = ctfix("check", "--netns", host.host, "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["status"] == "ok"

    every = ctfix("scan", "--all-netns", "--json")
    assert every.returncode in (0, 1, 2), every.stderr  # other namespaces are not ours
    [ours] = [n for n in json.loads(every.stdout)["namespaces"] if n["netns"] == host.host]
    assert counted(ours["unbound"]) == counted(document["unbound"])
    assert ours["counts"] == {"broken": 0, "at-risk": 0, "unknown": 0, "ok": 1}
