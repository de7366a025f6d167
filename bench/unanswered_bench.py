"""Benchmark what the unanswered detector costs `ctfix watch` (root, namespaces).

    sudo .venv/bin/python bench/unanswered_bench.py [--flows 100000] [--events 400000]

1. dispatch: what composing by event kind adds to each event's call (timeit, the
   same trivial feed behind both); hot path: NEW events (ctnetlink messages laid out
   as the kernel's, every one a new client)
   through watch's loop body (decode, then feed), composed as before
   the unanswered detector (`one_feed` of the wrong-source detector) and as now
   (`feeds_by_kind` of both detectors), each run in a fresh interpreter; best of 7,
   ns/event and the ratio.
2. DESTROY wave: `--flows` single-datagram flows to ports nothing is bound to, with a
   5 s nf_conntrack_udp_timeout: their entries end unreplied within seconds of each
   other, and every one is a DESTROY event watch must read. `ctfix watch --json` and
   `conntrack -E -e DESTROY -p udp -b 64MiB` (the reference) listen in the same run:
   events seen, the wave's rate, and watch's CPU time per DESTROY event (the process's
   utime+stime during the wave only).
3. the ICMP tap: the host namespace sends `--events` datagrams to a sink in the
   container, with and without watch's packet socket for sent port unreachables
   (ctfix.platform.icmp.SentUnreachable) open; best of 3 of each, the sender's CPU
   time (its system calls carry the kernel's work) per datagram.

Know before changing: figures are printed, never asserted (the machine decides);
only documentation addresses, only namespaces this script creates.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flows import blast
from bench.watch_bench import process_cpu
from ctfix.core import decode
from ctfix.core.detectors import Detector, feeds_by_kind, one_feed
from ctfix.core.detectors.unanswered import UnansweredDetector, UnansweredFinding
from ctfix.core.detectors.wrong_source import WrongSourceDetector, WrongSourceFinding
from ctfix.lab.topology import CONTAINER_V4, UPLINK_V4, Topology, lab_topology
from ctfix.platform import netns

ROOT = Path(__file__).resolve().parent.parent
LOCAL = frozenset({UPLINK_V4, "192.0.2.1"})


def _nla(nla_type: int, payload: bytes) -> bytes:
    return decode.nla(nla_type, payload)


def new_message(client: str, sport: int, server: str, dport: int) -> bytes:
    """A ctnetlink NEW event as the kernel lays it out (IPv4 UDP, unreplied)."""

    def tuple_attr(which: int, src: str, dst: str, s: int, d: int) -> bytes:
        ip = _nla(decode.CTA_TUPLE_IP | decode.NLA_F_NESTED,
                  _nla(decode.CTA_IP_V4_SRC, socket.inet_aton(src))
                  + _nla(decode.CTA_IP_V4_DST, socket.inet_aton(dst)))
        proto = _nla(decode.CTA_TUPLE_PROTO | decode.NLA_F_NESTED,
                     _nla(decode.CTA_PROTO_NUM, bytes([17]))
                     + _nla(decode.CTA_PROTO_SRC_PORT, struct.pack(">H", s))
                     + _nla(decode.CTA_PROTO_DST_PORT, struct.pack(">H", d)))
        return _nla(which | decode.NLA_F_NESTED, ip + proto)

    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    body += tuple_attr(decode.CTA_TUPLE_ORIG, client, server, sport, dport)
    body += tuple_attr(decode.CTA_TUPLE_REPLY, server, client, dport, sport)
    body += _nla(decode.CTA_ID, struct.pack(">I", sport))
    body += _nla(decode.CTA_STATUS, struct.pack(">I", 0x188))
    body += _nla(decode.CTA_TIMEOUT, struct.pack(">I", 30))
    header = struct.pack("=IHHII", 16 + len(body), decode.MSG_CT_NEW,
                         decode.NLM_F_CREATE | decode.NLM_F_EXCL, 0, 0)
    return header + body


def hot_path_once(variant: str, events: int) -> float:
    """ns/event of watch's loop body over `events` NEW messages, composed as `variant`
    says: "before" (`one_feed` of the wrong-source detector alone) or "now"
    (`feeds_by_kind` of it and the unanswered detector)."""
    messages = [
        new_message(f"203.0.113.{1 + i % 250}", 1024 + (i // 250) % 60000, UPLINK_V4, 53)
        for i in range(events)
    ]
    decode_event = decode.decode_event
    wrong = WrongSourceDetector(local_addresses=LOCAL)
    if variant == "before":
        feed = one_feed([wrong], lambda found: None)
        start = time.perf_counter()
        for view in messages:
            event = decode_event(view)
            if event is not None:
                feed(event, 1.0)
        return 1e9 * (time.perf_counter() - start) / events
    unanswered = UnansweredDetector(local_addresses=LOCAL, wrong=wrong)
    detectors: list[Detector[WrongSourceFinding | UnansweredFinding]] = [wrong, unanswered]
    feeds = feeds_by_kind(detectors, lambda found: None)
    start = time.perf_counter()
    for view in messages:
        event = decode_event(view)
        if event is not None:
            feeds[event[0]](event, 1.0)
    return 1e9 * (time.perf_counter() - start) / events


def hot_path(events: int, rounds: int = 7) -> tuple[float, float]:
    """Best of `rounds` of each variant, each run in a fresh interpreter (in one
    process the second of two runs reuses the first's freed memory and looks ~20%
    faster, whichever it is), alternating so that the machine's load hits both."""
    times: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(rounds):
        for variant in times:
            out = subprocess.run(
                [sys.executable, __file__, "--hot-path", variant, "--events", str(events)],
                capture_output=True, text=True, check=True, cwd=ROOT,
            ).stdout
            times[variant].append(float(out))
    return min(times["before"]), min(times["now"])


