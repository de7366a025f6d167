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
from ctfix.errors import CtfixError, ExitStatus
from ctfix.lab.registry import DEFAULT, IPV4_ONLY, SCENARIOS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = """\
Reproduce the wrong-source bug and its fix in throwaway network namespaces.

Builds a host namespace with a bridge (192.0.2.1, docker0's role) and an uplink
(198.51.100.13), a container namespace (192.0.2.3) behind the bridge, and Docker's
MASQUERADE rule. A wildcard UDP server that replies with sendto() leaves a client
that addresses the uplink without an answer: the lab shows the two conntrack
entries and the client's ICMP port unreachable that prove why. Then the IP_PKTINFO
reference server answers on every address. Everything is removed at the end.

Other scenarios (--scenario) tell other stories on the same topology.

exit status: 0 bug reproduced and fix confirmed, 1 otherwise, 2 errors."""
    parser.epilog = """\
examples:
  ctfix lab                 IPv4 story, about 3 seconds
  ctfix lab --ipv6          IPv4 and IPv6
  ctfix lab --keep          leave the namespaces up to experiment in them
  ctfix lab --scenario clusterip --ipv6
                            a Kubernetes ClusterIP DNAT'd to a hostNetwork server:
                            the failure, explain's finding, the snat-zone repair, revert

scenarios:
""" + "\n".join(f"  {name:13} {summary}" for name, (_m, summary) in SCENARIOS.items())
    parser.add_argument(
        "--scenario",
        choices=tuple(SCENARIOS),
        default=DEFAULT,
        help=f"which story to tell (default: {DEFAULT})",
    )
    parser.add_argument(
        "--ipv6",
        action="store_true",
        help="also run the story over IPv6 (every scenario but "
        + ", ".join(sorted(IPV4_ONLY))
        + ")",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the namespaces up afterwards and print how to enter and remove them",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=56789,
        help="UDP port of the lab's service (default: 56789)",
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


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    if args.ipv6 and args.scenario in IPV4_ONLY:
        raise CtfixError(f"the {args.scenario} lab runs over IPv4 only", "drop --ipv6")
    require_root("ctfix lab (it creates network namespaces)", "CAP_SYS_ADMIN")
    from ctfix.lab import registry
    from ctfix.lab import topology as t
    from ctfix.render.lab import LabPrinter

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    printer = LabPrinter(out)
    topo = t.Topology(t.new_run_id(), ipv6=args.ipv6, netfilter=args.netfilter)
    try:
        printer.topology(topo, args.port, args.scenario)
        topo.build()
        story = registry.run(args.scenario, topo, args.port, printer.report, args.timeout)
        printer.verdict(story, args.scenario)
        if args.keep:
            from ctfix.commands.common import ctfix_command

            printer.keep(topo, args.port, ctfix_command(), args.scenario)
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
