"""Benchmark `ctfix.platform.conntrack.dump()` against `conntrack -L`, same run (root).

    sudo .venv/bin/python bench/dump_bench.py [--flows 200000]

Fills the lab's host namespace with `--flows` UDP entries (single datagrams from the
container, four destination ports), then times, best of three:
`dump(port=P)` vs `conntrack -L -p udp --dport P`, and `dump()` vs `conntrack -L`
(both families for dump, as explain uses it; conntrack -L lists IPv4 only).

Know before changing: figures are printed, never asserted; documentation addresses
only, namespaces this script creates only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flows import blast
from ctfix.lab.topology import CONTAINER_V4, UPLINK_V4, lab_topology
from ctfix.platform import conntrack, netns

PORTS = (7, 9, 13, 19)


def best_of(runs: int, action: Callable[[], int]) -> tuple[float, int]:
    best = float("inf")
    result = 0
    for _ in range(runs):
        started = time.perf_counter()
        result = action()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=200_000)
    args = parser.parse_args()
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        topo.run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=300")
        blast(topo.container, CONTAINER_V4, UPLINK_V4, args.flows, PORTS)
        time.sleep(0.5)
        port = PORTS[0]

        def tool(*argv: str) -> Callable[[], int]:
            def run() -> int:
                out = subprocess.run(
                    topo.exec_argv(topo.host, ["conntrack", *argv]),
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                return out.count("\n")

            return run

        def ours(port: int | None = None) -> Callable[[], int]:
            def run() -> int:
                with netns.entered(topo.host):
                    return sum(1 for _ in conntrack.dump(port=port))

            return run

        rows = [
            ("filtered", ours(port=port), tool("-L", "-p", "udp", "--dport", str(port))),
            ("whole table", ours(), tool("-L")),
        ]
        print(f"{args.flows} UDP entries in the namespace")
        for name, mine, reference in rows:
            t_mine, n_mine = best_of(3, mine)
            t_ref, n_ref = best_of(3, reference)
            print(
                f"  {name}: dump() {n_mine} entries in {t_mine:.3f} s, conntrack -L {n_ref} "
                f"in {t_ref:.3f} s; ratio dump/conntrack {t_mine / t_ref:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
