"""`ctfix watch`: report wrong-source UDP replies, unanswered UDP requests and stale
NAT entries live, from conntrack events, in one namespace or (`--all-netns`) in every
namespace of the host.

This module is the command: its arguments, and the composition. One namespace
(`--netns`, entered for the whole process) or every one (ctfix/commands/watch_all.py)
is watched by NamespaceWatch (ctfix/commands/watch_ns.py: the sockets, detectors,
start-up dump, resyncs and the hot drain loop), driven by one selector loop
(ctfix/commands/watch_loop.py: ticks, --duration, the status line, stop signals),
and what they find goes through the filters to lines, records and metrics
(ctfix/commands/watch_report.py). `--track`'s table is ctfix.platform.track's.

Know before changing: everything that changes the namespace (the --track table) is
undone in a `finally`, and every catchable stop signal (SIGTERM, SIGHUP, SIGQUIT, ...)
is turned into an exception so that the `finally` runs: a name is recorded for
removal *before* the change is made, and a stop at any point (even during start-up)
ends normally, with a summary.
"""

from __future__ import annotations

import argparse
import functools
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ctfix.commands.common import (
    add_netns_argument,
    add_rules_argument,
    enter_netns,
    netns_choice,
    port_number,
    positive_seconds,
    require_root,
)
from ctfix.commands.watch_events import test_signal
from ctfix.commands.watch_loop import STOP_SIGNALS, Stop, on_signal, set_stop_signals
from ctfix.commands.watch_report import exit_status
from ctfix.errors import CtfixError

if TYPE_CHECKING:
    from ctfix.core.model import ContainerRef
    from ctfix.core.rules import KnowledgeBase
    from ctfix.core.watch_filter import Network, Selection
    from ctfix.render.status import Console
    from ctfix.render.watch import WatchRenderer

_FAMILIES: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
_FAMILY_KEYS: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


DESCRIPTION = """\
Report UDP replies that leave from another address (or port) than the one the
client sent to, and UDP requests that ended without any reply, live, from the
kernel's conntrack events, until Ctrl-C, SIGTERM or --duration. A finding prints
once and then only updates its count; at exit every live finding is listed with its
final counts:

  service        the address:port the client sent to
  actual source  where the reply came from; expected: what the client waits for
  local          both addresses belong to this namespace (a multi-homed server)
  confirmed      the client's ICMP port unreachable for that reply was seen
  unanswered     requests that got no reply, per service and reason: no-socket
                 (nothing bound), no-reply (bound, never answered), wrong-source,
                 stale-nat (its DNAT target was stale); one-way services (syslog,
                 StatsD: the knowledge base) are counted apart, listed at exit
                 only, and are no problem

History is not news: wrong-source replies already in the conntrack table when
watch starts print once, under their own heading ("existing"), with the kernel's
times when net.netfilter.nf_conntrack_timestamp is on (else "before <start>"); they
are not counted as findings. A program that answers from another port by design
(TFTP; the knowledge base's replies_from_other_port, --rules adds entries) is
compared by address only.

It also reports stale NAT entries ("STALE NAT", JSON kind "stale-nat"): clients that
conntrack still sends to a DNAT target the rules no longer name, checked at start
(printed with "existing": they are there now, but predate the watch) and within
seconds of every change of the NAT rules (docs/runbooks/udp-stale-nat.md).

Filters, as with conntrack -E and tcpdump: --port, --client and --service select the
findings of every kind (each repeatable: values of one option are alternatives,
options narrow each other); the summary says how many wrong-source and stale-NAT
findings they left out (unanswered requests left out are not counted there).

With --all-netns every network namespace of the host is watched at once (the
host's, each container's, each `ip netns` one), followed as they appear and
disappear (one that disappears is closed with a note; its findings stay in the
report); text lines name their namespace, JSON records carry netns and
netns_container, and there is a summary per namespace and one overall.

On a terminal a status line on stderr shows that watch is alive (events/s, flows,
findings, lost; namespaces), erased before any other line and at exit; never in a
pipe, with --json, or with TERM=dumb.

exit status: 0, or 1 when --duration ended with live findings (replies seen and
requests unanswered during the watch, in any namespace watched; existing ones and
one-way services' flows never count); 2 on errors (no CAP_NET_ADMIN, no such
namespace, conntrack unavailable, a bad filter)."""

