"""The lab's stale-NAT story: a one-way sender pinned to a backend that moved.

In the lab topology (ctfix.lab.topology) the host namespace forwards UDP port P of its
uplink address by DNAT to backend A (an address of the upstream namespace); a sender
in the container sends datagrams from a fixed port, as syslog, SNMP traps or statsd
do. Then the rule moves to backend B and A's address disappears: conntrack keeps the
sender's entry (its timeout restarts with every datagram), so everything goes into a
black hole. `ctfix explain` finds it (verdict broken, reason stale-nat, old and new
target), `ctfix fix P --method flush-stale --apply` deletes exactly that entry, and B
receives the next datagrams.

Each step is a `Check` of ctfix.lab.scenario. Know before changing: the lab exits 0
only when every check of both halves holds (the black hole and the finding; the flush,
the recovery and an unchanged rest of the table); ctfix is run as a user runs it
(`python -m ctfix ...` in a child), and every wait is a deadline, never a sleep.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from ctfix.core.addr import endpoint
from ctfix.core.decode import CtEntry
from ctfix.lab import topology as t
from ctfix.lab.checks import (
    Check,
    DeliveryCheck,
    EntryCheck,
    FlushCheck,
    Section,
    StaleFindingCheck,
    Story,
)
from ctfix.platform import netns

BACKEND_A = "198.51.100.21"
BACKEND_B = "198.51.100.22"
SENDER_PORT = 40514
_TABLE = "ctfix_lab_svc"

#: a one-way sender: `python -c SENDER ADDRESS SOURCE_PORT PORT`, 10 datagrams/s, each
#: "from SOURCE_PORT #N" so that a receiver can tell senders apart
SENDER = """\
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[2])))
number = 0
while True:
    number += 1
    sock.sendto(b"from %s #%d" % (sys.argv[2].encode(), number), (sys.argv[1], int(sys.argv[3])))
    time.sleep(0.1)
"""


def start_sender(topo: t.Topology, source_port: int, port: int) -> subprocess.Popen[bytes]:
    """A one-way sender in the container: CONTAINER_V4:source_port -> uplink:port."""
    return topo.spawn(
        topo.container, [sys.executable, "-c", SENDER, t.UPLINK_V4, str(source_port), str(port)]
    )


def _legacy_rule(port: int, backend: str) -> list[str]:
    return [
        "-d", f"{t.UPLINK_V4}/32", "-p", "udp", "-m", "udp", "--dport", str(port),
        "-j", "DNAT", "--to-destination", backend,
    ]


def _nft_rule(port: int, backend: str) -> str:
    return f"ip daddr {t.UPLINK_V4} udp dport {port} dnat to {backend}"


#: how the lab writes its DNAT rules: nft itself, or iptables in either flavour
#: (iptables-nft is what Docker and kube-proxy use on current distributions)
RuleTool = Literal["nft", "iptables-legacy", "iptables-nft"]


def _tool(topo: t.Topology, tool: RuleTool | None) -> RuleTool:
    if tool is not None:
        return tool
    return "iptables-legacy" if topo.netfilter == "iptables-legacy" else "nft"


def load_dnat(topo: t.Topology, port: int, backend: str, tool: RuleTool | None = None) -> None:
    """DNAT the uplink address's UDP port to backend: a rule of its own per port (an
    nftables table `ctfix_lab_svc_<port>`, or a PREROUTING rule of iptables)."""
    chosen = _tool(topo, tool)
    if chosen != "nft":
        topo.run(topo.host, chosen, "-w", "-t", "nat", "-A", "PREROUTING",
                 *_legacy_rule(port, backend))
        return
    topo.run(
        topo.host, "nft", "-f", "-",
        stdin=f"table ip {_TABLE}_{port} {{\n chain prerouting {{\n"
        "  type nat hook prerouting priority dstnat; policy accept;\n"
        f"  {_nft_rule(port, backend)}\n }}\n}}\n",
    )


def move_dnat(topo: t.Topology, port: int, backend: str, tool: RuleTool | None = None) -> None:
    """Point the port's rule at another backend, in place, in one change."""
    chosen = _tool(topo, tool)
    if chosen != "nft":
        listing = topo.run(topo.host, chosen, "-w", "-t", "nat", "-S", "PREROUTING")
        rules = [line for line in listing.splitlines() if line.startswith("-A PREROUTING")]
        index = next(n for n, line in enumerate(rules, 1) if f"--dport {port} " in line)
        topo.run(topo.host, chosen, "-w", "-t", "nat", "-R", "PREROUTING", str(index),
                 *_legacy_rule(port, backend))
        return
    topo.run(
        topo.host, "nft", "-f", "-",
        stdin=f"flush chain ip {_TABLE}_{port} prerouting\n"
        f"add rule ip {_TABLE}_{port} prerouting {_nft_rule(port, backend)}\n",
    )


