"""`ctfix lab`: reproduce the wrong-source bug and its fix in throwaway namespaces.

Know before changing: teardown must happen whatever ends the run (an error, Ctrl-C,
SIGTERM, SIGHUP), so signals are turned into exceptions and the topology is a
context manager; nothing is ever created in the caller's own namespace.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import TextIO

from ctfix.commands.common import port_number, positive_seconds, require_root
from ctfix.errors import ExitStatus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = """\
Reproduce the wrong-source bug and its fix in throwaway network namespaces.

Builds a host namespace with a bridge (192.0.2.1, docker0's role) and an uplink
(198.51.100.13), a container namespace (192.0.2.3) behind the bridge, and Docker's
MASQUERADE rule. A wildcard UDP server that replies with sendto() leaves a client
that addresses the uplink without an answer: the lab shows the two conntrack
entries and the client's ICMP port unreachable that prove why. Then the IP_PKTINFO
reference server answers on every address. Everything is removed at the end.

--scenario stale-nat tells the other story: a one-way sender (syslog-like, a fixed
source port) forwarded by DNAT to backend A, the rule moved to backend B and A's
address removed: the black hole, ctfix's finding, `ctfix fix --method flush-stale`
and the recovery.

exit status: 0 bug reproduced and fix confirmed, 1 otherwise, 2 errors."""
    parser.epilog = """\
examples:
  ctfix lab                 IPv4 story, about 3 seconds
  ctfix lab --ipv6          IPv4 and IPv6
  ctfix lab --keep          leave the namespaces up to experiment in them
  ctfix lab --scenario stale-nat   a sender pinned to a backend that moved, and the flush"""
    parser.add_argument("--ipv6", action="store_true", help="also run the story over IPv6")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the namespaces up afterwards and print how to enter and remove them",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=SCENARIOS[0],
        help="wrong-source (default): a server that answers from the wrong address; "
        "stale-nat: clients pinned by conntrack to a DNAT backend that moved",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=None,
        help="UDP port of the lab's service (default: 56789; stale-nat: 5140)",
    )
    parser.add_argument(
        "--netfilter",
        choices=("nft", "iptables-legacy"),
        default="nft",
        help="where to install Docker's MASQUERADE rule (default: nft)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=1.0,
        metavar="S",
        help="how long a client waits for a reply (default: 1)",
    )


#: the stories `--scenario` offers, the default first
SCENARIOS = ("wrong-source", "stale-nat")


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    require_root("ctfix lab (it creates network namespaces)", "CAP_SYS_ADMIN")
    from ctfix.lab import topology as t
    from ctfix.lab.scenario import run_story
    from ctfix.render.lab import LabPrinter, stale_nat_why

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    printer = LabPrinter(out)
    stale = getattr(args, "scenario", SCENARIOS[0]) == "stale-nat"
    if stale and args.ipv6:
        from ctfix.errors import CtfixError

        raise CtfixError("--scenario stale-nat runs over IPv4 only", "drop --ipv6")
    port = args.port if args.port is not None else (5140 if stale else 56789)
    topo = t.Topology(t.new_run_id(), ipv6=args.ipv6, netfilter=args.netfilter)
    try:
        if stale:
            from ctfix.lab import stale_nat

            printer.stale_nat_topology(topo, port)
            topo.build()
            story = stale_nat.run_story(topo, port, printer.report, timeout=args.timeout)
            printer.verdict(story, why=stale_nat_why())
        else:
            printer.topology(topo, port)
            topo.build()
            story = run_story(topo, port, printer.report, timeout=args.timeout)
            printer.verdict(story)
        if args.keep:
            from ctfix.commands.common import ctfix_command

            printer.keep(topo, port, ctfix_command(), "stale-nat" if stale else "wrong-source")
        return ExitStatus.OK if story.reproduced and story.fixed else ExitStatus.PROBLEM
    except (_Stop, KeyboardInterrupt) as stop:
        what = str(stop) or "SIGINT"
        print(f"ctfix lab: stopped by {what}; removing the lab", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    finally:
        if args.keep:
            for proc in list(topo.processes):
                topo.stop(proc)
        else:
            topo.destroy()
