"""Where `ctfix watch`'s start-up time goes: a big UDP table's dump recorded once, then
replayed in-process through `conntrack.dump` and the three detectors' snapshots, the
way `watch_ns.resync` feeds them, timed step by step (root, namespaces).

    sudo .venv/bin/python -m bench.dump_replay_bench [--size 250000] [--rounds 3]
        [--root DIR] [--profile]

1. The lab's host namespace gets `--size` entries (startup_bench's table); its UDP
   dump's recv() buffers are recorded (a pickle in a temporary file) and the
   namespace is torn down.
2. Each round, in a fresh interpreter per checkout (this one, and `--root`'s, a
   `git archive` of another commit, alternately): wall time of decoding into entries
   and of each detector's snapshot `add` and `finish`, in seconds, and the unanswered
   detector's time over the decoding's (the ratio that survives a noisy machine).
   `--profile`: cProfile of one replay in this checkout instead.

Know before changing: figures are printed, never asserted; documentation addresses
only, namespaces this script creates only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.startup_bench import load
from ctfix.lab.topology import BRIDGE_V4, UPLINK_V4, lab_topology

ROOT = Path(__file__).resolve().parent.parent

RECORD = """
import pickle, socket, sys
from ctfix.platform import conntrack
buffers = {f: list(conntrack.dump_buffers(f, 17)) for f in (socket.AF_INET, socket.AF_INET6)}
with open(sys.argv[1], "wb") as out:
    pickle.dump(buffers, out)
"""

REPLAY = """
import cProfile, itertools, json, pickle, pstats, selectors, sys, time
from ctfix.platform import conntrack
with open(sys.argv[1], "rb") as source:
    buffers = pickle.load(source)

def replayed(family, proto, *args, **kwargs):
    yield from buffers[family]

conntrack.dump_buffers = replayed
from ctfix.commands.watch_ns import DUMP_CHUNK
from ctfix.commands.watch_unanswered import UnansweredWatch
from ctfix.core.detectors.stale_nat import StaleNatDetector
from ctfix.core.detectors.wrong_source import WrongSourceDetector

def run():
    wrong = WrongSourceDetector(udp_timeout=600)
    wrong.local_addresses = frozenset(sys.argv[2].split(","))
    stale = StaleNatDetector(udp_timeout=600, stream_timeout=600)
    unanswered = UnansweredWatch(wrong, stale, None, selectors.DefaultSelector(), print)
    now = time.time()
    wrong.since = now
    steps = {"decode": 0.0, "wrong-source": 0.0, "stale-nat": 0.0, "unanswered": 0.0}
    snapshots = [
        (name, detector.snapshot(now, complete=True))
        for name, detector in zip(list(steps)[1:], (wrong, stale, unanswered.detector))
    ]
    entries = iter(conntrack.dump(proto=17))
    while True:
        start = time.perf_counter()
        chunk = list(itertools.islice(entries, DUMP_CHUNK))
        steps["decode"] += time.perf_counter() - start
        if not chunk:
            break
        for name, snapshot in snapshots:
            start = time.perf_counter()
            snapshot.add(chunk)
            steps[name] += time.perf_counter() - start
    for name, snapshot in snapshots:
        start = time.perf_counter()
        snapshot.finish()
        steps[name] += time.perf_counter() - start
    return steps

if sys.argv[3] == "profile":
    cProfile.run("run()", sys.argv[1] + ".prof")
    pstats.Stats(sys.argv[1] + ".prof").sort_stats("tottime").print_stats(20)
else:
    print(json.dumps(run()))
"""


def replay(root: Path, path: str, mode: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [sys.executable, "-c", REPLAY, path, f"{UPLINK_V4},{BRIDGE_V4}", mode]
    done = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, check=True)
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=250_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, help="another checkout to compare with")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark builds network namespaces")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dump.pickle")
        with lab_topology(ipv6=False, netfilter="nft") as topo:
            topo.run(topo.host, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
            load(topo, args.size, 0)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            argv = topo.exec_argv(topo.host, [sys.executable, "-c", RECORD, path])
            subprocess.run(argv, env=env, cwd=ROOT, check=True)
            print(f"recorded a dump of {topo.run(topo.host, 'conntrack', '-C').strip()} entries")
        if args.profile:
            print(replay(ROOT, path, "profile"))
            return 0
        roots = [("this checkout", ROOT)]
        if args.root is not None:
            roots.insert(0, (str(args.root), args.root.resolve()))
        for round_no in range(1, args.rounds + 1):
            for name, root in roots:
                steps = _steps(replay(root, path, "time"))
                shown = ", ".join(f"{k} {v:.2f} s" for k, v in steps.items())
                ratio = steps["unanswered"] / steps["decode"]
                print(f"round {round_no}, {name}: {shown}; unanswered / decode {ratio:.2f}")
    return 0


def _steps(text: str) -> dict[str, float]:
    """The replay's JSON: seconds per step."""
    value = json.loads(text)
    assert isinstance(value, dict)
    return {str(k): float(v) for k, v in value.items()}


if __name__ == "__main__":
    sys.exit(main())
