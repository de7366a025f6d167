"""`ctfix watch`: report wrong-source UDP replies and unanswered UDP requests live,
from conntrack events.

The loop: subscribe to conntrack NEW/UPDATE events (UDP only, filtered in the
kernel) and DESTROY events (of entries that never saw a reply: the unanswered
detector's, ctfix/commands/watch_unanswered.py), learn the namespace's addresses,
open raw ICMP sockets, dump the table once,
then feed every event to the detectors (`ctfix.core.detectors`) and print what it finds. When
the kernel drops events (ENOBUFS) the loss is counted (the kernel's per-socket drop
count), the state is rebuilt from a complete dump 0.2 s later (at most once a
second), a warning line says so, and watching goes on; the summary and the metrics
carry `lost` and `resyncs`. CTFIX_WATCH_RCVBUF (test-only, not in --help) shrinks
the event buffer so that tests/netns/test_watch_overflow.py can force a real loss.

Know before changing: the drain loop in `_drain` is the hot path (>100k events/s);
keep attribute lookups out of it. Everything that changes the namespace (the
--track table) is undone in a `finally`, and every catchable stop signal (SIGTERM,
SIGHUP, SIGQUIT, ...) is turned into an exception
so that the `finally` runs: a name is recorded for removal *before* the change is
made, and a stop at any point (even during start-up) ends normally, with a summary.
CTFIX_WATCH_TEST_SIGNAL_AT (test-only) sends watch a SIGTERM at a named start-up
step so that tests can check that.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol, cast

from ctfix.commands.common import (
    add_netns_argument,
    add_rules_argument,
    enter_netns,
    positive_seconds,
    require_root,
)
from ctfix.errors import CtfixError

if TYPE_CHECKING:
    from ctfix.core.decode import CtEvent
    from ctfix.core.detectors import Change, Detector
    from ctfix.core.detectors.stale_nat import StaleNatFinding
    from ctfix.core.detectors.unanswered import Stats as UnansweredStats
    from ctfix.core.detectors.unanswered import UnansweredFinding
    from ctfix.core.detectors.wrong_source import WrongSourceDetector, WrongSourceFinding
    from ctfix.core.rules import KnowledgeBase
    from ctfix.platform.conntrack import EventSocket
    from ctfix.platform.metrics import WatchMetrics
    from ctfix.render.watch import WatchRenderer

    #: a detector's finding and what the event (or dump) changed about it
    Found = tuple[WrongSourceFinding | StaleNatFinding | UnansweredFinding, Change]
    Feed = Callable[[CtEvent, float], Found | None]
    #: one feed per event kind, indexed by it (ctfix.core.detectors.feeds_by_kind)
    Feeds = tuple[Feed, ...]
    Report = Callable[[Found | None], None]

_FAMILIES: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
_FAMILY_KEYS: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_NFT_FAMILY: dict[int, str] = {socket.AF_INET: "ip", socket.AF_INET6: "ip6"}


DESCRIPTION = """\
Report UDP replies that leave from another address (or port) than the one the
client sent to, and UDP requests that ended without any reply, live, from the
kernel's conntrack events, until Ctrl-C, SIGTERM or --duration. A finding prints
once and then only updates its count; at exit every live finding is listed with its
final counts:

  service       the address:port the client sent to
  actual source where the reply came from; expected: what the client waits for
  local         both addresses belong to this namespace (a multi-homed server)
  confirmed     the client's ICMP port unreachable for that reply was seen
  unanswered    requests that got no reply, per service and reason: no-socket
                (nothing bound), no-reply (bound, never answered), wrong-source,
                stale-nat (its DNAT target was stale); one-way services (syslog,
                StatsD: the knowledge base) are counted apart, listed at exit only,
                and are no problem

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

exit status: 0, or 1 when --duration ended with live findings (replies seen and
requests unanswered during the watch; existing ones and one-way services' flows
never count); 2 on errors (no CAP_NET_ADMIN, no such
namespace, conntrack unavailable)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = (
        "examples:\n"
        "  ctfix watch                                  watch this namespace until Ctrl-C\n"
        "  ctfix watch --netns web --json --duration 60  JSON lines for a minute\n"
        "  ctfix watch --track --metrics localhost:9464  track every family, serve metrics\n"
    )
    add_netns_argument(parser)
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
    add_rules_argument(parser)


class Closable(Protocol):
    def close(self) -> None: ...


