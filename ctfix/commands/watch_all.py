"""`ctfix watch --all-netns`: every network namespace of the host, watched at once by
one process, followed as namespaces appear and disappear.

Each namespace gets its own NamespaceWatch (ctfix/commands/watch_ns.py: its own
conntrack event socket, made inside it, its own address view and detectors), all in
one selector loop (ctfix/commands/watch_loop.py). `AllNamespaces` looks at the
host's namespaces (ctfix.platform.namespaces.snapshot) every RESCAN seconds, and
SETTLE seconds after the mount table changes (a new `ip netns`, Docker or CNI nsfs
mount): a new namespace is followed (a note names it), one that disappeared is
closed with a note and its findings stay in the final report.

Bounded memory (README, "watch --all-netns"): at most `--max-netns` namespaces are
watched (MAX_NETNS by default; the rest are named in one warning and counted in the
summary, and taken up when watched ones go); the pending flows of every namespace
share one budget of TOTAL_FLOWS (each has TOTAL_FLOWS / watched namespaces, the
oldest evicted first when a namespace joins); the detectors' findings are capped per
namespace at the single-namespace limits divided by `--max-netns` (with floors); the
kernel buffers each namespace's events in at most `limits()`'s rcvbuf (the host's:
64 MiB as for one namespace).

Know before changing: a watcher's work runs inside its namespace, entered through a
descriptor held open for as long as it is watched (`inside`, two setns calls; closed,
it refuses to enter, never setns on a number another file may have by then); our
own sockets keep a namespace alive after its last process and mount are gone, so
"gone" is what the snapshot says, never what the kernel still lets us read.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import selectors
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ctfix.commands.watch_loop import STOP_SIGNALS, Stop, on_signal, run_loop, set_stop_signals
from ctfix.errors import CtfixError

if TYPE_CHECKING:
    from ctfix.commands.watch_ns import Limits, NamespaceWatch
    from ctfix.core.rules import KnowledgeBase
    from ctfix.core.watch_filter import Selection
    from ctfix.platform.containers import ClientContainers
    from ctfix.platform.metrics import WatchMetrics
    from ctfix.platform.namespaces import NamespaceId, NamespaceRef
    from ctfix.platform.netns import Entering
    from ctfix.render.status import Console

#: namespaces watched at most, by default (`--max-netns`)
MAX_NETNS = 256
#: seconds between two looks at the host's namespaces
RESCAN = 5.0
#: seconds after a mount change before looking (a container's mounts come in a burst)
SETTLE = 0.3
#: pending flows of all namespaces together (one namespace's own default)
TOTAL_FLOWS = 2_000_000
#: the single-namespace caps shared out per namespace, and the floor of each share
_FINDING_CAPS = {
    "wrong_findings": (10_000, 100),
    "stale_findings": (10_000, 100),
    "max_findings": (4096, 64),  # unanswered (service, reason) pairs
    "max_clients": (65536, 1024),  # unanswered: client addresses
    "max_remembered": (65536, 1024),  # unanswered: entries counted from dumps
}
_MIB = 1 << 20


def limits(max_netns: int, *, host: bool, flows: int) -> Limits:
    """One namespace's share (module doc)."""
    from ctfix.commands.watch_ns import Limits
    from ctfix.platform.conntrack import DEFAULT_RCVBUF

    share = {name: max(floor, total // max_netns) for name, (total, floor) in _FINDING_CAPS.items()}
    return Limits(
        flows=flows,
        wrong_findings=share["wrong_findings"],
        stale_findings=share["stale_findings"],
        unanswered={k: share[k] for k in ("max_findings", "max_clients", "max_remembered")},
        rcvbuf=DEFAULT_RCVBUF if host else min(16 * _MIB, max(_MIB, 512 * _MIB // max_netns)),
    )


def watch_all(
    args: argparse.Namespace,
    kb: KnowledgeBase | Callable[[], KnowledgeBase],
    selection: Selection,
    console: Console,
) -> int:
    """Watch every namespace until --duration or a signal; the exit status."""
    from ctfix.commands.watch_report import exit_status
    from ctfix.platform import conntrack
    from ctfix.platform.containers import ClientContainers
    from ctfix.render.watch import WatchRenderer, all_summary_record

    conntrack.available()  # here first: no ctnetlink at all is one error, not N notes
    sel = selectors.DefaultSelector()
    metrics: WatchMetrics | None = None
    if args.metrics:
        from ctfix.platform.metrics import WatchMetrics

        metrics = WatchMetrics(args.metrics_listener)
        console.note(f"Prometheus metrics on http://{args.metrics}/metrics")
    every = AllNamespaces(
        sel, console, kb, selection, args.json, metrics, ClientContainers(), args.max_netns
    )
    stopped_by_duration = False
    previous = {int(sig): signal.getsignal(sig) or signal.SIG_DFL for sig in STOP_SIGNALS}
    try:
        set_stop_signals(on_signal)
        every.start()
        deadline = time.monotonic() + args.duration if args.duration else None
        stopped_by_duration = run_loop(
            sel, (), console=console, deadline=deadline, follower=every
        )
    except (Stop, KeyboardInterrupt):
        pass
    finally:
        set_stop_signals(signal.SIG_IGN)
        console.close()
        try:
            every.close()
            for closer in (metrics, sel):
                if closer is not None:
                    with contextlib.suppress(Exception):
                        closer.close()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    live: list[Any] = []
    summaries = []
    for watcher in every.ended:
        found, record = watcher.finish()
        live += found
        summaries.append(record)
    top = WatchRenderer(sys.stdout, json_lines=args.json, netns="all")
    for watcher, record in zip(every.ended, summaries, strict=True):
        from ctfix.render.watch import namespace_summary_record

        if args.json or any(record[k] for k in ("findings", "existing", "lost", "hidden")):
            top.summary(namespace_summary_record(record, gone=watcher.gone))
    top.summary(
        all_summary_record(
            [{**r, "gone": w.gone} for w, r in zip(every.ended, summaries, strict=True)],
            unwatched=len(every.unwatched),
            failed=len(every.failed),
            started=every.started,
        )
    )
    return exit_status(live, stopped_by_duration)


class AllNamespaces:
    """The namespaces watched, followed (the loop's `Follower`)."""

    def __init__(
        self,
        sel: selectors.BaseSelector,
        console: Console,
        kb: KnowledgeBase | Callable[[], KnowledgeBase],
        selection: Selection,
        json_lines: bool,
        metrics: WatchMetrics | None,
        containers: ClientContainers,
        max_netns: int,
    ) -> None:
        self.sel = sel
        self.console = console
        self.kb = kb
        self.selection = selection
        self.json = json_lines
        self.metrics = metrics
        self.containers = containers
        self.max_netns = max_netns
        self.current: dict[NamespaceId, NamespaceWatch] = {}
        #: every namespace watched, in the order they were taken up (the final report)
        self.ended: list[NamespaceWatch] = []
        self.known: dict[NamespaceId, NamespaceRef] = {}
        self.unwatched: set[NamespaceId] = set()  # over --max-netns
        self.failed: dict[NamespaceId, str] = {}
        self.started: float | None = None
        self._entering: dict[NamespaceId, Entering] = {}
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._mounts: tuple[select.epoll, int] | None = None
        self._next_scan = 0.0
        self._capped_warned = False

    @property
    def watchers(self) -> Iterable[NamespaceWatch]:
        return self.current.values()

    # -- start and follow -------------------------------------------------------------

    def start(self) -> None:
        """Watch every namespace there is now; then listen for mount changes."""
        self.started = time.time()
        self._listen_to_mounts()
        self.scan(time.monotonic(), first=True)
        blind = [
            w.label for w in self.current.values() if not any(w.tracking.values())
        ]
        self.console.note(
            f"watching {len(self.current)} namespaces for wrong-source UDP replies and "
            f"unanswered requests, following new ones (every {RESCAN:g} s and on mount "
            "changes)"
        )
        if blind:
            self.console.note(
                f"{len(blind)} of them track neither family yet (no loaded rule needs "
                "conntrack): nothing can be seen there until one does"
            )

    def _listen_to_mounts(self) -> None:
        """A new nsfs mount (`ip netns add`, Docker, CNI) changes the mount table, which
        /proc/self/mountinfo signals with POLLPRI; an epoll of it is readable then."""
        try:
            fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # every RESCAN seconds it is, then
        poller = select.epoll()
        try:
            poller.register(fd, select.EPOLLPRI)
        except OSError:
            poller.close()
            os.close(fd)
            return
        self._mounts = (poller, fd)
        self.sel.register(poller.fileno(), selectors.EVENT_READ, (None, "mounts"))

    def wait(self, mono: float) -> float:
        return max(0.0, self._next_scan - mono)

    def follow(self, mono: float, *, readable: bool = False) -> None:
        if readable and self._mounts is not None:
            self._mounts[0].poll(0)  # consume the change
            self._next_scan = min(self._next_scan, mono + SETTLE)
        if mono >= self._next_scan:
            self.scan(mono)

    def scan(self, mono: float, *, first: bool = False) -> None:
        """Look at the namespaces: follow new ones, close gone ones."""
        from ctfix.platform import namespaces

        self._next_scan = mono + RESCAN
        now = namespaces.snapshot()
        changes = namespaces.diff(self.known, now)
        self.known = now
        for ref in changes.removed:
            self.unwatched.discard(ref.id)
            self.failed.pop(ref.id, None)
            watcher = self.current.get(ref.id)
            if watcher is not None:
                self._stop(ref.id, watcher, gone=True)
        for ref in changes.changed:
            watcher = self.current.get(ref.id)
            if watcher is not None and watcher.label != ref.label:
                self._rename(watcher, ref)
        waiting = [self.known[i] for i in self.unwatched if i in self.known]
        for ref in namespaces.ordered({r.id: r for r in (*changes.added, *waiting)}):
            self._follow(ref, quiet=first)
        if len(self.unwatched) and not self._capped_warned:
            self._capped_warned = True
            names = [self.known[i].label for i in sorted(self.unwatched)][:5]
            self.console.warn(
                f"watching {len(self.current)} namespaces, the most --max-netns allows: "
                f"{len(self.unwatched)} more not watched ({', '.join(names)}"
                f"{', ...' if len(self.unwatched) > 5 else ''}); the summary counts them"
            )
        self._share_flows()

    def _follow(self, ref: NamespaceRef, *, quiet: bool) -> None:
        """Start watching one namespace (or note why not)."""
        from ctfix.commands.watch_ns import FAMILY_KEYS, NamespaceWatch, probe_tracking
        from ctfix.commands.watch_report import Reporter
        from ctfix.platform import namespaces, netns
        from ctfix.render.watch import WatchRenderer

        if len(self.current) >= self.max_netns:
            self.unwatched.add(ref.id)
            return
        self.unwatched.discard(ref.id)
        try:
            fd = namespaces.open_ref(ref)
        except namespaces.NamespaceGone:
            return  # gone before it could be watched: nothing happened there for us
        inside = netns.Entering(fd, ref.label, self._home)
        renderer = WatchRenderer(
            sys.stdout,
            json_lines=self.json,
            netns=ref.label,
            netns_container=ref.container,
            tagged=True,
            before_write=self.console.clear,
        )
        metrics = self.metrics.namespace(ref.label) if self.metrics is not None else None

        def warn(text: str) -> None:
            self.console.warn(f"{watcher.label}: {text}")

        watcher = NamespaceWatch(
            ref.label,
            renderer=renderer,
            reporter=Reporter(renderer, metrics, self.selection, self.containers),
            kb=self.kb,
            metrics=metrics,
            warn=warn,
            limits=limits(
                self.max_netns,
                host=ref.kind == "host",
                flows=TOTAL_FLOWS // (len(self.current) + 1),
            ),
            netns_container=ref.container,
            inside=inside,
        )
        try:
            with inside():
                probed = probe_tracking()
                watcher.tracking = {FAMILY_KEYS[fam]: on for fam, on in probed.items()}
                watcher.start(self.sel)
        except BaseException as err:
            with contextlib.suppress(CtfixError, OSError), inside():
                watcher.close()
            inside.close()
            if self.metrics is not None:
                self.metrics.forget(ref.label)
            if not isinstance(err, CtfixError | OSError):
                raise  # a stop signal, or a bug: the caller's clean-up runs
            # Gone while it was being entered or started: nothing to say about it.
            if not isinstance(err, namespaces.NamespaceGone) and not namespaces.gone(ref):
                why = err.one_line() if isinstance(err, CtfixError) else str(err)
                self.failed[ref.id] = why
                self.console.warn(f"cannot watch namespace {ref.label}: {why}")
            return
        self._entering[ref.id] = inside
        self.current[ref.id] = watcher
        self.ended.append(watcher)
        if not quiet:
            blind = "" if any(watcher.tracking.values()) else " (it tracks neither family yet)"
            self.console.note(f"following new namespace {ref.label}{blind}")

    def _stop(self, ident: NamespaceId, watcher: NamespaceWatch, *, gone: bool) -> None:
        """Stop watching a namespace: what its socket still holds is read first."""
        self.current.pop(ident, None)
        inside = self._entering.pop(ident)
        try:
            assert watcher.inside is not None
            with watcher.inside():
                with contextlib.suppress(CtfixError, OSError):
                    watcher.ready("ct", None)
                watcher.close()
        except (CtfixError, OSError):
            watcher.close()
        finally:
            inside.close()
        watcher.gone = gone
        if self.metrics is not None:
            self.metrics.forget(watcher.label)
        if gone:
            self.console.note(
                f"namespace {watcher.label} is gone: stopped watching it (its findings stay "
                "in the report)"
            )

    def _rename(self, watcher: NamespaceWatch, ref: NamespaceRef) -> None:
        """A namespace got a better name (a container's, once its engine knows it)."""
        old = watcher.label
        self.console.note(f"namespace {old} is {ref.label}")
        watcher.label = watcher.renderer.netns = ref.label
        watcher.netns_container = watcher.renderer.netns_container = ref.container
        if self.metrics is not None:
            self.metrics.forget(old)
            watcher.metrics = watcher.reporter.metrics = self.metrics.namespace(ref.label)

    def _share_flows(self) -> None:
        """Each namespace's share of TOTAL_FLOWS pending flows (module doc)."""
        share = TOTAL_FLOWS // max(1, len(self.current))
        for watcher in self.current.values():
            if watcher.detectors and watcher.detector.max_flows != share:
                watcher.detector.limit_flows(share)

    def close(self) -> None:
        """Stop watching every namespace (still there: not gone)."""
        for ident, watcher in list(self.current.items()):
            self._stop(ident, watcher, gone=False)
        if self._mounts is not None:
            poller, fd = self._mounts
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(poller.fileno())
            poller.close()
            os.close(fd)
            self._mounts = None
        os.close(self._home)
