"""Benchmark: `ctfix scan --all-netns` over 50 namespaces, time and memory, against
the same scan one process per namespace and against gathering the raw data by hand.

Builds `--namespaces` namespaces (ctfix.lab.fleet: 3 with a broken UDP service and
its client, one with a correctly bound one, the rest a loopback and a veth), then
times, alternately, `--runs` times each:

- `ctfix scan --all-netns --json` (one process; every namespace of the host, so
  also any that other work on the machine has at the time: the count is printed);
- `ctfix scan --netns NS --json` for each of the fleet's namespaces, one process
  after the other (what a loop in a shell script does without --all-netns);
- the reference: `ss -uanp` and `conntrack -L -p udp` in each of the fleet's
  namespaces (`ip netns exec`), the raw data an engineer would gather by hand.

and prints medians, ratios and each process's peak RSS (getrusage of the child);
then `ctfix check --all-netns` (what node-problem-detector runs) and the discovery
alone (`ctfix.platform.namespaces.snapshot()`, what a watcher following namespaces
repeats every few seconds).
Run as root:

    .venv/bin/python -m bench.scan_all_bench [--namespaces 50] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from ctfix.lab.fleet import fleet_topology
from ctfix.platform.namespaces import snapshot

CTFIX = [sys.executable, "-m", "ctfix"]


def run(argv: list[str]) -> tuple[float, int, bytes]:
    """Wall seconds, peak RSS (KiB) and stdout of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read() if proc.stdout else b""
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed with status {proc.returncode}")
    return elapsed, usage.ru_maxrss, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark builds network namespaces")

    with fleet_topology(count=args.namespaces, broken=3) as fleet:
        names = fleet.namespaces
        all_netns = [*CTFIX, "scan", "--all-netns", "--json"]
        run(all_netns)  # warm the page cache for Python's modules
        all_times: list[float] = []
        all_rss: list[int] = []
        loop_times: list[float] = []
        loop_rss: list[int] = []
        raw_times: list[float] = []
        document: dict[str, object] = {}
        for _ in range(args.runs):
            seconds, rss, out = run(all_netns)
            all_times.append(seconds)
            all_rss.append(rss)
            document = json.loads(out)
            start = time.perf_counter()
            for ns in names:
                _s, rss, _out = run([*CTFIX, "scan", "--netns", ns, "--json"])
                loop_rss.append(rss)
            loop_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            for ns in names:
                run(["ip", "netns", "exec", ns, "ss", "-uanp"])
                run(["ip", "netns", "exec", ns, "conntrack", "-L", "-p", "udp"])
            raw_times.append(time.perf_counter() - start)
        namespaces = document.get("namespaces", [])
        services = document.get("services", [])
        assert isinstance(namespaces, list) and isinstance(services, list)
        broken = sorted(
            s["netns"] for s in services if s["verdict"] == "broken" and s["netns"] in names
        )
        check_times = [run([*CTFIX, "check", "--all-netns"])[0] for _ in range(args.runs)]
        snapshot_times = []
        for _ in range(20):
            start = time.perf_counter()
            namespaces_now = snapshot()
            snapshot_times.append(time.perf_counter() - start)
        all_median = statistics.median(all_times)
        loop_median = statistics.median(loop_times)
        raw_median = statistics.median(raw_times)
        print(
            f"namespaces: {len(names)} built ({fleet.broken} broken services); "
            f"--all-netns found {len(namespaces)} on the host, {len(services)} UDP services"
        )
        print(f"  broken found in: {', '.join(broken)}")
        print(
            f"ctfix scan --all-netns --json:      median {all_median:.2f} s "
            f"({all_median / len(namespaces) * 1000:.0f} ms per namespace), "
            f"peak RSS {max(all_rss) / 1024:.0f} MiB"
        )
        print(
            f"ctfix scan --netns NS, {len(names)} runs:  median {loop_median:.2f} s, "
            f"peak RSS {max(loop_rss) / 1024:.0f} MiB each"
        )
        print(f"ss -uanp + conntrack -L per ns:     median {raw_median:.2f} s (reference)")
        print(f"ctfix check --all-netns:            median {statistics.median(check_times):.2f} s")
        print(
            f"namespaces.snapshot() (discovery alone, {len(namespaces_now)} namespaces, "
            f"{len(os.listdir('/proc'))} /proc entries): median "
            f"{statistics.median(snapshot_times) * 1000:.1f} ms"
        )
        print(
            f"ratios: --all-netns / per-namespace loop {all_median / loop_median:.2f}, "
            f"--all-netns / reference {all_median / raw_median:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
