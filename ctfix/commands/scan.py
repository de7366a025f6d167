"""`ctfix scan`: every UDP service in the namespace, each diagnosed exactly as
`ctfix explain PORT` would, worst first.

Read-only, like explain. Know before changing: the snapshot of every port comes from
one gathering (ctfix.platform.snapshot.collect_services: one conntrack dump, one
read of each ruleset) and each port is judged by the same `diagnose()` explain uses;
never diagnose a port any other way here, or scan and explain could disagree.
Exit 0 = every port ok, 1 = any broken or at-risk (or an outage), 2 = error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ctfix.commands.common import (
    add_all_netns_argument,
    add_format_arguments,
    add_netns_argument,
    add_rules_argument,
    enter_netns,
    netns_choice,
    output_format,
    require_root,
)
from ctfix.errors import ExitStatus

if TYPE_CHECKING:
    from ctfix.core.netns_scan import NamespaceScan
    from ctfix.core.rules import KnowledgeBase

DESCRIPTION = """\
List every UDP service in a network namespace, each diagnosed as `ctfix explain PORT`
would (same verdict, reasons and fixes), worst first: broken, at risk, unknown (ctfix
cannot see: conntrack does not track a family served), ok. One line per port with the
reason that says most, then the full write-up of each port that is not ok. Read-only
(but for one loopback datagram per family, to see whether conntrack tracks it).

A service port is one with an unconnected UDP socket, or a connect()ed one whose
local port is outside net.ipv4.ip_local_port_range (a server such as netcat that
connected to its first client); clients' sockets are left out. The sockets,
addresses, routes, rules and conntrack table are read once for all ports.

With --all-netns, every network namespace of the host (the host's, each
container's, each `ip netns` one) is entered in turn, in this one process, and its
services judged the same way; the report groups them by namespace, the namespace
with the worst service first. A namespace that disappears during the scan is
skipped with a note.

Requests to ports with nothing bound (what explain calls unanswered-no-socket) are
not services: a last section counts them per address:port from the same conntrack
dump (unreplied requests, client hosts), most first, at most 10 listed, ports the
knowledge base gives to one-way services (syslog) left out. It is information: it
changes neither the counts nor the exit status.

exit status: 0 every port ok, 1 any broken, at risk or unknown (or nothing answering),
2 error (bad input, missing privileges, missing namespace; with --all-netns, a
namespace that exists but could not be read, when nothing was found wrong)."""

EPILOG = """\
examples:
  ctfix scan                            every UDP service of this namespace
  ctfix scan --netns pid:4242           inside a container, by a process id
  ctfix scan --format markdown          for an incident document
  ctfix scan --all-netns                every namespace: host, containers, ip netns
  ctfix scan --json | jq '.services[] | select(.verdict != "ok").port'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    add_netns_argument(parser)
    add_all_netns_argument(parser)
    add_format_arguments(parser)
    add_rules_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ctfix.core.diagnosis import diagnose
    from ctfix.core.scan import healthy, worst_first
    from ctfix.core.unbound import UnboundTally
    from ctfix.platform import rules_files, snapshot
    from ctfix.render import scan as render

    fmt = output_format(args)
    every = netns_choice(args)
    kb = rules_files.load(args.rules, builtin=True)
    require_root("ctfix scan (it reads conntrack and netfilter)")
    if every:
        return _run_all(fmt, kb)
    label = enter_netns(args.netns)
    tally = UnboundTally()
    snapshots = snapshot.collect_services(label, unbound=tally)
    diagnoses = worst_first([diagnose(snap, kb) for snap in snapshots])
    unbound = tally.summary(kb)  # information: it changes neither counts nor status
    if fmt == "json":
        from ctfix.render.jsonout import write_document

        write_document(render.scan_document(diagnoses, label, unbound), sys.stdout)
    elif fmt == "markdown":
        sys.stdout.write(render.render_markdown(diagnoses, label, unbound))
    else:
        from ctfix.render.stamp import stamp_text
        from ctfix.render.style import Style
        from ctfix.render.width import terminal_width

        style, width = Style.for_stream(sys.stdout), terminal_width(sys.stdout)
        sys.stdout.write(
            render.render_text(diagnoses, label, style, stamp_text(), width, unbound)
        )
    return ExitStatus.OK if all(healthy(d) for d in diagnoses) else ExitStatus.PROBLEM


def _run_all(fmt: str, kb: KnowledgeBase) -> int:
    from ctfix.commands.scanning import scan_namespaces
    from ctfix.render import scan_all as render

    require_root("ctfix scan --all-netns (it enters every namespace)", "CAP_SYS_ADMIN")
    scans = scan_namespaces(kb, unbound=True)
    if fmt == "json":
        from ctfix.render.jsonout import write_document

        write_document(render.scan_document(scans), sys.stdout)
    elif fmt == "markdown":
        sys.stdout.write(render.render_markdown(scans))
    else:
        from ctfix.render.stamp import stamp_text
        from ctfix.render.style import Style
        from ctfix.render.width import terminal_width

        style, width = Style.for_stream(sys.stdout), terminal_width(sys.stdout)
        sys.stdout.write(render.render_text(scans, style, stamp_text(), width))
    return status_of(scans)


def status_of(scans: Sequence[NamespaceScan]) -> int:
    """1 when any service is not ok; else 2 when a namespace could not be read (what
    it holds is unknown); else 0."""
    from ctfix.core.scan import healthy

    if any(not healthy(d) for scan in scans for d in scan.diagnoses):
        return ExitStatus.PROBLEM
    if any(scan.unreadable for scan in scans):
        return ExitStatus.ERROR
    return ExitStatus.OK
