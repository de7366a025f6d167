"""`ctfix check`: a node-problem-detector custom plugin. One line on stdout naming the
worst finding, and the plugin contract's exit status: 0 OK, 1 problem, 2 unknown.

Know before changing: every error is "unknown" (exit 2, ctfix's error status too),
and even then stdout carries the one line (node-problem-detector shows stdout as
the condition's message; stderr only reaches its log): so this command catches its
own errors instead of leaving them to the CLI's funnel. The judgement is
ctfix.core.check.judge over scan's own per-namespace results.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ctfix.commands.common import (
    add_all_netns_argument,
    add_netns_argument,
    add_rules_argument,
)
from ctfix.errors import CtfixError, ExitStatus

if TYPE_CHECKING:
    from ctfix.core.check import CheckResult

DESCRIPTION = """\
Check a node as a node-problem-detector custom plugin: print ONE line (at most 79
bytes; node-problem-detector cuts the message at max_output_length, 80 by default)
naming the worst finding, and exit with the plugin contract's status. What is
checked: every UDP service, judged as `ctfix scan` judges it (broken, at risk,
nothing answering), and the conntrack table's fill (at least 85% is a problem).
With --all-netns, every network namespace of the host (as `ctfix scan --all-netns`).

exit status (node-problem-detector's custom plugin contract):
  0  OK       every service ok, every conntrack table below 85% full
  1  problem  the line names the worst: a full conntrack table, a wrong-source
              service, a nearly full table, a service nothing answers, one at risk
  2  unknown  the check could not be made (bad input, missing privileges, a
              namespace that could not be read, any error). 2 is also every ctfix
              command's error status: for check an error IS "unknown", so the two
              agree; the line then starts with `unknown:` and says why.

  UDP 5353 in web: wrong source 198.51.100.13 -> 192.0.2.1 (+2 more)
reads: in namespace web, clients sent to 198.51.100.13 and the reply came from
192.0.2.1; two more problems follow (`ctfix check --json` lists them, `ctfix scan`
explains them). deploy/node-problem-detector/ has a plugin configuration."""

EPILOG = """\
examples:
  ctfix check                           this namespace: one line, exit 0/1/2
  ctfix check --all-netns               the node: every namespace
  ctfix check --all-netns --json | jq '.problems[] | {netns, port}'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    add_netns_argument(parser)
    add_all_netns_argument(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON document (status, the line, every problem) instead of the line",
    )
    parser.add_argument(
        "--ignore-at-risk",
        action="store_true",
        help="a service at risk (a prediction from its socket and routes: no failure "
        "seen yet) is not a problem; only what was observed is (deploy/"
        "node-problem-detector uses it, so the Node condition means a failure)",
    )
    add_rules_argument(parser)


_STATUS = {"ok": ExitStatus.OK, "problem": ExitStatus.PROBLEM, "unknown": ExitStatus.ERROR}


def run(args: argparse.Namespace) -> int:
    from ctfix.render import check as render

    try:
        result, single = _judge(args)
    except CtfixError as err:
        # The whole of it for people and node-problem-detector's log; its start on stdout.
        print(f"ctfix check: error: {err.one_line()}", file=sys.stderr)
        return _unknown(args, render.error_line(err.message))
    except Exception as err:
        import os
        import traceback

        if getattr(args, "debug", False) or os.environ.get("CTFIX_DEBUG"):
            traceback.print_exc()
        return _unknown(args, render.error_line(f"internal error: {type(err).__name__}: {err}"))
    message = render.line(result, single)
    if args.json:
        from ctfix.render.jsonout import write_document

        write_document(render.check_document(result, message, single), sys.stdout)
    else:
        print(message, flush=True)
    return _STATUS[result.status]


def _judge(args: argparse.Namespace) -> tuple[CheckResult, str | None]:
    from ctfix.commands.common import enter_netns, netns_choice, require_root
    from ctfix.commands.scanning import scan_here, scan_namespaces
    from ctfix.core.check import judge
    from ctfix.core.netns_scan import NamespaceScan
    from ctfix.platform import namespaces, rules_files

    every = netns_choice(args)
    kb = rules_files.load(args.rules, builtin=True)
    require_root("ctfix check (it reads conntrack and netfilter)")
    if every:
        require_root("ctfix check --all-netns (it enters every namespace)", "CAP_SYS_ADMIN")
        return judge(scan_namespaces(kb, health=True), at_risk=not args.ignore_at_risk), None
    label = enter_netns(args.netns)
    chosen = NamespaceScan(label, args.netns or label, "chosen", namespaces.current_id())
    return judge([scan_here(chosen, kb, health=True)], at_risk=not args.ignore_at_risk), label


def _unknown(args: argparse.Namespace, message: str) -> int:
    if getattr(args, "json", False):
        from ctfix.render.jsonout import envelope, write_document

        write_document({**envelope(), "status": "unknown", "message": message}, sys.stdout)
    else:
        print(message, flush=True)
    return ExitStatus.ERROR
