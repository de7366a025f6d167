"""Benchmark: `ctfix explain P` against `conntrack -L -p udp --dport P`, same table.

Builds the lab topology, starts netcat on the host namespace, loads ~200k conntrack
entries there with `conntrack -R` (a few hundred for the port, the rest for other
ports), then times both commands alternately and prints medians and their ratio
(the issue's goal: explain <= 1.5x conntrack). Run as root:

    .venv/bin/python -m bench.explain_bench [--entries 200000] [--runs 7]

Know before changing: both commands run through `ip netns exec` so each pays the
same start-up; the entries are inserted (not created by traffic) so the table size
does not depend on how fast this machine can send datagrams, and they live 600 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from ctfix.lab.topology import BRIDGE_V4, UPLINK_V4, lab_topology, wait_udp_bound

PORT = 56789
CTFIX = [sys.executable, "-m", "ctfix"]


def entries_file(
    total: int, port_entries: int, ports: tuple[int, ...] = (PORT,), first: int = 0
) -> str:
    """`conntrack -R` input: for each port, `port_entries` requests to it and their
    wrong-source replies (half each); then requests to other ports up to `total` (from
    the first-th noise entry on: files with different `first` do not overlap)."""
    lines = []
    for port in ports:
        for i in range(port_entries // 2):
            client = f"192.0.2.{10 + i % 200}"
            cport = 20000 + i // 200
            lines.append(
                f"-I -s {client} -d {UPLINK_V4} -p udp --sport {cport} --dport {port} -t 600"
            )
            lines.append(
                f"-I -s {BRIDGE_V4} -d {client} -p udp --sport {port} --dport {cport} -t 600"
            )
    i = first
    while len(lines) < total:
        client = f"203.0.113.{1 + i % 250}"
        sport = 1024 + (i // 250) % 60000
        dport = 10000 + i // (250 * 60000) + (i % 7)
        lines.append(f"-I -s {client} -d {UPLINK_V4} -p udp --sport {sport} --dport {dport} -t 600")
        i += 1
    with tempfile.NamedTemporaryFile("w", suffix=".ct", delete=False) as handle:
        handle.write("\n".join(lines) + "\n")
    return handle.name


def timed(argv: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.decode().strip()}")
    return elapsed, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--port-entries", type=int, default=400)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark builds network namespaces")

    path = entries_file(args.entries, args.port_entries)
    try:
        with lab_topology(ipv6=False, netfilter="nft") as topo:
            server = topo.spawn(topo.host, ["nc", "-ul", str(PORT)])
            wait_udp_bound(server.pid, PORT)
            start = time.perf_counter()
            topo.run(topo.host, "conntrack", "-R", path)
            loaded = time.perf_counter() - start
            count = topo.run(topo.host, "conntrack", "-C").strip()
            print(
                f"table: {count} entries (loaded in {loaded:.1f} s), port {PORT} has "
                f"{args.port_entries} of them"
            )
            exec_ns = ["ip", "netns", "exec", topo.host]
            reference = [*exec_ns, "conntrack", "-L", "-p", "udp", "--dport", str(PORT)]
            explain = [*exec_ns, *CTFIX, "explain", str(PORT), "--json"]
            explain_times: list[float] = []
            reference_times: list[float] = []
            timed(explain)  # warm the page cache for Python's modules
            timed(reference)
            for _ in range(args.runs):
                t, status = timed(explain)
                explain_times.append(t)
                reference_times.append(timed(reference)[0])
            verdict = subprocess.run(explain, capture_output=True, text=True, check=False)
            explain_median = statistics.median(explain_times)
            reference_median = statistics.median(reference_times)
            bare = statistics.median(
                timed([*exec_ns, sys.executable, "-c", "pass"])[0] for _ in range(args.runs)
            )
            print(f"conntrack -L -p udp --dport {PORT}: median {reference_median * 1000:.0f} ms")
            print(
                f"ctfix explain {PORT} --json:      median {explain_median * 1000:.0f} ms "
                f"(exit {status}; a bare `python -c pass` costs {bare * 1000:.0f} ms)"
            )
            print(
                f"ratio explain / conntrack: {explain_median / reference_median:.2f} (goal <= 1.5)"
            )
            if '"verdict": "broken"' not in verdict.stdout:
                print("warning: explain did not report the loaded wrong-source pairs")
    finally:
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
