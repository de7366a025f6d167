"""The lab's first story (`ctfix lab`, scenario wrong-source): reproduce the
wrong-source bug, then show the IP_PKTINFO fix. Other scenarios: ctfix.lab.registry.

Each step is a check (ctfix.lab.checks): what was observed, and whether it is what
an engineer expects. The story runs on a `Topology` built by `ctfix.lab.topology`
and reports through a callback, so `ctfix lab` prints as it goes (ctfix.render.lab)
and the tests read the same checks.

Know before changing: the verdict (bug reproduced AND fix confirmed) is the lab's
exit status.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ctfix.lab import topology as t
from ctfix.lab.checks import Check, ExchangeCheck, Section, Story
from ctfix.lab.evidence import LabEvidence

#: told each section as it starts, then each of its checks as it is made
Report = Callable[[Section | Check], None]


def _serve_argv(port: int, broken: bool) -> list[str]:
    argv = [sys.executable, "-m", "ctfix", "serve", "--port", str(port)]
    return [*argv, "--broken"] if broken else argv


@contextmanager
def server(topo: t.Topology, port: int, broken: bool) -> Iterator[subprocess.Popen[bytes]]:
    """`ctfix serve [--broken]` on the port in the host namespace: ready, then stopped
    (every scenario's server)."""
    proc = topo.spawn(topo.host, _serve_argv(port, broken), stderr=subprocess.PIPE)
    try:
        t.wait_udp_bound(proc.pid, port)
        yield proc
    finally:
        topo.stop(proc)


def _exchange_check(
    topo: t.Topology, address: str, port: int, *, want_reply: bool, timeout: float
) -> tuple[ExchangeCheck, t.Exchange]:
    ex = t.udp_exchange(topo.container, address, port, timeout=timeout)
    return ExchangeCheck(ex.client, address, port, want_reply, ex.reply_from), ex


def run_story(
    topo: t.Topology, port: int, report: Report, *, timeout: float = 1.0, evidence: bool = True
) -> Story:
    """Run both halves of the story for each family the topology has."""
    story = Story(port)
    families = [socket.AF_INET] + ([socket.AF_INET6] if topo.ipv6 else [])
    for broken in (True, False):
        with server(topo, port, broken) as proc, LabEvidence(topo) as proof:
            section = Section(broken, proc.pid)
            report(section)
            for family in families:
                uplink, bridge = topo.local_addresses(family)
                for address, want in ((bridge, True), (uplink, not broken)):
                    check, ex = _exchange_check(
                        topo, address, port, want_reply=want, timeout=timeout
                    )
                    extra = proof.checks(port, ex) if broken and not want and evidence else []
                    for item in (check, *extra):
                        section.checks.append(item)
                        report(item)
            (story.bug if broken else story.fix).append(section)
    return story