class _Stop(Exception):
    """A signal arrived: leave the loop, clean up, print the summary."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise _Stop()


#: Every signal whose default action ends the process and that can be caught: each
#: one must run the clean-up (a SIGHUP from a closed terminal left the --track table).
_STOP_SIGNALS = tuple(
    sig
    for sig in (
        *(getattr(signal, name, None) for name in (
            "SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM",
            "SIGVTALRM", "SIGPROF", "SIGXCPU", "SIGXFSZ", "SIGIO", "SIGPWR", "SIGSTKFLT",
        )),
        *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
    )
    if sig is not None
)


def _set_stop_signals(handler: Any) -> dict[int, Any]:
    """Install handler for every stop signal; the previous handlers."""
    return {int(sig): signal.signal(sig, handler) for sig in _STOP_SIGNALS}


def _note(text: str) -> None:
    print(f"ctfix watch: {text}", file=sys.stderr, flush=True)


def _warn(text: str) -> None:
    print(f"ctfix watch: warning: {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ctfix.platform import rules_files

    # --rules first, so that a broken file fails before anything is changed; the
    # built-in knowledge base alone is loaded when first needed (a reply from another
    # port), which most watches never see.
    kb: KnowledgeBase | Callable[[], KnowledgeBase]
    if args.rules:
        kb = rules_files.load(args.rules, builtin=True)
    else:
        kb = functools.partial(rules_files.load, None, builtin=True)
    if args.metrics is not None:  # `--metrics ''` is a mistake, not "off"
        from ctfix.platform.metrics import parse_listen

        parse_listen(args.metrics)
    require_root("watching conntrack events")
    if args.metrics is not None:
        # Bound before --netns is entered: the metrics listen where ctfix was started.
        from ctfix.platform.metrics import MetricsListener

        args.metrics_listener = MetricsListener(args.metrics)
        if not args.metrics_listener.loopback:
            _warn(
                f"--metrics {args.metrics} is reachable from other hosts (no "
                "authentication); prefer a loopback address such as localhost"
            )
    label = enter_netns(args.netns)

    from ctfix.platform import conntrack
    from ctfix.render.watch import WatchRenderer

    renderer = WatchRenderer(sys.stdout, json_lines=args.json, netns=label)
    conntrack.available()
    table: str | None = None
    tracking: dict[str, bool | None] = {}
    previous = {int(sig): signal.getsignal(sig) or signal.SIG_DFL for sig in _STOP_SIGNALS}
    try:
        _set_stop_signals(_on_signal)
        borrowed = _leftover_tables()
        probed = {fam: conntrack.probe_tracking(fam) for fam in _FAMILIES}
        tracking = {_FAMILY_KEYS[fam]: on for fam, on in probed.items()}
        untracked = [fam for fam, on in probed.items() if on is not True]
        if args.track:
            # Tracked maybe only thanks to another watch's table: load ours too.
            untracked += [fam for fam in borrowed if fam not in untracked]
        else:
            for fam, pid in borrowed.items():
                if fam not in untracked:
                    _warn(
                        f"{_FAMILIES[fam]} may be tracked here only thanks to the --track "
                        f"table of ctfix watch pid {pid}, removed when it exits; add --track"
                    )
        if untracked and args.track:
            # Named before it is loaded: a signal just after libnftables commits must
            # still find it in the `finally`.
            table = _track_table(untracked)
            try:
                _load_track_table(table)
            except CtfixError:
                table = None  # one nft transaction: nothing was loaded
                raise
            _note(
                f"--track: loaded nftables table {table.partition(':')[0]} so that "
                f"{' and '.join(_FAMILIES[f] for f in untracked)} "
                f"{'are' if len(untracked) > 1 else 'is'} tracked; it is removed on exit"
            )
            for fam in untracked:
                now_on = conntrack.probe_tracking(fam)
                tracking[_FAMILY_KEYS[fam]] = now_on
                if now_on is False:
                    _warn(f"{_FAMILIES[fam]} is still not tracked after --track")
        elif untracked:
            for fam in untracked:
                _warn(
                    f"{_FAMILIES[fam]} is not tracked in this namespace (no loaded rule "
                    "needs conntrack): its replies are invisible; add --track"
                )
        return _watch(args, label, renderer, kb, tracking)
    except _Stop:
        # Stopped before the watch loop began: a normal end, with an empty summary
        # (scripts always get one).
        _set_stop_signals(signal.SIG_IGN)
        renderer.summary(_empty_summary(tracking))
        return 0
    finally:
        _set_stop_signals(signal.SIG_IGN)
        try:
            if table is not None:
                _remove_track_table(table)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _leftover_tables() -> dict[int, int]:
    """Remove the --track tables of watches that no longer run (a `kill -9`), with a
    note, before anything looks at tracking: such a table still switches conntrack on,
    and this watch would go blind once it is gone. Returns {family: pid} of tables of
    other watches that may still run, which are left alone."""
    from ctfix.platform import watchtables

    nft_families = {name: fam for fam, name in _NFT_FAMILY.items()}
    others: dict[int, int] = {}
    try:
        found = watchtables.tables()
    except CtfixError:
        return others  # no nftables here: nothing can have been left
    for table in found:
        if table.owner == "dead":
            try:
                watchtables.remove(table.family, table.name)
            except CtfixError as err:
                _warn(f"could not remove {table.family} {table.name}: {err.one_line()}")
                continue
            _note(
                f"removed nftables table {table.family} {table.name}, left by ctfix watch "
                f"pid {table.pid}, which no longer runs"
            )
        elif table.owner in ("alive", "unknown") and table.family in nft_families:
            others[nft_families[table.family]] = table.pid
    return others


def _empty_summary(tracking: dict[str, bool | None]) -> dict[str, Any]:
    from ctfix.render.watch import summary_record

    return summary_record(
        events=0, new_flows=0, lost=0, resyncs=0, findings=0, tracking=_both(tracking)
    )


def _both(tracking: dict[str, bool | None]) -> dict[str, bool | None]:
    """Both families, in order; None where watch did not get to probe one."""
    return {family: tracking.get(family) for family in ("ipv4", "ipv6")}


#: Test-only, not in --help: a start-up step ("track-loaded", "subscribing") at which
#: watch sends itself SIGTERM, to check that a stop there ends normally and cleanly.
SIGNAL_AT_ENV = "CTFIX_WATCH_TEST_SIGNAL_AT"


def _test_signal(step: str) -> None:
    if os.environ.get(SIGNAL_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGTERM)


def _track_table(families: list[int]) -> str:
    """`ctfix_watch_<pid>_<start>_<pidns>:<nft families>`: what `_load_track_table`
    loads (ctfix/platform/watchtables.py says why the name holds all that)."""
    from ctfix.platform import watchtables

    return f"{watchtables.own_name()}:" + ",".join(_NFT_FAMILY[f] for f in families)


def _load_track_table(table: str) -> None:
    """Load `table <fam> ctfix_watch_<pid>` with a `ct state new` rule per family."""
    from ctfix.platform import nft

    name, _, families = table.partition(":")
    lines = []
    for nf in families.split(","):
        lines += [
            f"add table {nf} {name}",
            f"add chain {nf} {name} pre {{ type filter hook prerouting priority filter; "
            "policy accept; }",
            f"add chain {nf} {name} out {{ type filter hook output priority filter; "
            "policy accept; }",
            # Any rule that needs conntrack makes the kernel track the family here.
            f"add rule {nf} {name} pre ct state new counter",
            f"add rule {nf} {name} out ct state new counter",
        ]
    nft.run_text("\n".join(lines), "loading the --track table")
    _test_signal("track-loaded")


def _remove_track_table(table: str) -> None:
    from ctfix.platform import nft

    name, _, families = table.partition(":")
    commands = "\n".join(f"delete table {nf} {name}" for nf in families.split(","))
    try:
        nft.run_text(commands, "removing the --track table")
    except CtfixError as err:
        _warn(f"could not remove nftables table {name}: {err.one_line()}")


def _report(renderer: WatchRenderer, metrics: WatchMetrics | None, found: Found | None) -> None:
    """Show a finding when it is new or newly confirmed; count every reply in metrics.

    An unanswered finding prints when it first appears, unless it is a one-way
    service's (no problem: it is listed at exit only)."""
    if found is None:
        return
    finding, change = found
    if finding.kind == "unanswered":
        if change == change.NEW and finding.problem:
            renderer.finding(finding)
        return
    if change:
        # CONFIRMED: the ICMP came before the reply's event; the finding is older.
        renderer.finding(finding, update=change != change.NEW)
    # Replies counted as they happen: history found at start-up is not a new reply
    # (a restart of watch must not look like a burst to an alert rule).
    if metrics is not None and finding.kind == "wrong-source" and not finding.existing:
        metrics.finding(finding)


