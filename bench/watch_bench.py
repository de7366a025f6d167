"""Benchmark `ctfix watch` against `conntrack -E`, in the same run (root, namespaces).

    sudo .venv/bin/python bench/watch_bench.py [--flows 150000] [--services 200]

1. latency, idle: `--services` broken UDP services in the lab's host namespace each
   send one wrong-source reply; the time from that sendto() to the finding's JSON line.
2. burst: `--flows` new UDP flows blasted from the container namespace to the host
   (by another process) while `ctfix watch` and `conntrack -E -e NEW -p udp -b 64MiB`
   both listen there: the share of flows each saw, and watch's CPU time per event.
   Meanwhile up to `--services` more broken services answer from the wrong address,
   one every 10 ms: the latency to the finding during the burst (only replies sent
   while the burst was still running count).
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
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctfix.lab.topology import CONTAINER_V4, UPLINK_V4, Topology, lab_topology
from ctfix.platform import netns

MEMORY_PROBE = r"""
import os, socket, sys, time
from ctfix.core.decode import CtEntry, CtEvent, CtTuple, NEW
from ctfix.core.detectors.wrong_source import WrongSourceDetector as Detector

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


def process_cpu(pid: int) -> float:
    """utime + stime of a process so far, in seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _host_sysctl(topo: Topology, name: str, value: str) -> None:
    topo.run(topo.host, "sysctl", "-qw", f"{name}={value}")


def _reader(stream: object, lines: list[tuple[float, str]]) -> None:
    # A Popen's text stdout; typed object so the thread target's signature stays simple.
    for line in stream:  # type: ignore[attr-defined]
        lines.append((time.time(), line))


class Latency(NamedTuple):
    seconds: list[float]  # sendto -> finding line, for the replies whose finding came
    replies: int  # bad replies sent (while keep_going() held)
    unanswered: int  # requests that never reached their server
    first_sent: float  # time.time() of the first and last counted bad reply
    last_sent: float


def latency_phase(
    topo: Topology,
    services: int,
    lines: list[tuple[float, str]],
    *,
    base: int,
    keep_going: Callable[[], bool] = lambda: True,
    interval: float = 0.005,
) -> Latency:
    """Services answer one request each from the wrong address, one every `interval`
    seconds, while keep_going() says so."""
    with netns.entered(topo.host):
        servers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(services)]
    with netns.entered(topo.container):
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(services)]
    sent: dict[int, float] = {}
    unanswered = 0
    try:
        for i, server in enumerate(servers):
            server.bind(("0.0.0.0", base + i))
            server.settimeout(2.0)
        for i, (server, client) in enumerate(zip(servers, clients, strict=True)):
            if not keep_going():
                break
            client.connect((UPLINK_V4, base + i))
            client.send(b"ping")
            try:
                data, peer = server.recvfrom(2048)
            except TimeoutError:
                unanswered += 1  # dropped on the way in (a full backlog during a burst)
                continue
            server.sendto(data, peer)  # the kernel picks 192.0.2.1: the bug
            when = time.time()
            if keep_going():
                sent[base + i] = when
            time.sleep(interval)
        deadline = time.monotonic() + 5
        seen: dict[int, float] = {}
        while time.monotonic() < deadline and len(seen) < len(sent):
            for when, line in list(lines):
                record = json.loads(line)
                if record.get("kind") == "wrong-source-reply":
                    port = int(record["service"].rsplit(":", 1)[1])
                    seen.setdefault(port, when)
            time.sleep(0.05)
        times = sorted(sent.values()) or [0.0]
        return Latency(
            [seen[p] - sent[p] for p in sent if p in seen],
            len(sent),
            unanswered,
            times[0],
            times[-1],
        )
    finally:
        for sock in servers + clients:
            sock.close()


def start_blast(topo: Topology, flows: int) -> subprocess.Popen[str]:
    """bench.flows.blast in another process (this one measures latency meanwhile);
    it prints the seconds the burst took and when it ended (time.time())."""
    code = (
        "import time; from bench.flows import blast; "
        f"print(blast({topo.container!r}, {CONTAINER_V4!r}, {UPLINK_V4!r}, {flows}, "
        "(7, 9, 13, 19)), time.time())"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def latency_line(label: str, latency: Latency) -> str:
    if not latency.seconds:
        return f"latency bad reply -> finding, {label}: no finding seen ({latency.replies} replies)"
    ordered = sorted(latency.seconds)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    lost_requests = (
        f", {latency.unanswered} request(s) dropped on the way" if latency.unanswered else ""
    )
    return (
        f"latency bad reply -> finding, {label}: {len(ordered)}/{latency.replies} found, "
        f"p50 {1000 * statistics.median(ordered):.1f} ms, p99 {1000 * p99:.1f} ms, "
        f"max {1000 * ordered[-1]:.1f} ms{lost_requests}"
    )


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

        idle = latency_phase(topo, args.services, lines, base=21000)
        # Each service made two flows (its request and its bad reply); a request
        # that never arrived made at most one, which counts in the share's noise.
        before_burst = 2 * idle.replies

        count_before = int(topo.run(topo.host, "cat", "/proc/sys/net/netfilter/nf_conntrack_count"))
        cpu_before_burst = process_cpu(watch.pid)
        # `ip netns exec` execs conntrack: the same pid
        ct_cpu_before_burst = process_cpu(conntrack_e.pid)
        blaster = start_blast(topo, args.flows)
        time.sleep(0.3)  # into the burst (the blaster imports and enters the namespace)
        # One bad reply every 10 ms spreads them over the whole burst (~2 s).
        during = latency_phase(
            topo,
            args.services,
            lines,
            base=23000,
            keep_going=lambda: blaster.poll() is None,
            interval=0.01,
        )
        out, _ = blaster.communicate()
        seconds, burst_end = (float(x) for x in out.split())
        burst_start = burst_end - seconds
        count_after = int(topo.run(topo.host, "cat", "/proc/sys/net/netfilter/nf_conntrack_count"))
        # The burst's flows and the bad replies made during it.
        created = count_after - count_before
        time.sleep(3.0)  # let both listeners drain their queues
        burst_cpu = process_cpu(watch.pid) - cpu_before_burst
        ct_burst_cpu = process_cpu(conntrack_e.pid) - ct_cpu_before_burst

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
        f"{created} new conntrack entries in the host namespace (with {2 * during.replies} "
        "from the bad replies made during it)"
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
    print(
        f"  ctfix watch CPU during the burst only {burst_cpu:.2f} s = "
        f"{1e6 * burst_cpu / max(1, created):.1f} us per new flow (start-up left out)"
    )
    # Per event received during the burst: watch's NEW events are its new flows (the
    # bad replies' UPDATEs are a few hundred); conntrack -E gets NEW events only.
    ours = burst_cpu / max(1, watch_seen)
    theirs = ct_burst_cpu / max(1, conntrack_seen)
    print(
        f"  CPU per event received during the burst: ctfix watch {1e6 * ours:.1f} us, "
        f"conntrack -E {1e6 * theirs:.1f} us ({ct_burst_cpu:.2f} s for {conntrack_seen}); "
        f"ratio {ours / max(theirs, 1e-9):.2f}"
    )
    print(latency_line("idle", idle))
    print(latency_line(f"during the {args.flows}-flow burst", during))
    print(
        f"  (bad replies sent {during.first_sent - burst_start:.2f} s to "
        f"{during.last_sent - burst_start:.2f} s into the {seconds:.2f} s burst)"
    )
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
