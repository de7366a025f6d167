"""Benchmark `ctfix watch --all-netns` over 50 namespaces: start-up, events/s and
memory, against `conntrack -E` run in each namespace, in the same run (root).

    .venv/bin/python -m bench.watch_all_bench [--namespaces 50] [--flows 2000]

Builds `--namespaces` namespaces, each with loopback up, 192.0.2.1/32 on it and one
`ct state new` rule (so the kernel tracks it), a 120 s UDP timeout (the entries
outlive the run, for the count) and a socket that takes the burst's datagrams
without reading them (no ICMP port unreachable comes back). Then, with one
`ctfix watch --all-netns --json` and one `conntrack -E -e NEW -p udp -b 64MiB` per
namespace listening:

1. start-up: seconds from starting watch to its "watching" note, and its RSS then
   (every namespace of the host is watched: also those other work has at the time);
2. burst: `--flows` single-datagram flows in each namespace from a client address
   none of them has (each flow a request watch keeps, unanswered), sent round robin
   from one process (raw sockets, one per namespace: bench.flows.blast_many); the share of
   the new conntrack entries each listener saw, events/s, and the CPU each side
   spent during the burst (watch: one process; conntrack -E: the sum of its
   processes);
3. memory: watch's RSS after the burst and its peak, against the sum of the
   `conntrack -E` processes' RSS.

Figures are printed, never asserted; only documentation addresses, only namespaces
this script creates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from ctfix.lab.topology import Namespaces, built, new_run_id, require_tools
from ctfix.platform import netns

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "192.0.2.1"
#: the burst's clients: an address no namespace has, so that each flow is a request
#: (a remote client asking a local service) that watch keeps until it is answered
CLIENT = "198.51.100.7"
DPORTS = (7, 9, 13, 19)
_TRACKING = (
    "table ip ctfix_bench {\n chain out {\n"
    "  type filter hook output priority 0; policy accept;\n  ct state new counter\n }\n}\n"
)


@dataclasses.dataclass
class Many(Namespaces):
    count: int = 50

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(self.name(f"w{index:02d}") for index in range(self.count))

    def build(self) -> None:
        require_tools("ip", "sysctl", "nft", "conntrack")
        self.create_namespaces()
        for ns in self.namespaces:
            self.ip(ns, f"link set lo up\naddr add {ADDRESS}/32 dev lo\n")
            self.run(ns, "nft", "-f", "-", stdin=_TRACKING)
            self.run(ns, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=120")


def entries(ns: str) -> int:
    with netns.entered(ns), open("/proc/sys/net/netfilter/nf_conntrack_count") as fh:
        return int(fh.read())


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def sinks(namespaces: tuple[str, ...]) -> list[socket.socket]:
    """A UDP socket on each port the burst sends to, in each namespace, never read: the
    datagrams are delivered (and dropped when its buffer is full), so the namespace
    sends no ICMP port unreachable back to itself for each flow (which watch's ICMP
    socket would read: a cost of this loopback set-up, not of watching)."""
    found = []
    for ns in namespaces:
        for port in DPORTS:
            with netns.entered(ns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((ADDRESS, port))
            found.append(sock)
    return found


def rss(pid: int, field: str = "VmRSS") -> int:
    """KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _read(stream: IO[str], records: list[dict[str, Any]]) -> None:
    for line in stream:
        records.append(json.loads(line))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--flows", type=int, default=2000, help="new flows per namespace")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark builds network namespaces")

    with built(Many(new_run_id(), count=args.namespaces)) as many:
        names = many.namespaces
        held = sinks(names)
        outputs = [tempfile.TemporaryFile(mode="w+") for _ in names]  # noqa: SIM115 - closed below
        listeners = [
            many.spawn(
                ns,
                ["conntrack", "-E", "-e", "NEW", "-p", "udp", "-b", str(64 << 20)],
                stdout=out.fileno(),
            )
            for ns, out in zip(names, outputs, strict=True)
        ]
        errors = tempfile.NamedTemporaryFile("w+")  # noqa: SIM115 - closed below
        started = time.perf_counter()
        watch = subprocess.Popen(
            [sys.executable, "-m", "ctfix", "watch", "--all-netns", "--json"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            cwd=ROOT,
        )
        records: list[dict[str, Any]] = []
        assert watch.stdout is not None
        reader = threading.Thread(target=_read, args=(watch.stdout, records), daemon=True)
        reader.start()
        while "ctfix watch: watching " not in Path(errors.name).read_text():
            if watch.poll() is not None:
                raise SystemExit(Path(errors.name).read_text())
            time.sleep(0.05)
        start_seconds = time.perf_counter() - started
        rss_started = rss(watch.pid)
        watched = Path(errors.name).read_text().split("watching ", 1)[1].split()[0]
        time.sleep(1.0)  # conntrack -E subscribed long ago; let watch settle

        before = sum(entries(ns) for ns in names)
        watch_cpu = cpu_seconds(watch.pid)
        watch_split = cpu_split(watch.pid)
        ct_cpu = sum(cpu_seconds(p.pid) for p in listeners)
        code = (
            "import time; from bench.flows import blast_many; "
            f"print(blast_many({list(names)!r}, {CLIENT!r}, {ADDRESS!r}, {args.flows}, "
            f"{DPORTS!r}))"
        )
        sent = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
        )
        seconds = float(sent.stdout.split()[0])
        created = sum(entries(ns) for ns in names) - before
        # Both sides drain: wait until neither moves for a second (at most 30 s).
        last = (-1.0, -1.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = (cpu_seconds(watch.pid), sum(cpu_seconds(p.pid) for p in listeners))
            if now == last:
                break
            last = now
            time.sleep(1.0)
        watch_burst = cpu_seconds(watch.pid) - watch_cpu
        user, system = (b - a for a, b in zip(watch_split, cpu_split(watch.pid), strict=True))
        ct_burst = sum(cpu_seconds(p.pid) for p in listeners) - ct_cpu
        rss_after = rss(watch.pid)
        rss_peak = rss(watch.pid, "VmHWM")
        ct_rss = sum(rss(p.pid) for p in listeners)

        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=120)
        reader.join(timeout=30)
        for proc in listeners:
            many.stop(proc)
        seen_ct = 0
        for out in outputs:
            out.seek(0)
            seen_ct += sum(1 for line in out if "[NEW]" in line)
            out.close()
        errors.close()
        for sock in held:
            sock.close()

    mine = set(names)
    summaries = [r for r in records if r["kind"] == "namespace-summary" and r["netns"] in mine]
    seen_watch = sum(r["new_flows"] for r in summaries)
    lost = sum(r["lost"] for r in summaries)
    resyncs = sum(r["resyncs"] for r in summaries)
    total = args.flows * len(names)
    print(
        f"start-up: {len(names)} namespaces built, watch --all-netns watched {watched} "
        f"(every namespace of the host) after {start_seconds:.2f} s "
        f"({1000 * start_seconds / max(1, int(watched)):.0f} ms each), "
        f"RSS {rss_started / 1024:.0f} MiB"
    )
    print(
        f"burst: {total} flows ({args.flows} in each namespace) sent in {seconds:.2f} s "
        f"({total / seconds:,.0f}/s), {created} new conntrack entries"
    )
    print(
        f"  conntrack -E -e NEW -p udp -b 64MiB, one per namespace, saw {seen_ct} "
        f"({100 * seen_ct / max(1, created):.1f}%), CPU {ct_burst:.2f} s "
        f"({1e6 * ct_burst / max(1, seen_ct):.1f} us/event), RSS {ct_rss / 1024:.0f} MiB in all"
    )
    print(
        f"  ctfix watch --all-netns saw {seen_watch} ({100 * seen_watch / max(1, created):.1f}%; "
        f"lost {lost}, resyncs {resyncs}), CPU {watch_burst:.2f} s "
        f"({1e6 * watch_burst / max(1, seen_watch):.1f} us/event: user {user:.2f} s, "
        f"system {system:.2f} s); "
        f"ratio watch/conntrack {seen_watch / max(1, seen_ct):.3f}"
    )
    print(
        f"memory: watch RSS {rss_started / 1024:.0f} MiB at start, "
        f"{rss_after / 1024:.0f} MiB after the burst, peak {rss_peak / 1024:.0f} MiB "
        f"(conntrack -E: {ct_rss / 1024:.0f} MiB for {len(names)} processes)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
