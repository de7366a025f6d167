"""The lab's story: reproduce the wrong-source bug, then show the IP_PKTINFO fix.

Each step is a `Check`: what an engineer expects, what was seen, and whether they
agree. The story runs on a `Topology` built by `ctfix.lab.topology` and reports
through a callback, so `ctfix lab` prints as it goes and the tests read the same
checks. Know before changing: the verdict (bug reproduced AND fix confirmed) is the
lab's exit status; a check that is only informative must say so (`informative`).
"""

from __future__ import annotations

import socket
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


def _serve_argv(port: int, broken: bool) -> list[str]:
    argv = [sys.executable, "-m", "ctfix", "serve", "--port", str(port)]
    return [*argv, "--broken"] if broken else argv


@contextmanager
def _server(topo: t.Topology, port: int, broken: bool) -> Iterator[subprocess.Popen[bytes]]:
    proc = topo.spawn(topo.host, _serve_argv(port, broken), stderr=subprocess.PIPE)
    try:
        t.wait_udp_bound(proc.pid, port)
        yield proc
    finally:
        topo.stop(proc)


def _reply_text(ex: t.Exchange) -> str:
    if ex.reply_from is None:
        return "no reply"
    return f"reply from {endpoint(*ex.reply_from)}"


def _exchange_check(
    topo: t.Topology, address: str, port: int, *, want_reply: bool, timeout: float
) -> tuple[Check, t.Exchange]:
    ex = t.udp_exchange(topo.container, address, port, timeout=timeout)
    right = ex.reply_from is not None and ex.reply_from[0] == address
    expected = (
        f"reply from {endpoint(address, port)}"
        if want_reply
        else "no reply: the bug (the reply leaves from another address)"
    )
    ok = right if want_reply else ex.reply_from is None
    title = f"connected client {endpoint(*ex.client)} -> {endpoint(address, port)}"
    return Check(title, expected, _reply_text(ex), ok), ex


def run_story(
    topo: t.Topology, port: int, report: Report, *, timeout: float = 1.0, evidence: bool = True
) -> Story:
    """Run both halves of the story for each family the topology has."""
    from ctfix.lab.evidence import LabEvidence

    story = Story(port)
    families = [socket.AF_INET] + ([socket.AF_INET6] if topo.ipv6 else [])
    for broken in (True, False):
        title = (
            "a wildcard server that answers with recvfrom()/sendto() (ctfix serve --broken)"
            if broken
            else "the reference server: wildcard + IP_PKTINFO (ctfix serve)"
        )
        with _server(topo, port, broken) as proc, LabEvidence(topo) as proof:
            section = Section(f"{title}, pid {proc.pid}")
            report("section", section)
            for family in families:
                uplink, bridge = topo.local_addresses(family)
                for address, want in ((bridge, True), (uplink, not broken)):
                    check, ex = _exchange_check(
                        topo, address, port, want_reply=want, timeout=timeout
                    )
                    extra = proof.checks(port, ex) if broken and not want and evidence else []
                    for item in (check, *extra):
                        section.checks.append(item)
                        report("check", item)
            (story.bug if broken else story.fix).append(section)
    return story
