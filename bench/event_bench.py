"""Recorded-event microbenchmark: how many conntrack events per second watch's loop
body handles on one core (decode + the composed detectors' feed), as it did (CtEvent
objects: `decode_event` + `feeds_by_kind`) and as it does (the Packed form:
`packed_event` + `packed_feeds_by_kind`).

    .venv/bin/python -m bench.event_bench [--events 200000] [--rounds 7]

The events are NEW messages laid out as the kernel sends them (IPv4 UDP, unreplied,
each a new client port: a flood of single-datagram flows, every one a pending
request), the detectors those of watch (wrong-source and unanswered). Each round runs
each variant in a fresh interpreter (a second run in one process reuses the first's
freed memory), alternating; min / median / max of ns per event and the ceiling in
events/s. Goal (issue 14): >= 300k events/s. recv() is not included (measured by
watch_bench as CPU per event against `conntrack -E`).

Know before changing: figures are printed, never asserted; no root needed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("objects", "packed", "decode-objects", "decode-packed")


def once(variant: str, events: int) -> float:
    """ns per event of one variant over `events` NEW messages."""
    from bench.unanswered_bench import LOCAL, new_message
    from ctfix.core import decode
    from ctfix.core.detectors import Detector, feeds_by_kind, packed_feeds_by_kind
    from ctfix.core.detectors.unanswered import UnansweredDetector
    from ctfix.core.detectors.wrong_source import WrongSourceDetector
    from ctfix.lab.topology import UPLINK_V4

    messages = [
        new_message(f"203.0.113.{1 + i % 250}", 1024 + (i // 250) % 60000, UPLINK_V4, 53)
        for i in range(events)
    ]
    wrong = WrongSourceDetector(local_addresses=LOCAL)
    unanswered = UnansweredDetector(local_addresses=LOCAL, wrong=wrong)
    detectors: list[Detector[Any]] = [wrong, unanswered]
    if variant.startswith("decode-"):
        decoder = decode.decode_event if variant == "decode-objects" else decode.packed_event
        start = time.perf_counter()
        for view in messages:
            decoder(view)
        return 1e9 * (time.perf_counter() - start) / events
    if variant == "objects":
        feeds = feeds_by_kind(detectors, lambda found: None)
        decode_event = decode.decode_event
        start = time.perf_counter()
        for view in messages:
            event = decode_event(view)
            if event is not None:
                feeds[event[0]](event, 1.0)
        return 1e9 * (time.perf_counter() - start) / events
    packed_feeds = packed_feeds_by_kind(detectors, lambda found: None)
    packed_event = decode.packed_event
    start = time.perf_counter()
    for view in messages:
        packed = packed_event(view)
        if packed is not None:
            packed_feeds[packed[0]](packed, 1.0)
    return 1e9 * (time.perf_counter() - start) / events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--once", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once:
        print(once(args.once, args.events))
        return 0
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, "-m", "bench.event_bench", "--once", variant,
                 "--events", str(args.events)],
                capture_output=True, text=True, check=True, cwd=ROOT,
            ).stdout  # fmt: skip
            times[variant].append(float(out))
    print(f"{args.events} NEW events, {args.rounds} rounds (fresh interpreter each):")
    for variant, ns in times.items():
        best = min(ns)
        print(
            f"  {variant}: {best:.0f} / {statistics.median(ns):.0f} / {max(ns):.0f} ns per "
            f"event (min / median / max); ceiling {1e9 / best / 1000:.0f}k events/s "
            f"(median {1e9 / statistics.median(ns) / 1000:.0f}k)"
        )
    ratio = statistics.median(times["packed"]) / statistics.median(times["objects"])
    print(f"  packed / objects (medians): {ratio:.2f}; goal >= 300k events/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