def dispatch_overhead() -> tuple[float, float]:
    """ns per call of watch's feed as before (`feed(event, now)`) and now
    (`feeds[event[0]](event, now)`), with the same trivial feed behind both: what the
    composition adds to every event, free of the detector's own (noisy) work. timeit,
    best of 25 repeats of 200,000 calls each, alternating."""
    import timeit

    class Trivial:
        def feed(self, event: object, now: float) -> None:
            del event, now

    feed = Trivial().feed
    feeds = (feed, feed, feed, feed, feed)
    entry = decode.decode_entry(new_message("203.0.113.1", 1024, UPLINK_V4, 53))
    assert entry is not None
    event = decode.CtEvent(decode.NEW, entry)
    best = {"before": float("inf"), "now": float("inf")}
    for _ in range(25):
        best["before"] = min(best["before"], timeit.timeit(
            "feed(event, 1.0)", globals={"feed": feed, "event": event}, number=200_000))
        best["now"] = min(best["now"], timeit.timeit(
            "feeds[event[0]](event, 1.0)", globals={"feeds": feeds, "event": event},
            number=200_000))
    return 1e9 * best["before"] / 200_000, 1e9 * best["now"] / 200_000


def _count(topo: Topology) -> int:
    return int(topo.run(topo.host, "cat", "/proc/sys/net/netfilter/nf_conntrack_count"))


