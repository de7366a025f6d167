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

from ctfix.commands.common import (
    add_format_arguments,
    add_netns_argument,
    add_rules_argument,
    enter_netns,
    output_format,
    require_root,
)
from ctfix.errors import ExitStatus

DESCRIPTION = """\
List every UDP service in a network namespace, each diagnosed as `ctfix explain PORT`
would (same verdict, reasons and fixes), worst first: broken, at risk, ok. One line
per port with the reason that says most, then the full write-up of each port that is
not ok. Read-only.

A service port is one with an unconnected UDP socket, or a connect()ed one whose
local port is outside net.ipv4.ip_local_port_range (a server such as netcat that
connected to its first client); clients' sockets are left out. The sockets,
addresses, routes, rules and conntrack table are read once for all ports.

exit status: 0 every port ok, 1 any broken or at risk (or nothing answering),
2 error (bad input, missing privileges, missing namespace)."""

EPILOG = """\
examples:
  ctfix scan                            every UDP service of this namespace
  ctfix scan --netns pid:4242           inside a container, by a process id
  ctfix scan --format markdown          for an incident document
  ctfix scan --json | jq '.services[] | select(.verdict != "ok") | .port'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    add_netns_argument(parser)
    add_format_arguments(parser)
    add_rules_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ctfix.core.diagnosis import diagnose
    from ctfix.core.scan import worst_first
    from ctfix.platform import rules_files, snapshot
    from ctfix.render import scan as render

    fmt = output_format(args)
    kb = rules_files.load(args.rules, builtin=True)
    require_root("ctfix scan (it reads conntrack and netfilter)")
    label = enter_netns(args.netns)
    diagnoses = worst_first([diagnose(snap, kb) for snap in snapshot.collect_services(label)])
    if fmt == "json":
        from ctfix.render.jsonout import write_document

        write_document(render.scan_document(diagnoses, label), sys.stdout)
    elif fmt == "markdown":
        sys.stdout.write(render.render_markdown(diagnoses, label))
    else:
        from ctfix.render.style import Style

        sys.stdout.write(render.render_text(diagnoses, label, Style.for_stream(sys.stdout)))
    from ctfix.commands.explain import exit_status

    healthy = all(exit_status(d) == ExitStatus.OK for d in diagnoses)
    return ExitStatus.OK if healthy else ExitStatus.PROBLEM