EPILOG = """\
examples:
  ctfix watch                                    this namespace, until Ctrl-C
  ctfix watch --netns web --json --duration 60   JSON lines for a minute
  ctfix watch --track --metrics localhost:9464   track every family, metrics
  ctfix watch --port domain --client 10.0.0.0/8  DNS, clients in 10.0.0.0/8
  ctfix watch --all-netns --json                 the host and every container"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ctfix.commands.watch_all import MAX_NETNS

    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    add_netns_argument(parser)
    parser.add_argument(
        "--all-netns",
        action="store_true",
        help="every network namespace of the host at once (the host's, each container's, "
        "each `ip netns` one), followed as they appear and disappear (needs "
        "CAP_SYS_ADMIN to enter them); not with --netns nor --track",
    )
    parser.add_argument(
        "--max-netns",
        type=_count,
        metavar="N",
        default=MAX_NETNS,
        help=f"with --all-netns, watch at most N namespaces (default {MAX_NETNS}); the "
        "rest are named once and counted in the summary",
    )
    parser.add_argument(
        "--duration",
        type=positive_seconds,
        metavar="S",
        help="stop after S seconds (default: run until Ctrl-C or SIGTERM)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON lines (findings and a summary)"
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics there (e.g. localhost:9464); off by default",
    )
    parser.add_argument(
        "--track",
        action="store_true",
        help="switch conntrack on for the families the namespace does not track yet "
        "(a small nftables table, removed on exit)",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        action="append",
        default=[],
        metavar="P",
        help="only findings about services on port P (a number or a UDP service name "
        "such as domain); repeatable",
    )
    parser.add_argument(
        "--client",
        type=_client,
        action="append",
        default=[],
        metavar="CIDR",
        help="only findings about clients in CIDR (an address alone: that client); "
        "repeatable",
    )
    parser.add_argument(
        "--service",
        type=_service,
        action="append",
        default=[],
        metavar="ADDR[:PORT]",
        help="only findings about this service address (and port; [IPv6]:PORT); "
        "repeatable",
    )
    add_rules_argument(parser)


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def _client(text: str) -> Network:
    from ctfix.core.watch_filter import parse_client

    try:
        return parse_client(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _service(text: str) -> tuple[str, int | None]:
    from ctfix.core.watch_filter import parse_service

    try:
        return parse_service(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def selection_of(args: argparse.Namespace) -> Selection:
    from ctfix.core.watch_filter import selection

    return selection(args.port, args.client, args.service)


def run(args: argparse.Namespace) -> int:
    from ctfix.platform import rules_files
    from ctfix.render.status import Console, status_allowed

    every = netns_choice(args)
    if every and args.track:
        raise CtfixError(
            "--track with --all-netns would load a table into every namespace of the host, "
            "containers' included",
            "watch the namespaces that need it one by one: ctfix watch --netns NAME --track",
        )
    # --rules first, so that a broken file fails before anything is changed; the
    # built-in knowledge base alone is loaded when first needed (a reply from another
    # port), which most watches never see.
    kb: KnowledgeBase | Callable[[], KnowledgeBase]
    if args.rules:
        kb = rules_files.load(args.rules, builtin=True)
    else:
        # Once for every detector and namespace that asks (--all-netns has many).
        kb = functools.cache(functools.partial(rules_files.load, None, builtin=True))
    if args.metrics is not None:  # `--metrics ''` is a mistake, not "off"
        from ctfix.platform.metrics import parse_listen

        parse_listen(args.metrics)
    require_root("watching conntrack events")
    if every:
        require_root("ctfix watch --all-netns (it enters every namespace)", "CAP_SYS_ADMIN")
    console = Console(sys.stderr, status=status_allowed(sys.stderr, json_lines=args.json))
    if args.metrics is not None:
        # Bound before --netns is entered: the metrics listen where ctfix was started.
        from ctfix.platform.metrics import MetricsListener

        args.metrics_listener = MetricsListener(args.metrics)
        if not args.metrics_listener.loopback:
            console.warn(
                f"--metrics {args.metrics} is reachable from other hosts (no "
                "authentication); prefer a loopback address such as localhost"
            )
    if every:
        from ctfix.commands.watch_all import watch_all

        return watch_all(args, kb, selection_of(args), console)
    label = enter_netns(args.netns)

    from ctfix.platform import conntrack
    from ctfix.render.watch import WatchRenderer

    renderer = WatchRenderer(
        sys.stdout,
        json_lines=args.json,
        netns=label,
        netns_container=_netns_container(),
        before_write=console.clear,
    )
    conntrack.available()
    tables: list[str] = []
    tracking: dict[str, bool | None] = {}
    previous = {int(sig): signal.getsignal(sig) or signal.SIG_DFL for sig in STOP_SIGNALS}
    try:
        set_stop_signals(on_signal)
        tracking = _tracking(args.track, tables, console)
        return _watch(args, label, renderer, kb, tracking, console)
    except Stop:
        # Stopped before the watch loop began: a normal end, with an empty summary
        # (scripts always get one).
        set_stop_signals(signal.SIG_IGN)
        renderer.summary(_empty_summary(tracking, label, renderer))
        return 0
    finally:
        set_stop_signals(signal.SIG_IGN)
        console.close()
        try:
            from ctfix.platform import track

            for table in tables:
                track.remove(table, console.warn)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _netns_container() -> ContainerRef | None:
    """The container whose namespace this is (None: the host's, or no container's);
    the engines' clients are loaded only when it is not pid 1's namespace."""
    from ctfix.platform.procfs import stat_key

    here = stat_key("/proc/thread-self/ns/net")
    if here is None or here == stat_key("/proc/1/ns/net"):
        return None
    from ctfix.platform import containers

    return containers.resolver().for_netns("/proc/thread-self/ns/net")


def _tracking(track_asked: bool, tables: list[str], console: Console) -> dict[str, bool | None]:
    """Whether each family is tracked here; with --track, load the table for those that
    are not (its name in `tables` before it is loaded). Warns about the rest."""
    from ctfix.commands.watch_ns import probe_tracking
    from ctfix.platform import conntrack, track

    borrowed = track.leftovers(console.note, console.warn)
    probed = probe_tracking()
    tracking = {_FAMILY_KEYS[fam]: on for fam, on in probed.items()}
    untracked = [fam for fam, on in probed.items() if on is not True]
    if track_asked:
        # Tracked maybe only thanks to another watch's table: load ours too.
        untracked += [fam for fam in borrowed if fam not in untracked]
    else:
        for fam, pid in borrowed.items():
            if fam not in untracked:
                console.warn(
                    f"{_FAMILIES[fam]} may be tracked here only thanks to the --track "
                    f"table of ctfix watch pid {pid}, removed when it exits; add --track"
                )
    if untracked and track_asked:
        # Named before it is loaded: a signal just after libnftables commits must
        # still find it in the `finally`.
        table = track.table_name(untracked)
        tables.append(table)
        try:
            track.load(table)
        except CtfixError:
            tables.remove(table)  # one nft transaction: nothing was loaded
            raise
        test_signal("track-loaded")
        console.note(
            f"--track: loaded nftables table {table.partition(':')[0]} so that "
            f"{' and '.join(_FAMILIES[f] for f in untracked)} "
            f"{'are' if len(untracked) > 1 else 'is'} tracked; it is removed on exit"
        )
        for fam in untracked:
            now_on = conntrack.probe_tracking(fam)
            tracking[_FAMILY_KEYS[fam]] = now_on
            if now_on is False:
                console.warn(f"{_FAMILIES[fam]} is still not tracked after --track")
    elif untracked:
        for fam in untracked:
            console.warn(
                f"{_FAMILIES[fam]} is not tracked in this namespace (no loaded rule "
                "needs conntrack): its replies are invisible; add --track"
            )
    return tracking


def _empty_summary(
    tracking: dict[str, bool | None], label: str, renderer: WatchRenderer
) -> dict[str, Any]:
    from ctfix.commands.watch_ns import both
    from ctfix.render.watch import summary_record

    return summary_record(
        events=0,
        new_flows=0,
        lost=0,
        resyncs=0,
        findings=0,
        tracking=both(tracking),
        netns=label,
        netns_container=renderer.netns_container,
    )


def _watch(
    args: argparse.Namespace,
    label: str,
    renderer: WatchRenderer,
    kb: KnowledgeBase | Callable[[], KnowledgeBase],
    tracking: dict[str, bool | None],
    console: Console,
) -> int:
    """Watch the namespace this process is in until --duration or a signal."""
    from ctfix.commands.watch_loop import run_loop
    from ctfix.commands.watch_ns import NamespaceWatch
    from ctfix.commands.watch_report import Reporter, client_containers

    metrics = None
    sel = selectors.DefaultSelector()
    stopped_by_duration = False
    if args.metrics:
        from ctfix.platform.metrics import WatchMetrics

        metrics = WatchMetrics(args.metrics_listener, label)
        where = "" if label == "current" else " (where ctfix started, not in --netns)"
        console.note(f"Prometheus metrics on http://{args.metrics}/metrics{where}")
    reporter = Reporter(renderer, metrics, selection_of(args), client_containers())
    watcher = NamespaceWatch(
        label,
        renderer=renderer,
        reporter=reporter,
        kb=kb,
        metrics=metrics,
        warn=console.warn,
        netns_container=renderer.netns_container,
    )
    watcher.tracking = tracking
    try:
        watcher.start(sel)
        deadline = time.monotonic() + args.duration if args.duration else None
        # Subscribed, addresses known, table dumped: from here no reply is missed.
        # (Tests wait for this line instead of sleeping.)
        where = "this namespace" if label == "current" else f"namespace {label}"
        console.note(f"watching {where} for wrong-source UDP replies and unanswered requests")
        stopped_by_duration = run_loop(sel, [watcher], console=console, deadline=deadline)
    except (Stop, KeyboardInterrupt):
        pass
    finally:
        set_stop_signals(signal.SIG_IGN)
        console.close()
        watcher.close()
        for closer in (metrics, sel):
            if closer is not None:
                closer.close()
    live, record = watcher.finish()
    renderer.summary(record)
    return exit_status(live, stopped_by_duration)


__all__ = ["add_arguments", "exit_status", "run"]