def destroy_wave(flows: int) -> None:
    with lab_topology(ipv6=False, netfilter="nft") as topo:
        topo.run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=5")
        out_ct = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed with the process
        reference = topo.spawn(
            topo.host,
            ["conntrack", "-E", "-e", "DESTROY", "-p", "udp", "-b", str(64 << 20),
             "-o", "timestamp"],
            stdout=out_ct.fileno(),
        )
        err = tempfile.NamedTemporaryFile("w+")  # noqa: SIM115 - closed below
        watch = subprocess.Popen(
            [sys.executable, "-m", "ctfix", "watch", "--netns", topo.host, "--json"],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
        )
        while "watching" not in Path(err.name).read_text():
            time.sleep(0.05)
        baseline = _count(topo)
        sent = blast(topo.container, CONTAINER_V4, UPLINK_V4, flows, (7, 9, 13, 19))
        cpu_start = process_cpu(watch.pid)
        # The wave: until the kernel has destroyed them all, then a moment to drain.
        deadline = time.monotonic() + 120
        while _count(topo) > baseline + 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
        cpu = process_cpu(watch.pid) - cpu_start
        watch.send_signal(signal.SIGTERM)
        stdout, _ = watch.communicate(timeout=60)
        topo.stop(reference)
        out_ct.seek(0)
        stamps = [
            float(line[1:line.index("]")]) for line in out_ct if "[DESTROY]" in line
        ]
    summary = json.loads(stdout.splitlines()[-1])
    counted = summary["unanswered"] + summary["unanswered_uncounted"]
    wave = max(stamps) - min(stamps) if len(stamps) > 1 else 0.0
    print(f"destroy wave: {flows} unanswered flows sent in {sent:.2f} s; their entries ended "
          f"over {wave:.2f} s ({counted / max(wave, 1e-9):,.0f} DESTROY events/s to watch, "
          "first to last as conntrack -E stamped them)")
    print(f"  conntrack -E -e DESTROY -p udp -b 64MiB saw {len(stamps)} "
          f"({100 * len(stamps) / flows:.1f}%)")
    print(f"  ctfix watch counted {counted} ({100 * counted / flows:.1f}%; "
          f"{summary['unanswered_uncounted']} past the service cap); lost {summary['lost']}, "
          f"resyncs {summary['resyncs']}; ratio watch/conntrack "
          f"{counted / max(1, len(stamps)):.3f}")
    print(f"  ctfix watch CPU during the wave {cpu:.2f} s = "
          f"{1e6 * cpu / max(1, counted):.1f} us per DESTROY event")


def tap_cost(datagrams: int) -> None:
    from ctfix.platform.icmp import SentUnreachable

    with lab_topology(ipv6=False, netfilter="nft") as topo:
        with netns.entered(topo.container):
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with netns.entered(topo.host):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind((CONTAINER_V4, 9999))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # drops: no backlog
        sender.connect((CONTAINER_V4, 9999))

        def run() -> float:
            # CPU time, not wall time: the kernel's share of a send (through the veth
            # and the bridge, and the tap's clone) runs in this thread's system call,
            # and other work on the machine does not count.
            send = sender.send
            start = time.thread_time()
            for _ in range(datagrams):
                send(b"x")
            return time.thread_time() - start

        times: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(3):
            times["without"].append(run())
            with netns.entered(topo.host):
                tap = SentUnreachable()
            try:
                times["with"].append(run())
            finally:
                tap.close()
        sink.close()
        sender.close()
    without, with_tap = (1e9 * min(times[k]) / datagrams for k in ("without", "with"))
    print(f"icmp tap: {datagrams} datagrams sent by the host namespace, {without:.0f} ns of "
          f"CPU each without the tap, {with_tap:.0f} ns with it ({with_tap / without:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--hot-path", choices=("before", "now"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hot_path:
        print(hot_path_once(args.hot_path, args.events))
        return 0
    plain, indexed = dispatch_overhead()
    print(f"dispatch: {plain:.0f} ns per feed call as before, {indexed:.0f} ns through the "
          f"feeds by kind (+{indexed - plain:.0f} ns per event)")
    before, now = hot_path(args.events)
    print(f"hot path: {args.events} NEW events, decode + feed: {before:.0f} ns/event with "
          f"the wrong-source detector alone, {now:.0f} ns/event composed with the "
          f"unanswered detector ({now / before:.3f}x; best of 7 runs each, and runs on "
          "this loaded machine vary by +-30%)")
    destroy_wave(args.flows)
    tap_cost(args.events)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
