"""Benchmark `ctfix watch`'s start-up on a big UDP table against `conntrack -L -p udp`,
and its memory at start-up and at a resync after lost events (root, namespaces).

    sudo .venv/bin/python -m bench.startup_bench [--sizes 50000,150000,250000] [--runs 5]

1. For each table size (entries loaded with `conntrack -R`, as explain_bench makes
   them: 200 wrong-source pairs on one port, the rest unreplied requests from
   203.0.113.0/24 to the uplink address), alternately, `--runs` times:
   `conntrack -L -p udp` (its wall time) and `ctfix watch --json` (wall time from the
   exec until its "watching" line on stderr; its peak RSS, VmHWM, read then), both
   through `ip netns exec`. Medians, their ratio, and the spread (min-max).
2. The steady state a peak is compared with: watch's RSS at "watching" on a table of
   a few entries, plus what the wrong-source detector keeps per pending request (1M
   synthetic unreplied flows fed as events in a fresh interpreter: bytes per flow).
   A start-up that streams its dump holds nothing else per entry.
3. The per-entry slope of the peak (least squares over the sizes) and its
   extrapolation to a 1M-entry table (a child namespace's table is capped at the
   host's nf_conntrack_max, 262144 here, so 1M cannot be measured directly).
4. A resync: a watch with a small event buffer (CTFIX_WATCH_RCVBUF) on the largest
   table; its peak RSS is reset (/proc/PID/clear_refs) once it watches, then a burst
   of `--burst` new flows overflows its buffer, and its peak over the resync(s) is read
   against its RSS just before the burst.

`--root DIR` runs the ctfix of another checkout (a `git archive` of an older commit)
with this script, for before/after figures in one sitting.

Know before changing: figures are printed, never asserted; documentation addresses
only, namespaces this script creates only.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.explain_bench import entries_file
from bench.flows import blast
from bench.watch_bench import memory_phase
from ctfix.lab.topology import CONTAINER_V4, UPLINK_V4, Topology, lab_topology

ROOT = Path(__file__).resolve().parent.parent
PORT = 56789
MIB = 1 << 20


def status_kib(pid: int, field: str) -> int:
    """A VmXXX line of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Watch:
    """`ctfix watch --json` started through `ip netns exec`, until its "watching" line."""

    def __init__(self, topo: Topology, root: Path, env: dict[str, str] | None = None) -> None:
        argv = topo.exec_argv(topo.host, [sys.executable, "-m", "ctfix", "watch", "--json"])
        environment = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=root,
            env=environment,
        )
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "watching" in line:
                break
        else:
            raise SystemExit("watch ended before watching:\n" + "".join(self.lines))
        self.seconds = time.perf_counter() - self.started
        self.peak = status_kib(self.proc.pid, "VmHWM") * 1024
        self.rss = status_kib(self.proc.pid, "VmRSS") * 1024

    def wait_for(self, text: str, timeout: float) -> bool:
        """Read stderr until a line has `text` (False at the deadline or the end)."""
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if line:
                self.lines.append(line)
                if text in line:
                    return True
            else:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def reference_seconds(topo: Topology) -> float:
    start = time.perf_counter()
    subprocess.run(
        topo.exec_argv(topo.host, ["conntrack", "-L", "-p", "udp"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
    )
    return time.perf_counter() - start


def per_run(ours: list[float], reference: list[float]) -> str:
    return ", ".join(f"{o / r:.2f}" for o, r in zip(ours, reference, strict=True))


def spread(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    return (f"median {statistics.median(values) * scale:.0f}{unit} "
            f"(min {min(values) * scale:.0f}, max {max(values) * scale:.0f})")


def load(topo: Topology, total: int, first: int) -> None:
    """Add entries up to `total` in the table (explain_bench's file, noise from the
    first-th entry on so that files do not overlap)."""
    have = int(topo.run(topo.host, "conntrack", "-C"))
    if total <= have:
        return
    path = entries_file(total - have, 400 if have < 400 else 0, (PORT,), first=first)
    try:
        topo.run(topo.host, "conntrack", "-R", path)
    finally:
        os.unlink(path)


def slope(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    xs = [float(x) for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50000,150000,250000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--burst", type=int, default=60_000)
    parser.add_argument("--memory-flows", type=int, default=1_000_000)
    parser.add_argument("--root", type=Path, default=ROOT, help="the ctfix checkout to run")
    parser.add_argument("--no-resync", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark builds network namespaces")
    sizes = [int(s) for s in args.sizes.split(",")]
    root = args.root.resolve()

    pending, before, after = memory_phase(args.memory_flows)
    per_flow = (after - before) / max(1, pending)
    print(f"ctfix from {root}")
    print(f"steady state per pending request: {per_flow:.0f} bytes "
          f"({pending} synthetic unreplied flows fed as events)")
    peaks: list[tuple[int, float]] = []
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        topo.run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
        empty = Watch(topo, root)
        base = empty.rss
        empty.stop()
        print(f"watch at 'watching' on an (almost) empty table: RSS {base / MIB:.1f} MiB, "
              f"start-up {empty.seconds * 1000:.0f} ms")
        first = 0
        for size in sizes:
            load(topo, size, first)
            first += size
            count = int(topo.run(topo.host, "conntrack", "-C"))
            watch_times: list[float] = []
            ref_times: list[float] = []
            hwm: list[float] = []
            rss: list[float] = []
            reference_seconds(topo)  # warm caches
            for _ in range(args.runs):
                ref_times.append(reference_seconds(topo))
                w = Watch(topo, root)
                time.sleep(1.0)
                settled = status_kib(w.proc.pid, "VmRSS") * 1024
                w.stop()
                watch_times.append(w.seconds)
                hwm.append(w.peak)
                rss.append(settled)
            steady = base + count * per_flow
            peak = statistics.median(hwm)
            peaks.append((count, peak))
            print(f"table {count} entries:")
            print(f"  conntrack -L -p udp: {spread(ref_times, 1000, ' ms')}")
            print(f"  watch until 'watching': {spread(watch_times, 1000, ' ms')}; ratio "
                  f"{statistics.median(watch_times) / statistics.median(ref_times):.2f} "
                  f"(per run: {per_run(watch_times, ref_times)})")
            print(f"  peak RSS at start-up: {spread(hwm, 1 / MIB, ' MiB')}; steady state "
                  f"{steady / MIB:.0f} MiB (base + {count} x {per_flow:.0f} B); peak - steady "
                  f"{(peak - steady) / MIB:.1f} MiB; "
                  f"RSS 1 s later {statistics.median(rss) / MIB:.0f} MiB")
        if len(peaks) > 1:
            a, b = slope(peaks)
            print(f"peak RSS slope: {b:.0f} bytes per entry (intercept {a / MIB:.0f} MiB); "
                  f"extrapolated for 1M entries: {(a + b * 1_000_000) / MIB:.0f} MiB")
        if not args.no_resync:
            resync_phase(topo, root, args.burst, per_flow)
    return 0


def resync_phase(topo: Topology, root: Path, burst: int, per_flow: float) -> None:
    w = Watch(topo, root, env={"CTFIX_WATCH_RCVBUF": str(256 << 10)})
    try:
        time.sleep(1.0)
        Path(f"/proc/{w.proc.pid}/clear_refs").write_text("5")
        rss_before = status_kib(w.proc.pid, "VmRSS") * 1024
        blast(topo.container, CONTAINER_V4, UPLINK_V4, burst, (7, 9, 13, 19))
        resynced = w.wait_for("resynchronised", 60)
        time.sleep(3.0)  # later resyncs (at most one a second) and the drain
        peak = status_kib(w.proc.pid, "VmHWM") * 1024
        rss_after = status_kib(w.proc.pid, "VmRSS") * 1024
    finally:
        w.stop()
    count = int(topo.run(topo.host, "conntrack", "-C"))
    said = next((line.strip() for line in w.lines if "resynchronised" in line), "no resync")
    said = said if resynced else "no resync"
    print(f"resync: {burst} new flows with a 256 KiB event buffer ({said})")
    print(f"  RSS before the burst {rss_before / MIB:.0f} MiB; peak during the resync(s) "
          f"{peak / MIB:.0f} MiB; RSS after {rss_after / MIB:.0f} MiB; table now {count}; "
          f"peak - (before + burst x {per_flow:.0f} B) "
          f"{(peak - rss_before - burst * per_flow) / MIB:.1f} MiB")


if __name__ == "__main__":
    raise SystemExit(main())
