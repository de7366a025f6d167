"""Benchmark `ctfix watch` against `conntrack -E`, in the same run (root, namespaces).

    sudo .venv/bin/python bench/watch_bench.py [--flows 150000] [--services 200]

1. latency: `--services` broken UDP services in the lab's host namespace each send one
   wrong-source reply; the time from that sendto() to the finding's JSON line.
2. burst: `--flows` new UDP flows blasted from the container namespace to the host
   while `ctfix watch` and `conntrack -E -e NEW -p udp -b 64MiB` both listen there:
   the share of flows each saw, and watch's CPU time per event.
3. memory: 1M synthetic unreplied flows fed to the detector in a fresh interpreter.

Know before changing: figures are printed, never asserted (the machine decides);
only documentation addresses, only namespaces this script creates.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flows import blast
from ctfix.lab.topology import CONTAINER_V4, UPLINK_V4, Topology, lab_topology
from ctfix.platform import netns

MEMORY_PROBE = r"""
import os, socket, sys, time
from ctfix.core.decode import CtEntry, CtEvent, CtTuple, NEW
from ctfix.core.detect import Detector

def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

n = int(sys.argv[1])
nets = ["192.0.2.", "198.51.100.", "203.0.113."]
clients = [f"{net}{i}" for net in nets for i in range(1, 255)]
d = Detector(max_flows=2 * n)
before = rss()
now = time.time()
for i in range(n):
    client = clients[i % len(clients)]
    sport = 1024 + (i // len(clients)) % 64000
    orig = CtTuple(client, "198.51.100.13", sport, 53 + i % 7, 17, socket.AF_INET)
    reply = CtTuple("198.51.100.13", client, 53 + i % 7, sport, 17, socket.AF_INET)
    d.feed(CtEvent(NEW, CtEntry(orig, reply, 8, 0, 0, 30, None)), now)
print(d.pending, before, rss())
"""


def _host_sysctl(topo: Topology, name: str, value: str) -> None:
    topo.run(topo.host, "sysctl", "-qw", f"{name}={value}")


def _reader(stream: object, lines: list[tuple[float, str]]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.append((time.time(), line))


def latency_phase(topo: Topology, services: int, lines: list[tuple[float, str]]) -> list[float]:
    """Each service answers one request from the wrong address; return seconds to finding."""
    base = 21000
    with netns.entered(topo.host):
        servers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(services)]
    with netns.entered(topo.container):
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(services)]
    sent: dict[int, float] = {}
    try:
        for i, server in enumerate(servers):
            server.bind(("0.0.0.0", base + i))
        for i, (server, client) in enumerate(zip(servers, clients, strict=True)):
            client.connect((UPLINK_V4, base + i))
            client.send(b"ping")
            data, peer = server.recvfrom(2048)
            server.sendto(data, peer)  # the kernel picks 192.0.2.1: the bug
            sent[base + i] = time.time()
            time.sleep(0.005)
        deadline = time.monotonic() + 5
        seen: dict[int, float] = {}
        while time.monotonic() < deadline and len(seen) < services:
            for when, line in list(lines):
                record = json.loads(line)
                if record.get("kind") == "wrong-source-reply":
                    port = int(record["service"].rsplit(":", 1)[1])
                    seen.setdefault(port, when)
            time.sleep(0.05)
        return [seen[p] - sent[p] for p in sent if p in seen]
    finally:
        for sock in servers + clients:
            sock.close()


def memory_phase(flows: int) -> tuple[int, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(flows)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.split()
    pending, before, after = (int(x) for x in out)
    return pending, before, after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=150_000)
    parser.add_argument("--services", type=int, default=200)
    parser.add_argument("--memory-flows", type=int, default=1_000_000)
    args = parser.parse_args()

    with lab_topology(ipv6=False, netfilter="nft") as topo:
        # Longer than the run, so that entries are still there for the count below.
        _host_sysctl(topo, "net.netfilter.nf_conntrack_udp_timeout", "120")
        out_ct = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed with the process
        conntrack_e = topo.spawn(
            topo.host,
            ["conntrack", "-E", "-e", "NEW", "-p", "udp", "-b", str(64 << 20)],
            stdout=out_ct.fileno(),
        )
        watch = subprocess.Popen(
            [sys.executable, "-m", "ctfix", "watch", "--netns", topo.host, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=_reader, args=(watch.stdout, lines), daemon=True)
        reader.start()
        time.sleep(2.0)  # both subscribed (watch imports, probes and dumps first)

        latencies = latency_phase(topo, args.services, lines)
        before_burst = 2 * args.services  # each service: one request, one bad reply

        count_before = int(topo.run(topo.host, "cat", "/proc/sys/net/netfilter/nf_conntrack_count"))
        seconds = blast(topo.container, CONTAINER_V4, UPLINK_V4, args.flows, (7, 9, 13, 19))
        count_after = int(topo.run(topo.host, "cat", "/proc/sys/net/netfilter/nf_conntrack_count"))
        created = count_after - count_before
        time.sleep(3.0)  # let both listeners drain their queues

        watch.send_signal(signal.SIGTERM)
        _pid, status, usage = os.wait4(watch.pid, 0)
        watch.returncode = os.waitstatus_to_exitcode(status)
        reader.join(timeout=5)
        stderr = watch.stderr.read() if watch.stderr else ""
        topo.stop(conntrack_e)
        out_ct.seek(0)
        conntrack_seen = sum(1 for line in out_ct if "[NEW]" in line) - before_burst

    summary = json.loads(lines[-1][1])
    watch_seen = summary["new_flows"] - before_burst
    cpu = usage.ru_utime + usage.ru_stime
    pending, rss_before, rss_after = memory_phase(args.memory_flows)

    print(
        f"burst: {args.flows} flows sent in {seconds:.2f} s ({args.flows / seconds:,.0f}/s), "
        f"{created} new conntrack entries in the host namespace"
    )
    print(
        f"  conntrack -E -e NEW -p udp -b 64MiB saw {conntrack_seen} "
        f"({100 * conntrack_seen / created:.1f}%)"
    )
    print(
        f"  ctfix watch saw {watch_seen} ({100 * watch_seen / created:.1f}%); "
        f"lost {summary['lost']}, resyncs {summary['resyncs']}; "
        f"ratio watch/conntrack {watch_seen / max(1, conntrack_seen):.3f}"
    )
    print(
        f"  ctfix watch CPU {cpu:.2f} s for {summary['events']} events "
        f"= {1e6 * cpu / max(1, summary['events']):.1f} us/event (includes start-up), "
        f"max RSS {usage.ru_maxrss / 1024:.0f} MiB"
    )
    if latencies:
        ordered = sorted(latencies)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        print(
            f"latency bad reply -> finding: {len(latencies)}/{args.services} found, "
            f"p50 {1000 * statistics.median(ordered):.1f} ms, p99 {1000 * p99:.1f} ms, "
            f"max {1000 * ordered[-1]:.1f} ms"
        )
    else:
        print(f"latency: no finding seen (watch stderr: {stderr.strip()[:200]})")
    print(
        f"memory: {pending} unreplied flows tracked, RSS {rss_before / 2**20:.0f} MiB -> "
        f"{rss_after / 2**20:.0f} MiB ({(rss_after - rss_before) / max(1, pending):.0f} "
        "bytes/flow)"
    )
    if stderr.strip():
        print("watch stderr:", *stderr.strip().splitlines()[:3], sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