class Backend:
    """A receiving socket on a backend address of the upstream namespace."""

    def __init__(self, topo: t.Topology, address: str, port: int) -> None:
        with netns.entered(topo.upstream):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.sock.setblocking(False)
        self.address = address

    def drain(self, source_port: int | None = None) -> int:
        """Datagrams waiting now (read), counted: all, or those of one sender."""
        count = 0
        while True:
            try:
                data = self.sock.recv(2048)
            except BlockingIOError:
                return count
            if source_port is None or data.startswith(b"from %d #" % source_port):
                count += 1

    def receives(self, within: float, source_port: int | None = None) -> int:
        """Datagrams that arrive within `within` seconds (returns at the first ones)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            got = self.drain(source_port)
            if got:
                return got
            time.sleep(0.05)
        return 0

    def close(self) -> None:
        self.sock.close()


def _ctfix(topo: t.Topology, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ctfix", *args, "--netns", topo.host]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _udp_table(topo: t.Topology) -> list[CtEntry]:
    from ctfix.platform import conntrack

    with netns.entered(topo.host):
        return list(conntrack.dump(family=socket.AF_INET, proto=17))


def _sender_entries(entries: list[CtEntry], port: int) -> list[CtEntry]:
    return [
        e for e in entries
        if (e.orig.src, e.orig.sport, e.orig.dst, e.orig.dport)
        == (t.CONTAINER_V4, SENDER_PORT, t.UPLINK_V4, port)
    ]


def _targets(entries: list[CtEntry]) -> tuple[str, ...]:
    return tuple(endpoint(e.reply.src, e.reply.sport) for e in entries)


def _others(entries: list[CtEntry], port: int) -> set[tuple[object, ...]]:
    """The rest of the table, as what identifies an entry (tuples, zone, id)."""
    sender = set(_sender_entries(entries, port))
    return {(e.orig, e.reply, e.zone, e.id) for e in entries if e not in sender}


@contextmanager
def _backends(topo: t.Topology, port: int) -> Iterator[tuple[Backend, Backend]]:
    a = Backend(topo, BACKEND_A, port)
    b = Backend(topo, BACKEND_B, port)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


#: told each section as it starts, then each of its checks (ctfix.lab.registry)
Report = Callable[[Section | Check], None]


def _add(section: Section, report: Report, check: Check) -> None:
    section.checks.append(check)
    report(check)


def run_story(topo: t.Topology, port: int, report: Report, *, timeout: float = 1.0) -> Story:
    """Reproduce the black hole, find it, flush it, see the recovery (module doc)."""
    assert not topo.ipv6, "IPv4 only: `ctfix lab` refuses --ipv6 (registry.IPV4_ONLY)"
    story = Story(port)
    # Ages and datagram counts for the finding (per-namespace, writable sysctls).
    topo.run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=1",
             "net.netfilter.nf_conntrack_acct=1")
    topo.ip(topo.upstream, f"addr add {BACKEND_A}/24 dev eth0\naddr add {BACKEND_B}/24 dev eth0\n")
    load_dnat(topo, port, BACKEND_A)
    with _backends(topo, port) as (a, b):
        # A neighbour that must survive the flush: another client of another port.
        with netns.entered(topo.container):
            neighbour = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            neighbour.sendto(b"neighbour", (t.UPLINK_V4, port + 1))
            sender = start_sender(topo, SENDER_PORT, port)
            try:
                _bug(topo, story, report, port, a, b, timeout)
                _fix(topo, story, report, port, b)
            finally:
                topo.stop(sender)
        finally:
            neighbour.close()
    return story


def _section(step: Literal["forwarded", "moved", "flushed"]) -> Section:
    return Section(False, 0, kind=f"stale-nat-{step}")


def _where(port: int) -> tuple[str, str, str, str]:
    """(client, service, backend A, backend B) as endpoints."""
    return (
        endpoint(t.CONTAINER_V4, SENDER_PORT), endpoint(t.UPLINK_V4, port),
        endpoint(BACKEND_A, port), endpoint(BACKEND_B, port),
    )


def _bug(
    topo: t.Topology, story: Story, report: Report, port: int, a: Backend, b: Backend,
    timeout: float,
) -> None:
    client, service, at_a, at_b = _where(port)
    first = _section("forwarded")
    report(first)
    waited = max(timeout, 3.0)
    _add(first, report, DeliveryCheck("A", at_a, a.receives(waited), True, waited))
    story.bug.append(first)

    moved = _section("moved")
    report(moved)
    move_dnat(topo, port, BACKEND_B)
    topo.ip(topo.upstream, f"addr del {BACKEND_A}/24 dev eth0\n")
    a.drain()
    waited = max(timeout, 1.5)
    _add(moved, report, DeliveryCheck("B", at_b, b.receives(waited), False, waited))
    pinned = _targets(_sender_entries(_udp_table(topo), port))
    _add(moved, report, EntryCheck(client, service, pinned, at_a, True))
    _add(moved, report, _explained(topo, port))
    story.bug.append(moved)


def _explained(topo: t.Topology, port: int) -> StaleFindingCheck:
    explained = _ctfix(topo, "explain", str(port), "--json")
    _client, _service, at_a, at_b = _where(port)
    want = (at_a, at_b)
    try:
        document = json.loads(explained.stdout)
    except ValueError:
        return StaleFindingCheck(port, None, None, (), 0, *want,
                                 error=explained.stderr.strip() or "no answer")
    codes = {r.get("code") for r in document.get("reasons", [])}
    for record in document.get("stale_nat", []):
        if record.get("stale_target") == at_a and "stale-nat" in codes:
            return StaleFindingCheck(
                port, str(document.get("verdict")), record["stale_target"],
                tuple(record["current_targets"]), int(record["clients"]), *want,
            )
    return StaleFindingCheck(port, str(document.get("verdict")), None, (), 0, *want)


def _fix(topo: t.Topology, story: Story, report: Report, port: int, b: Backend) -> None:
    client, service, _at_a, at_b = _where(port)
    section = _section("flushed")
    report(section)
    before = _udp_table(topo)
    applied = _ctfix(topo, "fix", str(port), "--method", "flush-stale", "--apply", "--json")
    others = _others(before, port)
    try:
        result: dict[str, Any] = json.loads(applied.stdout)
    except ValueError:
        check = FlushCheck(port, 0, len(others), False, (),
                           error=applied.stderr.strip() or "no answer")
    else:
        kept = others <= _others(_udp_table(topo), port)
        check = FlushCheck(port, int(result.get("deleted", 0)), len(others), kept,
                           tuple(str(line) for line in result.get("checks", [])))
    _add(section, report, check)
    _add(section, report, DeliveryCheck("B", at_b, b.receives(5.0), True, 5.0))
    now = _targets(_sender_entries(_udp_table(topo), port))
    _add(section, report, EntryCheck(client, service, now, at_b, False))
    story.fix.append(section)
