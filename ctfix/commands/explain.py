"""`ctfix explain PORT`: who is on a UDP port, is it affected, the evidence, the fix.

Read-only: it only asks the kernel (sock_diag, rtnetlink, conntrack dumps, the
nftables ruleset, iptables-legacy tables that exist) and never changes anything.

Know before changing: the namespace is entered for the whole command, before any
socket is created (sockets keep the namespace they were made in); the knowledge base
is loaded first, so a broken `--rules` file fails before any work. Exit 0 = ok,
1 = broken or at-risk, 2 = error (via the CLI's funnel).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctfix.commands.common import add_netns_argument, enter_netns, port_number, positive_seconds
from ctfix.errors import ExitStatus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("port", type=port_number, metavar="PORT", help="the UDP port")
    add_netns_argument(parser)
    parser.add_argument(
        "--format",
        choices=("text", "markdown", "json"),
        default="text",
        help="text (default), markdown for an incident document, or json",
    )
    parser.add_argument("--json", action="store_true", help="same as --format json")
    parser.add_argument(
        "--rules",
        metavar="DIR",
        action="append",
        type=Path,
        default=[],
        help="also load the knowledge-base files (*.yaml) in DIR; repeatable",
    )
    parser.add_argument(
        "--listen",
        metavar="S",
        type=positive_seconds,
        default=0.0,
        help="also watch live conntrack events for S seconds before answering",
    )


def run(args: argparse.Namespace) -> int:
    from ctfix.core import rules
    from ctfix.core.diagnose import diagnose
    from ctfix.platform import snapshot
    from ctfix.render import explain as render

    kb = rules.load(args.rules, builtin=True)
    label = enter_netns(args.netns)
    snap = snapshot.collect(args.port, label, listen_seconds=args.listen)
    diagnosis = diagnose(snap, kb)
    fmt = "json" if args.json else args.format
    if fmt == "json":
        sys.stdout.write(render.render_json(diagnosis))
    elif fmt == "markdown":
        sys.stdout.write(render.render_markdown(diagnosis))
    else:
        from ctfix.render.style import Style

        sys.stdout.write(render.render_text(diagnosis, Style.for_stream(sys.stdout)))
    return ExitStatus.OK if diagnosis.verdict == "ok" else ExitStatus.PROBLEM