def _watch(
    args: argparse.Namespace,
    label: str,
    renderer: WatchRenderer,
    kb: KnowledgeBase | Callable[[], KnowledgeBase],
    tracking: dict[str, bool | None],
) -> int:
    from ctfix.commands.watch_nat import StaleNatWatch
    from ctfix.commands.watch_unanswered import UnansweredWatch
    from ctfix.core import decode
    from ctfix.core.detectors import feeds_by_kind
    from ctfix.core.detectors.stale_nat import StaleNatDetector
    from ctfix.core.detectors.wrong_source import WrongSourceDetector
    from ctfix.platform import conntrack
    from ctfix.platform.addresses import LocalAddresses
    from ctfix.platform.icmp import IcmpWatch
    from ctfix.platform.programs import OtherPortPrograms
    from ctfix.render.watch import summary_record

    # One detector per problem kind, all fed the same events; wrong-source also gets
    # the namespace's addresses and client networks, the clients' ICMP, and which
    # programs answer from other ports by design (asked only for such replies).
    detector = WrongSourceDetector(udp_timeout=_udp_timeout(), other_port=OtherPortPrograms(kb))
    # stale-nat learns from dumps only (one_feed leaves it out of the event loop); the
    # StaleNatWatch below re-checks it when the NAT rules change.
    stale = StaleNatDetector(udp_timeout=detector.udp_timeout, stream_timeout=_udp_stream_timeout())
    # and the unanswered detector (last: it asks the other two), once built
    detectors: tuple[
        Detector[WrongSourceFinding | StaleNatFinding | UnansweredFinding], ...
    ] = (detector, stale)
    counted: UnansweredStats | None = None
    rcvbuf = _rcvbuf(conntrack.DEFAULT_RCVBUF)
    events: EventSocket | None = None
    closers: list[Closable] = []
    metrics: WatchMetrics | None = None
    lost = resyncs = overflows = 0
    stopped_by_duration = False
    started: float | None = None  # when watch subscribed: None if it never did
    try:
        _test_signal("subscribing")
        groups = (
            conntrack.NFNLGRP_CONNTRACK_NEW,
            conntrack.NFNLGRP_CONNTRACK_UPDATE,
            conntrack.NFNLGRP_CONNTRACK_DESTROY,  # of unreplied entries only (kernel filter)
        )
        events = conntrack.EventSocket(groups=groups, rcvbuf=rcvbuf)
        closers.append(events)
        # Subscribed: from now on a reply is news; what the dump below finds is history.
        started = renderer.started = detector.since = time.time()
        addresses = LocalAddresses()
        closers.append(addresses)
        detector.local_addresses = addresses.addresses
        detector.networks = addresses.networks
        sel = selectors.DefaultSelector()
        closers.append(sel)
        unanswered = UnansweredWatch(detector, stale, kb, sel, _warn)
        closers.append(unanswered)
        detectors = (detector, stale, unanswered.detector)
        counted = unanswered.detector.stats
        icmp = IcmpWatch()
        closers.append(icmp)
        if args.metrics:
            from ctfix.platform.metrics import WatchMetrics

            metrics = WatchMetrics(args.metrics_listener, label)
            closers.append(metrics)
            where = "" if label == "current" else " (where ctfix started, not in --netns)"
            _note(f"Prometheus metrics on http://{args.metrics}/metrics{where}")

        def report(found: Found | None) -> None:
            if found is not None and found[0].kind == "unanswered":
                unanswered.found(found[0])
            _report(renderer, metrics, found)

        feed: Feeds = feeds_by_kind(detectors, report)
        nat = StaleNatWatch(stale, report, addresses.addresses, _warn)
        closers.append(nat)

        def resync(
            events: EventSocket,
            history: list[WrongSourceFinding | UnansweredFinding] | None = None,
        ) -> int:
            """Feed what is queued, then rebuild from a dump; the number of entries.
            `history`: collect the existing findings there instead of reporting them."""
            nonlocal overflows
            overflows += _drain_quietly(events, feed, decode.decode_event, report)
            entries = list(conntrack.dump(proto=17))
            now = time.time()
            for each in detectors:
                for found in each.examine(entries, now, complete=True):
                    # Stale NAT entries there at start are a black hole now: reported at
                    # once (marked existing), not filed as history.
                    finding = found[0]
                    if history is not None and finding.kind != "stale-nat" and finding.existing:
                        history.append(finding)
                    else:
                        report(found)
            return len(entries)

        history: list[WrongSourceFinding | UnansweredFinding] = []
        resync(events, history)
        detector.stats.recovered = 0
        # Printed once, under their own heading; later dumps (after lost events) only
        # show what happened since the start-up dump: news.
        keys = dict.fromkeys(f.key for f in history if f.key in detector.history)
        silent = unanswered.detector.findings
        quiet = [silent[k] for k in dict.fromkeys(f.key for f in history) if k in silent]
        renderer.existing([*(detector.history[key] for key in keys), *quiet])
        for finding in quiet:  # an outage already in the table: confirm what follows
            unanswered.found(finding)
        detector.dumps_are_history = False
        unanswered.detector.dumps_are_history = False

        sel.register(events.sock, selectors.EVENT_READ, "ct")
        sel.register(addresses.sock, selectors.EVENT_READ, "addr")
        sel.register(nat.sock, selectors.EVENT_READ, "nat")
        for sock in icmp.sockets:
            sel.register(sock, selectors.EVENT_READ, "icmp")
        deadline = time.monotonic() + args.duration if args.duration else None
        next_tick = time.monotonic() + 1.0
        resync_due: float | None = None
        last_resync = last_warning = -math.inf
        # Subscribed, addresses known, table dumped: from here no reply is missed.
        # (Tests wait for this line instead of sleeping.)
        where = "this namespace" if label == "current" else f"namespace {label}"
        _note(f"watching {where} for wrong-source UDP replies and unanswered requests")
        while True:
            mono = time.monotonic()
            if deadline is not None and mono >= deadline and resync_due is None:
                stopped_by_duration = True
                break
            wait = min(next_tick, deadline or next_tick) - mono
            if resync_due is not None:
                wait = min(wait, max(0.0, resync_due - mono))
            wait = min(wait, nat.wait(mono))
            for key, _mask in sel.select(max(0.0, wait)):
                if key.data == "ct":
                    try:
                        _drain(events, feed, decode.decode_event, report)
                    except conntrack.Overflow:
                        overflows += 1
                        resync_due = _resync_due(resync_due, time.monotonic(), last_resync)
                elif key.data == "icmp":
                    now = time.time()
                    # The key holds what was registered as "icmp": one of icmp.sockets.
                    for rejected in icmp.read(cast(socket.socket, key.fileobj)):
                        confirmed = detector.icmp_port_unreachable(*rejected, now)
                        if confirmed is not None:
                            renderer.finding(confirmed, update=True)
                elif key.data == "sent":
                    unanswered.readable(time.time())
                elif key.data == "addr" and addresses.refresh():
                    detector.local_addresses = addresses.addresses
                    detector.networks = addresses.networks
                    nat.addresses(addresses.addresses, time.monotonic())
                    unanswered.addresses(addresses.addresses)
                elif key.data == "nat":
                    nat.readable(time.monotonic())
            mono = time.monotonic()
            nat.tick(mono)
            # At --duration's end a due resync still runs: the summary must not miss
            # the findings whose events were dropped.
            if resync_due is not None and (mono >= resync_due or (deadline or math.inf) <= mono):
                dumped = resync(events)
                resyncs += 1
                resync_due = None
                last_resync = mono = time.monotonic()
                lost = _lost(events, lost, overflows)
                if mono - last_warning >= 5.0:
                    last_warning = mono
                    _warn(
                        f"the kernel dropped conntrack events ({lost} so far): "
                        f"resynchronised from a dump of {dumped} UDP entries"
                    )
            if mono >= next_tick:
                next_tick = mono + 1.0
                now = time.time()
                for each in detectors:
                    each.expire(now)
                unanswered.tick(mono)
                # Every second, not only at a resync: under a lasting overload the
                # lost-events metric must move while it happens.
                lost = _lost(events, lost, overflows)
                if metrics is not None:
                    metrics.update(
                        _totals(detector, lost, resyncs), detector.pending, len(detector.findings)
                    )
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        _set_stop_signals(signal.SIG_IGN)
        if events is not None:
            lost = _lost(events, lost, overflows)
        for closer in reversed(closers):
            # Closing must not hide the summary.
            with contextlib.suppress(Exception):
                closer.close()
    found = [f for each in detectors for f in each.found]
    live = sorted((f for f in found if not f.existing), key=lambda f: f.first_seen or 0.0)
    renderer.final(live)
    totals = _totals(detector, lost, resyncs)
    renderer.summary(
        summary_record(
            events=totals["events"],
            new_flows=totals["new_flows"],
            lost=lost,
            resyncs=resyncs,
            findings=len(live),
            existing=len(found) - len(live),
            started=started,
            tracking=_both(tracking),
            unanswered=counted.flows if counted else 0,
            uncounted=counted.uncounted_flows if counted else 0,
        )
    )
    return exit_status(live, stopped_by_duration)


