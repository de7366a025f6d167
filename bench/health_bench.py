"""Benchmark: `ctfix health --json` against `conntrack -S` + `conntrack -C`, same namespace.

Builds the lab topology, loads entries into its host namespace with `conntrack -R`
(the figures do not depend on the table's size: both read counters, not entries),
then times both alternately and prints medians and their ratio. Both run through
`ip netns exec`, so each pays the same start-up; the reference is two processes
because it takes two commands to get what one `ctfix health` prints. Also prints
the cost of one reading inside a running process (`ctfix.platform.ctstats.sample()`,
what `ctfix watch --metrics` pays every 2 s). Run as root:

    .venv/bin/python -m bench.health_bench [--entries 20000] [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from bench.explain_bench import timed
from ctfix.lab.topology import lab_topology
from ctfix.platform import ctstats, netns
from tests.netns.conntrack_drive import load_entries

CTFIX = [sys.executable, "-m", "ctfix"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark builds network namespaces")
    # Time ctfix as installed, with its bytecode cached (the warm-up run writes it).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

    with lab_topology(ipv6=False, netfilter="nft") as topo:
        load_entries(topo, args.entries)
        exec_ns = ["ip", "netns", "exec", topo.host]
        health = [*exec_ns, *CTFIX, "health", "--json"]
        stats = [*exec_ns, "conntrack", "-S"]
        count = [*exec_ns, "conntrack", "-C"]
        timed(health)  # warm the page cache for Python's modules
        timed(stats)
        ours: list[float] = []
        reference: list[float] = []
        for _ in range(args.runs):
            ours.append(timed(health)[0])
            reference.append(timed(stats)[0] + timed(count)[0])
        bare = statistics.median(
            timed([*exec_ns, sys.executable, "-c", "pass"])[0] for _ in range(args.runs)
        )
        with netns.entered(topo.host):
            ctstats.sample()
            start = time.perf_counter()
            for _ in range(1000):
                reading = ctstats.sample()
            in_process = (time.perf_counter() - start) / 1000
        ours_median, reference_median = statistics.median(ours), statistics.median(reference)
        print(f"namespace: {reading.entries} entries, {len(reading.cpus)} CPUs")
        print(f"conntrack -S + conntrack -C:  median {reference_median * 1000:.1f} ms")
        print(
            f"ctfix health --json:          median {ours_median * 1000:.1f} ms "
            f"(a bare `python -c pass` costs {bare * 1000:.1f} ms)"
        )
        print(f"ratio ctfix health / conntrack -S + -C: {ours_median / reference_median:.2f}")
        print(f"one reading in a running process (sample()): {in_process * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
