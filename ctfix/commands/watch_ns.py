"""One network namespace watched: its conntrack event socket, its address view, ICMP
sockets and NAT rule changes, its detectors (wrong-source, stale-nat, unanswered),
its start-up dump and its resyncs after lost events.

Not a command: ctfix/commands/watch.py builds one (with `--all-netns`, one per
namespace: ctfix/commands/watch_all.py) and ctfix/commands/watch_loop.py drives it:
`start()`, then `ready(tag, sock)` when one of its sockets is readable, `turn(mono)`
when `wait(mono)` says so, `tick(mono)` once a second, `close()` and `finish()`.

The detectors: subscribe to conntrack NEW/UPDATE events (UDP only, filtered in the
kernel) and DESTROY events (of entries that never saw a reply: the unanswered
detector's, ctfix/commands/watch_unanswered.py), learn the namespace's addresses,
open raw ICMP sockets, dump the table once, then feed every event to the detectors
(`ctfix.core.detectors`) and report what they find (ctfix/commands/watch_report.py).
When the kernel drops events (ENOBUFS) the loss is counted (the kernel's per-socket
drop count), the state is rebuilt from a complete dump 0.2 s later (at most once a
second), a warning line says so, and watching goes on; the summary and the metrics
carry `lost` and `resyncs`. The event socket, its drain and the loss count are
ctfix/commands/watch_events.py.

Know before changing: the event drain (ctfix/commands/watch_events.py) is the hot path
(>100k events/s); keep attribute lookups out of it. A watcher opens sockets in, and
reads /proc/net of, the current namespace (a dump, sock_diag, the rules, the loss
count), so with `--all-netns` (`inside` given; None when `--netns` entered the
namespace for the whole process) the loop runs `start`, `turn`, `tick`, `close` and
`ready` for the tags in ENTERED inside it; the event drain and the ICMP reads only use
sockets made there, and the few hooks on their finding paths that read the namespace
(the socket view, the rules view, the programs on a port, the ICMP tap) enter it
themselves (`inside`, re-entrant): two setns calls per batch of events would cost more
than the events (bench/watch_all_bench.py).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import selectors
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from ctfix.commands.watch_events import drain, drain_quietly, lost_so_far, resync_due
from ctfix.commands.watch_report import is_problem

if TYPE_CHECKING:
    from ctfix.commands.watch_nat import StaleNatWatch
    from ctfix.commands.watch_report import Found, Reporter
    from ctfix.commands.watch_unanswered import UnansweredWatch
    from ctfix.core.decode import Packed
    from ctfix.core.detectors import Detector
    from ctfix.core.detectors.stale_nat import StaleNatDetector, StaleNatFinding
    from ctfix.core.detectors.unanswered import UnansweredFinding
    from ctfix.core.detectors.wrong_source import WrongSourceDetector, WrongSourceFinding
    from ctfix.core.model import ContainerRef
    from ctfix.core.rules import KnowledgeBase
    from ctfix.platform.addresses import LocalAddresses
    from ctfix.platform.conntrack import EventSocket
    from ctfix.platform.icmp import IcmpWatch
    from ctfix.platform.metrics import NamespaceMetrics, WatchMetrics

    Feed = Callable[[Packed, float], Found | None]
    #: one feed per event kind, indexed by it (ctfix.core.detectors.packed_feeds_by_kind)
    Feeds = tuple[Feed, ...]
    Report = Callable[[Found | None], None]

#: the socket tags whose `ready` reads the namespace (the loop enters it for them)
ENTERED = frozenset({"addr"})
#: socket family -> the summary's family key
FAMILY_KEYS: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """What one namespace's watcher may hold (None: the detector's own default, the
    single-namespace limits; `--all-netns` gives each namespace its share)."""

    flows: int | None = None  # wrong-source: pending requests (~165 bytes each)
    wrong_findings: int | None = None
    stale_findings: int | None = None
    unanswered: dict[str, int] = field(default_factory=dict)  # UnansweredDetector caps
    rcvbuf: int | None = None  # the event socket's kernel buffer (default: 64 MiB)


class NamespaceWatch:
    """One namespace's watcher (see the module doc). Built anywhere; `start()` and
    everything after run inside the namespace."""

    # made by start()
    detector: WrongSourceDetector
    stale: StaleNatDetector
    addresses: LocalAddresses
    unanswered: UnansweredWatch
    icmp: IcmpWatch
    nat: StaleNatWatch
    feed: Feeds

    def __init__(
        self,
        label: str,
        *,
        renderer: Any,
        reporter: Reporter,
        kb: KnowledgeBase | Callable[[], KnowledgeBase],
        metrics: NamespaceMetrics | WatchMetrics | None,
        warn: Callable[[str], None],
        limits: Limits | None = None,
        netns_container: ContainerRef | None = None,
        inside: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.label = label
        self.netns_container = netns_container
        self.renderer = renderer
        self.reporter = reporter
        self.kb = kb
        self.metrics = metrics
        self.warn = warn
        self.limits = limits or Limits()
        #: enters the namespace (None: the process lives in it)
        self.inside = inside
        #: per family, whether conntrack tracks it (set by the composer's probe)
        self.tracking: dict[str, bool | None] = {}
        self.events: EventSocket | None = None
        self.selector: selectors.BaseSelector | None = None
        self.closers: list[Closable] = []
        self.detectors: tuple[
            Detector[WrongSourceFinding | StaleNatFinding | UnansweredFinding], ...
        ] = ()
        self.lost = self.resyncs = self.overflows = 0
        self.started: float | None = None  # when it subscribed: None if it never did
        self.resync_due: float | None = None
        self.last_resync = self.last_warning = -math.inf
        self.gone = False  # the namespace disappeared while watched
        self.closed = False  # close() ran: its sockets (and namespace) are not to be used

    # -- start-up ---------------------------------------------------------------------

    def start(self, sel: selectors.BaseSelector) -> None:
        """Subscribe, learn the addresses, open the ICMP sockets, dump the table, show
        what was already there and put the sockets in the loop's selector `sel` (data:
        (self, tag)); inside the namespace. What it opened is in `closers`, for
        `close()`, whatever ends it."""
        from ctfix.commands.watch_events import subscribe
        from ctfix.commands.watch_nat import StaleNatWatch
        from ctfix.commands.watch_unanswered import UnansweredWatch
        from ctfix.core.detectors import packed_feeds_by_kind
        from ctfix.core.detectors.stale_nat import StaleNatDetector
        from ctfix.core.detectors.wrong_source import WrongSourceDetector
        from ctfix.platform.addresses import LocalAddresses
        from ctfix.platform.icmp import IcmpWatch
        from ctfix.platform.programs import OtherPortPrograms

        limits = self.limits
        # One detector per problem kind, all fed the same events; wrong-source also gets
        # the namespace's addresses and client networks, the clients' ICMP, and which
        # programs answer from other ports by design (asked only for such replies).
        self.detector = detector = WrongSourceDetector(
            udp_timeout=_udp_timeout(), other_port=OtherPortPrograms(self.kb, inside=self.inside)
        )
        # stale-nat learns from dumps only (one_feed leaves it out of the event loop); the
        # StaleNatWatch below re-checks it when the NAT rules change.
        self.stale = stale = StaleNatDetector(
            udp_timeout=detector.udp_timeout, stream_timeout=_udp_stream_timeout()
        )
        # Limits other than the detectors' own (a share, with --all-netns).
        if limits.flows is not None:
            detector.max_flows = limits.flows
        if limits.wrong_findings is not None:
            detector.max_findings = limits.wrong_findings
        if limits.stale_findings is not None:
            stale.max_findings = limits.stale_findings
        # and the unanswered detector (last: it asks the other two), once built
        self.detectors = (detector, stale)
        self.events = events = subscribe(limits.rcvbuf)
        self.closers.append(events)
        # Subscribed: from now on a reply is news; what the dump below finds is history.
        self.started = self.renderer.started = detector.since = time.time()
        self.addresses = addresses = LocalAddresses()
        self.closers.append(addresses)
        detector.local_addresses = addresses.addresses
        detector.networks = addresses.networks
        self.selector = sel
        self.unanswered = unanswered = UnansweredWatch(
            detector,
            stale,
            self.kb,
            _Tagged(sel, self),
            self.warn,
            caps=limits.unanswered,
            inside=self.inside,
        )
        self.closers.append(unanswered)
        selection = self.reporter.selection
        self.detectors = (detector, stale, selection.requests(unanswered.detector))
        self.reporter.on_unanswered = unanswered.found
        self.icmp = IcmpWatch()
        self.closers.append(self.icmp)
        self.feed = packed_feeds_by_kind(self.detectors, self.report)
        self.nat = StaleNatWatch(stale, self.report, addresses.addresses, self.warn)
        self.closers.append(self.nat)

        history: list[WrongSourceFinding | UnansweredFinding] = []
        self.resync(events, history)
        detector.stats.recovered = 0
        # Printed once, under their own heading; later dumps (after lost events) only
        # show what happened since the start-up dump: news.
        keys = dict.fromkeys(f.key for f in history if f.key in detector.history)
        silent = unanswered.detector.findings
        quiet = [silent[k] for k in dict.fromkeys(f.key for f in history) if k in silent]
        self.reporter.existing([*(detector.history[key] for key in keys), *quiet])
        for finding in quiet:  # an outage already in the table: confirm what follows
            unanswered.found(finding)
        detector.dumps_are_history = False
        unanswered.detector.dumps_are_history = False
        sel.register(events.sock, selectors.EVENT_READ, (self, "ct"))
        sel.register(addresses.sock, selectors.EVENT_READ, (self, "addr"))
        sel.register(self.nat.sock, selectors.EVENT_READ, (self, "nat"))
        for sock in self.icmp.sockets:
            sel.register(sock, selectors.EVENT_READ, (self, "icmp"))

    def report(self, found: Found | None) -> None:
        self.reporter(found)

    def resync(
        self,
        events: EventSocket,
        history: list[WrongSourceFinding | UnansweredFinding] | None = None,
    ) -> int:
        """Feed what is queued, then rebuild from a dump; the number of entries.
        `history`: collect the existing findings there instead of reporting them."""
        from ctfix.core import decode
        from ctfix.platform import conntrack

        self.overflows += drain_quietly(events, self.feed, decode.packed_event, self.report)
        # Streamed: each chunk of the dump goes to every detector as it is decoded, so
        # the table is never held (a detector keeps what it keeps in steady state).
        now = time.time()
        snapshots = [each.snapshot(now, complete=True) for each in self.detectors]
        dumped = 0
        entries = iter(conntrack.dump(proto=17))
        while chunk := list(itertools.islice(entries, DUMP_CHUNK)):
            dumped += len(chunk)
            for snapshot in snapshots:
                snapshot.add(chunk)
        for snapshot in snapshots:
            for found in snapshot.finish():
                # Stale NAT entries there at start are a black hole now: reported at
                # once (marked existing), not filed as history.
                finding = found[0]
                if history is not None and finding.kind != "stale-nat" and finding.existing:
                    history.append(finding)
                else:
                    self.report(found)
        return dumped

    # -- the loop's hooks -------------------------------------------------------------

    def unregister(self) -> None:
        """Take this namespace's sockets out of the loop's selector (before close)."""
        sel = self.selector
        if sel is None:
            return
        for key in list(sel.get_map().values()):
            if key.data[0] is self:
                sel.unregister(key.fileobj)

    def ready(self, tag: str, fileobj: Any) -> None:
        """One of this namespace's sockets is readable."""
        if tag == "ct":
            from ctfix.core import decode
            from ctfix.platform import conntrack

            assert self.events is not None
            try:
                drain(self.events, self.feed, decode.packed_event, self.report)
            except conntrack.Overflow:
                self.overflows += 1
                self.resync_due = resync_due(self.resync_due, time.monotonic(), self.last_resync)
        elif tag == "icmp":
            now = time.time()
            # The key holds what was registered as "icmp": one of icmp.sockets.
            for rejected in self.icmp.read(cast(socket.socket, fileobj)):
                confirmed = self.detector.icmp_port_unreachable(*rejected, now)
                if confirmed is not None:
                    self.reporter.confirmed(confirmed)
        elif tag == "sent":
            self.unanswered.readable(time.time())
        elif tag == "addr" and self.addresses.refresh():
            self.detector.local_addresses = self.addresses.addresses
            self.detector.networks = self.addresses.networks
            self.nat.addresses(self.addresses.addresses, time.monotonic())
            self.unanswered.addresses(self.addresses.addresses)
        elif tag == "nat":
            self.nat.readable(time.monotonic())

    def wait(self, mono: float) -> float:
        """Seconds until `turn` has something to do."""
        wait = self.nat.wait(mono)
        if self.resync_due is not None:
            wait = min(wait, max(0.0, self.resync_due - mono))
        return wait

    def turn(self, mono: float, deadline: float | None) -> None:
        """The NAT rules' check when due, and a resync when one is due (at --duration's
        end a due resync still runs: the summary must not miss the findings whose
        events were dropped)."""
        self.nat.tick(mono)
        if self.resync_due is not None and (
            mono >= self.resync_due or (deadline or math.inf) <= mono
        ):
            assert self.events is not None
            dumped = self.resync(self.events)
            self.resyncs += 1
            self.resync_due = None
            self.last_resync = mono = time.monotonic()
            self.lost = lost_so_far(self.events, self.lost, self.overflows)
            if mono - self.last_warning >= 5.0:
                self.last_warning = mono
                self.warn(
                    f"the kernel dropped conntrack events ({self.lost} so far): "
                    f"resynchronised from a dump of {dumped} UDP entries"
                )

    def tick(self, mono: float) -> None:
        """About once a second: forget what the kernel forgot, count losses, metrics."""
        now = time.time()
        for each in self.detectors:
            each.expire(now)
        self.unanswered.tick(mono)
        # Every second, not only at a resync: under a lasting overload the
        # lost-events metric must move while it happens.
        if self.events is not None:
            self.lost = lost_so_far(self.events, self.lost, self.overflows)
        if self.metrics is not None:
            self.metrics.update(
                self.totals(),
                self.detector.pending,
                len(self.detector.findings),
                self.stale.active,
            )

    def totals(self) -> dict[str, int]:
        stats = self.detector.stats
        return {
            "events": stats.events,
            "new_flows": stats.new_flows,
            "lost": self.lost,
            "resyncs": self.resyncs,
        }

    def close(self) -> None:
        """Count the last losses and close every socket (inside the namespace)."""
        self.closed = True
        self.unregister()
        if self.events is not None:
            with contextlib.suppress(OSError):
                self.lost = lost_so_far(self.events, self.lost, self.overflows)
        for closer in reversed(self.closers):
            # Closing must not hide the summary.
            with contextlib.suppress(Exception):
                closer.close()
        self.closers.clear()

    # -- the end -----------------------------------------------------------------------

    def live(self) -> tuple[list[WrongSourceFinding | StaleNatFinding | UnansweredFinding], int]:
        """Live findings to list (the filters' choice), and how many they left out."""
        return self.reporter.live([f for each in self.detectors for f in each.found])

    def finish(self) -> tuple[list[Any], dict[str, Any]]:
        """List every live finding with its final counts; (the live findings, the
        summary record)."""
        from ctfix.render.watch import summary_record

        found = [f for each in self.detectors for f in each.found]
        live, hidden = self.live()
        self.renderer.final(live, self.reporter.container_of)
        # A stop during start-up may come before the unanswered detector exists.
        unanswered: UnansweredWatch | None = getattr(self, "unanswered", None)
        counted = unanswered.detector.stats if unanswered is not None else None
        totals = self.totals() if self.detectors else {"events": 0, "new_flows": 0}
        # One-way services' records are listed, and are no finding (nor in the exit status).
        problems = sum(1 for f in live if is_problem(f))
        record = summary_record(
            events=totals["events"],
            new_flows=totals["new_flows"],
            lost=self.lost,
            resyncs=self.resyncs,
            findings=problems,
            one_way=len(live) - problems,
            existing=sum(1 for f in found if f.existing),
            started=self.started,
            tracking=both(self.tracking),
            unanswered=counted.flows if counted else 0,
            one_way_requests=counted.one_way if counted else 0,
            uncounted=counted.uncounted_flows if counted else 0,
            netns=self.label,
            netns_container=self.netns_container,
            hidden=hidden,
        )
        return live, record