def exit_status(
    live: Sequence[WrongSourceFinding | StaleNatFinding | UnansweredFinding],
    stopped_by_duration: bool,
) -> int:
    """Like grep: a timed watch tells a script whether it found something new (live
    findings only; a one-way service's unanswered flows are not a finding to act on)."""
    problems = [f for f in live if f.kind != "unanswered" or f.problem]
    return 1 if problems and stopped_by_duration else 0


def _resync_due(due: float | None, now: float, last_resync: float) -> float:
    """When to resync after an ENOBUFS at `now` (monotonic seconds).

    0.2 s later, so that the burst that overflowed the buffer drains first; at most
    once a second under a lasting overload (a dump of a big table costs more than it
    recovers); and an ENOBUFS while one is due never postpones it, or a lasting
    overload would postpone it for ever.
    """
    if due is not None:
        return due
    return max(now + 0.2, last_resync + 1.0)


def _lost(events: EventSocket, lost: int, overflows: int) -> int:
    """Events the kernel dropped so far: its count for the socket (each dropped
    message), or, where /proc does not say, at least one per ENOBUFS."""
    drops = events.drops()
    return max(lost, overflows if drops is None else drops)


def _totals(detector: WrongSourceDetector, lost: int, resyncs: int) -> dict[str, int]:
    return {
        "events": detector.stats.events,
        "new_flows": detector.stats.new_flows,
        "lost": lost,
        "resyncs": resyncs,
    }


