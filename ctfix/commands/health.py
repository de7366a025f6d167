"""`ctfix health`: is conntrack itself healthy? Table fill, counters, rates, verdict.

Read-only. One reading by default (fill and totals since conntrack started in the
namespace); `--interval S` takes a second reading S seconds later and judges what
rose in between, `--count N` repeats that for N intervals (a report each).

Know before changing: the namespace is entered before any socket is made (netlink
sockets keep their namespace); the readings are `ctfix.platform.ctstats.sample()`,
the judgement `ctfix.core.health.assess()`. Exit 0 = healthy, 1 = problem in any
interval, 2 = error (via the CLI's funnel).
"""

from __future__ import annotations

import argparse
import sys
import time

from ctfix.commands.common import add_netns_argument, enter_netns, positive_seconds, require_root
from ctfix.errors import CtfixError, ExitStatus

DESCRIPTION = """\
Read the kernel's conntrack statistics over ctnetlink (what `conntrack -S` and
`conntrack -C` show; /proc/net/stat/nf_conntrack is not needed) and say whether
conntrack itself loses packets: how full the table is, and how fast insert_failed,
drop, early_drop, chain_toolong, clash_resolve, error and search_restart rise,
with what each usually means (the DNS insert race of kubernetes 56903, a full table,
hash bucket pressure, ...).

verdicts and exit status:
  0  healthy   the table is below 85% full and no counter that loses packets rose
  1  problem   the table is at least 85% full, or insert_failed, drop, early_drop or
               chain_toolong rose during an interval
  2  error     bad input, missing privileges (CAP_NET_ADMIN), missing namespace

One reading cannot say what is rising (the counters are totals since conntrack
started in the namespace): give --interval to measure rates."""

EPILOG = """\
examples:
  ctfix health                          fill and totals, now
  ctfix health --interval 5             what rose during 5 seconds
  ctfix health --interval 10 --count 6  a report every 10 s for a minute
  ctfix health --netns pid:4242 --json  a container's namespace, for scripts"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    add_netns_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="print a JSON document (one per interval)"
    )
    parser.add_argument(
        "--interval",
        type=positive_seconds,
        metavar="S",
        help="read again after S seconds and judge what rose in between",
    )
    parser.add_argument(
        "--count",
        type=_count,
        metavar="N",
        help="with --interval: N intervals, a report after each (default 1)",
    )


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of intervals (1 or more)")
    return int(text)


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.interval is None:
        raise CtfixError("--count needs --interval", "e.g. --interval 5 --count 12")
    require_root("reading conntrack statistics")
    label = enter_netns(args.netns)

    from ctfix.core.health import Health, assess
    from ctfix.platform import ctstats

    def report(health: Health) -> None:
        from ctfix.render import health as render
        from ctfix.render.jsonout import utc_timestamp, write_document

        if args.json:
            write_document(render.to_json_obj(health, label), sys.stdout)
        else:
            from ctfix.render.style import Style
            from ctfix.render.width import fit_lines, terminal_width

            when = utc_timestamp() if args.interval is not None else None
            style = Style.for_stream(sys.stdout)
            text = render.render_text(health, label, style, when)
            # A terminal gets every line within its width (a pipe gets them as they are).
            width = terminal_width(sys.stdout)
            sys.stdout.write(fit_lines(text, width) if width else text)
            sys.stdout.flush()

    previous = ctstats.sample()
    if args.interval is None:
        health = assess(previous)
        report(health)
        return ExitStatus.PROBLEM if health.verdict == "problem" else ExitStatus.OK
    count = args.count or 1
    print(
        f"ctfix health: first reading taken; reporting every {args.interval:g} s, "
        f"{count} time{'s' if count > 1 else ''}",
        file=sys.stderr,
        flush=True,
    )
    status = ExitStatus.OK
    deadline = previous.taken
    for index in range(count):
        deadline += args.interval
        # Sleep to a deadline, not for a duration: the readings take time too.
        time.sleep(max(0.0, deadline - time.monotonic()))
        current = ctstats.sample()
        health = assess(current, previous)
        if index and not args.json:
            sys.stdout.write("\n")
        report(health)
        if health.verdict == "problem":
            status = ExitStatus.PROBLEM
        previous = current
    return status


__all__ = ["add_arguments", "run"]
