"""`ctfix explain PORT`: who is on a UDP port, is it affected, the evidence, the fix.

Read-only: it only asks the kernel (sock_diag, rtnetlink, conntrack dumps, the
nftables ruleset, iptables-legacy tables that exist) and never changes anything.

Know before changing: the namespace is entered for the whole command, before any
socket is created (sockets keep the namespace they were made in); the knowledge base
is loaded first, so a broken `--rules` file fails before any work. Exit 0 = ok,
1 = broken or at-risk, or nothing bound while clients go unanswered (service_down),
2 = error (via the CLI's funnel).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ctfix.commands.common import (
    add_format_arguments,
    add_netns_argument,
    add_rules_argument,
    enter_netns,
    output_format,
    port_number,
    positive_seconds,
    require_root,
)
from ctfix.errors import ExitStatus

if TYPE_CHECKING:
    from ctfix.core.model import Diagnosis

DESCRIPTION = """\
Say which process on a UDP port is affected by wrong-source replies, why, with the
evidence, and how to fix it. Read-only: explain never changes anything.

It reads the sockets on the port and their processes, the namespace's addresses,
routes and policy rules (the reply source is a route lookup with ipproto udp and the
source port, so policy rules count), the conntrack table for the port (filtered in
the kernel), and the nftables and iptables-legacy rules that touch the port.

verdicts and exit status:
  0  ok        specific binds, a service known to answer correctly, or healthy evidence
  1  at-risk   a wildcard socket where some client network would get replies from
               another address than the one it sends to (no evidence yet)
  1  broken    conntrack shows wrong-source replies
  1  ok, but nothing answers: no socket on the port while clients' requests go
               unanswered (an outage; JSON: "service_down": true)
  2  error     bad input, missing privileges (CAP_NET_ADMIN), missing namespace"""

EPILOG = """\
examples:
  ctfix explain 53                          the host's DNS port
  ctfix explain 5353 --netns pid:4242       inside a container, by a process id
  ctfix explain 1194 --listen 30            watch live events for 30 s first
  ctfix explain 53 --format markdown        for an incident document
  ctfix explain 53 --json | jq .verdict     for scripts
  ctfix explain 123 --rules /etc/ctfix/rules   with your own knowledge-base entries"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument("port", type=port_number, metavar="PORT", help="the UDP port")
    add_netns_argument(parser)
    add_format_arguments(parser)
    add_rules_argument(parser)
    parser.add_argument(
        "--listen",
        metavar="S",
        type=positive_seconds,
        default=0.0,
        help="also watch live conntrack events for S seconds before answering",
    )


def run(args: argparse.Namespace) -> int:
    from ctfix.core.diagnosis import diagnose
    from ctfix.platform import containers, rules_files, snapshot
    from ctfix.render import explain as render

    fmt = output_format(args)
    kb = rules_files.load(args.rules, builtin=True)
    require_root("ctfix explain (it reads conntrack and netfilter)")
    label = enter_netns(args.netns)
    snap = snapshot.collect(args.port, label, listen_seconds=args.listen)
    diagnosis = containers.annotate(diagnose(snap, kb))
    if fmt == "json":
        from ctfix.render.jsonout import write_document

        write_document(render.explain_document(diagnosis), sys.stdout)
    elif fmt == "markdown":
        sys.stdout.write(render.render_markdown(diagnosis))
    else:
        from ctfix.render.style import Style
        from ctfix.render.width import terminal_width

        style, width = Style.for_stream(sys.stdout), terminal_width(sys.stdout)
        sys.stdout.write(render.render_text(diagnosis, style, width))
    return exit_status(diagnosis)


def exit_status(diagnosis: Diagnosis) -> int:
    """0 only when the port is fine: ok, and not an outage (nothing bound, clients
    unanswered), which the verdict (about wrong sources) would call ok."""
    healthy = diagnosis.verdict == "ok" and not diagnosis.service_down
    return ExitStatus.OK if healthy else ExitStatus.PROBLEM