def _drain(
    events: EventSocket,
    feed: Feeds,
    decode_event: Callable[[memoryview], CtEvent | None],
    report: Report,
    limit: int = 8192,
) -> None:
    """Read and process up to `limit` waiting events (raises Overflow on ENOBUFS).

    `feed`: the detectors' feeds by event kind (ctfix.core.detectors.feeds_by_kind),
    built once."""
    recv_into = events.recv_into
    now = time.time()
    for _ in range(limit):
        view = recv_into()
        if view is None:
            return
        event = decode_event(view)
        if event is not None:
            found = feed[event[0]](event, now)
            if found is not None:
                report(found)


def _drain_quietly(
    events: EventSocket,
    feed: Feeds,
    decode_event: Callable[[memoryview], CtEvent | None],
    report: Report,
) -> int:
    """Feed what is queued before a dump (which covers any loss); the ENOBUFS seen."""
    from ctfix.platform.conntrack import Overflow

    overflows = 0
    for _ in range(64):
        try:
            _drain(events, feed, decode_event, report)
            return overflows
        except Overflow:
            overflows += 1
    return overflows


#: Test-only, not in --help: the event socket's receive buffer in bytes. A small one
#: makes the kernel drop events (ENOBUFS) so tests can drive the overflow path.
RCVBUF_ENV = "CTFIX_WATCH_RCVBUF"


def _rcvbuf(default: int) -> int:
    text = os.environ.get(RCVBUF_ENV)
    if text is None:
        return default
    if not text.isdigit() or int(text) <= 0:
        raise CtfixError(f"bad {RCVBUF_ENV}={text!r}", "a number of bytes, or unset it")
    return int(text)


def _udp_stream_timeout() -> int:
    from ctfix.core.detectors import UDP_TIMEOUT_STREAM
    from ctfix.platform import ctstats

    return ctstats.udp_timeout_stream() or UDP_TIMEOUT_STREAM


def _udp_timeout() -> int:
    from ctfix.core.detectors import UDP_TIMEOUT
    from ctfix.platform import ctstats

    return ctstats.udp_timeout() or UDP_TIMEOUT


__all__ = ["add_arguments", "run"]
