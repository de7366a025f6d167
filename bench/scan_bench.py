"""Benchmark: `ctfix scan` of 50 UDP services against `ctfix explain` of one, same table.

Builds the lab topology, starts one process in the host namespace with `--services`
wildcard UDP sockets (recvfrom/sendto servers, as a broken host has them), loads
~200k conntrack entries there with `conntrack -R` (`--per-port` requests and
wrong-source replies for each service, the rest for other ports), then times
`ctfix scan --json` and `ctfix explain P --json` (P one of the services) alternately
and prints medians and their ratio (the issue's goal: scan <= 2x explain). Run as root:

    .venv/bin/python -m bench.scan_bench [--entries 200000] [--services 50] [--runs 7]

Know before changing: both commands run through `ip netns exec` so each pays the
same start-up; the entries are inserted (not created by traffic) so the table size
does not depend on how fast this machine can send datagrams, and they live 600 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench.explain_bench import entries_file, timed
from ctfix.lab.topology import lab_topology, wait_udp_bound

FIRST_PORT = 20000
CTFIX = [sys.executable, "-m", "ctfix"]

SERVERS = """\
import select, socket, sys
socks = []
for port in range(int(sys.argv[1]), int(sys.argv[1]) + int(sys.argv[2])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    socks.append(s)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--per-port", type=int, default=40)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark builds network namespaces")

    ports = list(range(FIRST_PORT, FIRST_PORT + args.services))
    path = entries_file(args.entries, args.per_port, tuple(ports))
    try:
        with lab_topology(ipv6=False, netfilter="nft") as topo:
            server = topo.spawn(
                topo.host,
                [sys.executable, "-c", SERVERS, str(FIRST_PORT), str(args.services)],
            )
            wait_udp_bound(server.pid, ports[-1])
            topo.run(topo.host, "conntrack", "-R", path)
            count = topo.run(topo.host, "conntrack", "-C").strip()
            print(
                f"table: {count} entries; {args.services} wildcard UDP services, "
                f"{args.per_port} entries each"
            )
            exec_ns = ["ip", "netns", "exec", topo.host]
            scan = [*exec_ns, *CTFIX, "scan", "--json"]
            explain = [*exec_ns, *CTFIX, "explain", str(ports[len(ports) // 2]), "--json"]
            timed(scan)  # warm the page cache for Python's modules
            timed(explain)
            scan_times: list[float] = []
            explain_times: list[float] = []
            for _ in range(args.runs):
                scan_times.append(timed(scan)[0])
                explain_times.append(timed(explain)[0])
            result = json.loads(subprocess.run(scan, capture_output=True, text=True).stdout)
            verdicts = [s["verdict"] for s in result["services"]]
            scan_median = statistics.median(scan_times)
            explain_median = statistics.median(explain_times)
            print(
                f"ctfix scan --json:         median {scan_median * 1000:.0f} ms "
                f"({len(verdicts)} services, {verdicts.count('broken')} broken)"
            )
            print(f"ctfix explain PORT --json: median {explain_median * 1000:.0f} ms")
            print(f"ratio scan / explain: {scan_median / explain_median:.2f} (goal <= 2)")
    finally:
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
