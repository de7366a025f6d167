"""What every lab scenario is made of: checks, sections, a story, and the scenario.

Each step is a `Check`: what an engineer expects, what was seen, and whether they
agree. A scenario runs on a `Topology` built by `ctfix.lab.topology` and reports
through a callback, so `ctfix lab` prints as it goes and the tests read the same
checks. Scenarios are registered by name in `ctfix.lab.registry`, one module each.
Know before changing: the verdict (bug reproduced AND fix confirmed) is the lab's
exit status; a check that is only informative must say so (`informative`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ctfix.core.addr import endpoint
from ctfix.lab import topology as t


@dataclass(frozen=True, slots=True)
class Check:
    """One expectation and what the lab saw."""

    title: str
    expected: str
    seen: str
    ok: bool
    detail: tuple[str, ...] = ()


@dataclass
class Section:
    title: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass
class Story:
    """What the lab found: the bug section(s) and the fix section(s)."""

    port: int
    bug: list[Section] = field(default_factory=list)
    fix: list[Section] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        return bool(self.bug) and all(s.ok for s in self.bug)

    @property
    def fixed(self) -> bool:
        return bool(self.fix) and all(s.ok for s in self.fix)


Report = Callable[[str, object], None]  # ("section", Section) | ("check", Check)


Run = Callable[[t.Topology, int, Report, float], Story]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One story the lab can tell, on the lab's topology.

    `run(topology, port, report, timeout)` builds what the scenario adds (rules,
    servers), reports each section and check as it goes, and returns the story;
    everything it starts is stopped by the topology's teardown at the latest.
    `setup` says in one line per item what the scenario adds to the topology, `why`
    explains a good result, `try_it(topology, port, ctfix)` the commands to try with
    --keep.
    """

    name: str
    title: str
    run: Run
    setup: Callable[[t.Topology, int], tuple[str, ...]] = lambda _topo, _port: ()
    why: str = ""
    try_it: Callable[[t.Topology, int, str], tuple[str, ...]] = lambda _t, _p, _c: ()


# -- what scenarios share ------------------------------------------------------------------


def _serve_argv(port: int, broken: bool) -> list[str]:
    argv = [sys.executable, "-m", "ctfix", "serve", "--port", str(port)]
    return [*argv, "--broken"] if broken else argv


@contextmanager
def server(topo: t.Topology, port: int, broken: bool) -> Iterator[subprocess.Popen[bytes]]:
    """`ctfix serve [--broken]` on the port in the host namespace, ready, then stopped."""
    proc = topo.spawn(topo.host, _serve_argv(port, broken), stderr=subprocess.PIPE)
    try:
        t.wait_udp_bound(proc.pid, port)
        yield proc
    finally:
        topo.stop(proc)


def reply_text(ex: t.Exchange) -> str:
    if ex.reply_from is None:
        return "no reply"
    return f"reply from {endpoint(*ex.reply_from)}"
