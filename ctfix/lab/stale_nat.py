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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from ctfix.core.addr import endpoint
from ctfix.core.decode import CtEntry
from ctfix.lab import topology as t
from ctfix.lab.scenario import Check, Report, Section, Story
from ctfix.platform import netns

BACKEND_A = "198.51.100.21"
BACKEND_B = "198.51.100.22"
SENDER_PORT = 40514
#: the service port when the user gives none (syslog's 514 needs no root here, but
#: a port of its own keeps the lab clear of anything on the machine)
DEFAULT_PORT = 5140
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


def _entry_text(entry: CtEntry) -> str:
    orig, reply = entry.orig, entry.reply
    return (
        f"{endpoint(orig.src, orig.sport)} -> {endpoint(orig.dst, orig.dport)} goes to "
        f"{endpoint(reply.src, reply.sport)}"
    )


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


def _count(others: int) -> str:
    return f"the other {others} entr{'y' if others == 1 else 'ies'}"


def _add(section: Section, report: Report, check: Check) -> None:
    section.checks.append(check)
    report("check", check)


def run_story(topo: t.Topology, port: int, report: Report, *, timeout: float = 1.0) -> Story:
    """Reproduce the black hole, find it, flush it, see the recovery (module doc)."""
    story = Story(port)
    service = endpoint(t.UPLINK_V4, port)
    a_at, b_at = endpoint(BACKEND_A, port), endpoint(BACKEND_B, port)
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
                _bug(topo, story, report, port, service, a, b, a_at, b_at, timeout)
                _fix(topo, story, report, port, service, b, b_at)
            finally:
                topo.stop(sender)
        finally:
            neighbour.close()
    return story


def _bug(
    topo: t.Topology, story: Story, report: Report, port: int, service: str,
    a: Backend, b: Backend, a_at: str, b_at: str, timeout: float,
) -> None:
    client = endpoint(t.CONTAINER_V4, SENDER_PORT)
    first = Section(f"a one-way sender {client} -> {service}, forwarded by DNAT to {a_at}")
    report("section", first)
    got = a.receives(max(timeout, 3.0))
    _add(first, report, Check(
        f"backend A {a_at} receives the sender's datagrams",
        "datagrams at A", f"{got} datagram(s) at {a_at}" if got else "nothing at A", got > 0,
    ))
    story.bug.append(first)

    moved = Section(f"the rule moved to backend B {b_at}; A's address removed")
    report("section", moved)
    move_dnat(topo, port, BACKEND_B)
    topo.ip(topo.upstream, f"addr del {BACKEND_A}/24 dev eth0\n")
    a.drain()
    got = b.receives(max(timeout, 1.5))
    _add(moved, report, Check(
        f"backend B {b_at} receives nothing: the black hole",
        f"nothing at B for {max(timeout, 1.5):g} s (the sender keeps its old entry)",
        f"{got} datagram(s) at B" if got else "nothing at B", got == 0,
    ))
    pinned = _sender_entries(_udp_table(topo), port)
    to_a = [e for e in pinned if e.reply.src == BACKEND_A]
    _add(moved, report, Check(
        "conntrack still sends the sender to A",
        f"the sender's entry goes to {a_at}",
        "; ".join(_entry_text(e) for e in pinned) or "no entry for the sender",
        bool(to_a),
        detail=("its timeout restarts with every datagram: it never expires",),
    ))
    explained = _ctfix(topo, "explain", str(port), "--json")
    found = _stale_record(explained.stdout, a_at)
    seen = (
        f"verdict {found[0]}, stale target {found[1]['stale_target']}, now "
        f"{', '.join(found[1]['current_targets'])}, {found[1]['clients']} client(s)"
        if found else (explained.stderr.strip() or "no stale-nat finding")
    )
    ok = found is not None and found[0] == "broken" and b_at in found[1]["current_targets"]
    _add(moved, report, Check(
        f"`ctfix explain {port}` finds it",
        f"broken, reason stale-nat: stale target {a_at}, current {b_at}", seen, ok,
    ))
    story.bug.append(moved)


def _stale_record(stdout: str, stale_target: str) -> tuple[str, dict[str, Any]] | None:
    try:
        document = json.loads(stdout)
    except ValueError:
        return None
    codes = {r.get("code") for r in document.get("reasons", [])}
    for record in document.get("stale_nat", []):
        if record.get("stale_target") == stale_target and "stale-nat" in codes:
            return str(document.get("verdict")), record
    return None


def _fix(
    topo: t.Topology, story: Story, report: Report, port: int, service: str,
    b: Backend, b_at: str,
) -> None:
    section = Section(f"ctfix fix {port} --method flush-stale --apply")
    report("section", section)
    before = _udp_table(topo)
    applied = _ctfix(topo, "fix", str(port), "--method", "flush-stale", "--apply", "--json")
    try:
        result = json.loads(applied.stdout)
    except ValueError:
        result = {}
    deleted = int(result.get("deleted", 0))
    after = _udp_table(topo)
    kept = _others(before, port) <= _others(after, port)
    _add(section, report, Check(
        "exactly the stale entry is deleted",
        "1 entry deleted; every other entry of the table still there",
        f"{deleted} deleted; {_count(len(_others(before, port)))} of the table "
        + ("all still there" if kept else "NOT all there")
        if result else (applied.stderr.strip() or "no answer"),
        deleted == 1 and kept,
        detail=tuple(str(line) for line in result.get("checks", [])),
    ))
    got = b.receives(5.0)
    _add(section, report, Check(
        f"backend B {b_at} receives the sender's datagrams again",
        "datagrams at B", f"{got} datagram(s) at {b_at}" if got else "nothing at B", got > 0,
    ))
    now = _sender_entries(_udp_table(topo), port)
    _add(section, report, Check(
        "the sender's new entry follows the rule",
        f"{endpoint(t.CONTAINER_V4, SENDER_PORT)} -> {service} goes to {b_at}",
        "; ".join(_entry_text(e) for e in now) or "no entry for the sender",
        any(e.reply.src == BACKEND_B for e in now),
    ))
    story.fix.append(section)