def both(tracking: dict[str, bool | None]) -> dict[str, bool | None]:
    """Both families, in order; None where watch did not get to probe one."""
    return {family: tracking.get(family) for family in ("ipv4", "ipv6")}


def probe_tracking() -> dict[int, bool | None]:
    """Whether conntrack tracks each family in the current namespace (a loopback
    datagram per family: ctfix.platform.conntrack.probe_tracking)."""
    from ctfix.platform import conntrack

    return {fam: conntrack.probe_tracking(fam) for fam in FAMILY_KEYS}


class _Tagged(selectors.BaseSelector):
    """The loop's selector as seen by one namespace's parts (the ICMP tap): what they
    register is tagged with the namespace's watcher."""

    def __init__(self, sel: selectors.BaseSelector, watcher: NamespaceWatch) -> None:
        self.sel = sel
        self.watcher = watcher

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.sel.register(fileobj, events, (self.watcher, data))

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.sel.unregister(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        raise NotImplementedError("the loop selects, not a namespace")

    def get_map(self) -> Any:
        return self.sel.get_map()


#: entries of a dump decoded and handed to the detectors at a time (watch_ns.resync)
DUMP_CHUNK = 2048


def _udp_stream_timeout() -> int:
    from ctfix.core.detectors import UDP_TIMEOUT_STREAM
    from ctfix.platform import ctstats

    return ctstats.udp_timeout_stream() or UDP_TIMEOUT_STREAM


def _udp_timeout() -> int:
    from ctfix.core.detectors import UDP_TIMEOUT
    from ctfix.platform import ctstats

    return ctstats.udp_timeout() or UDP_TIMEOUT
