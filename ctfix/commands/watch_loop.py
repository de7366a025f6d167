"""watch's loop: one selector for every namespace watched, the once-a-second tick,
--duration, the status line, and the signals that stop it cleanly.

Not a command: ctfix/commands/watch.py starts the namespaces' watchers
(ctfix/commands/watch_ns.py) and hands them to `run_loop`; with `--all-netns` a
`Follower` (ctfix/commands/watch_all.py) adds and removes watchers as namespaces
come and go.

Know before changing: every catchable stop signal (SIGTERM, SIGHUP, SIGQUIT, ...) is
turned into `Stop` so that the callers' `finally` runs (a name is recorded for
removal *before* a change is made, and a stop at any point, even during start-up,
ends normally, with a summary). A watcher's work runs inside its namespace
(`watcher.inside`), so a stop in the middle leaves the thread where it began.
CTFIX_WATCH_TEST_SIGNAL_AT (test-only) sends watch a SIGTERM at a named start-up step
so that tests can check that.
"""

from __future__ import annotations

import selectors
import signal
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol

if TYPE_CHECKING:
    from ctfix.commands.watch_ns import NamespaceWatch
    from ctfix.render.status import Console, StatusCounts

P = ParamSpec("P")

#: seconds between two ticks (expiry, losses, metrics)
TICK = 1.0
#: --all-netns: seconds between two looks at the namespaces' timers (NAT checks due,
#: resyncs due); their own delays are 0.2 s and more
TURN = 0.05


class Stop(Exception):
    """A signal arrived: leave the loop, clean up, print the summary."""


def on_signal(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise Stop()


#: Every signal whose default action ends the process and that can be caught: each
#: one must run the clean-up (a SIGHUP from a closed terminal left the --track table).
STOP_SIGNALS = tuple(
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


def set_stop_signals(handler: Any) -> dict[int, Any]:
    """Install handler for every stop signal; the previous handlers."""
    return {int(sig): signal.signal(sig, handler) for sig in STOP_SIGNALS}


class Follower(Protocol):
    """What the loop asks of `--all-netns` (ctfix/commands/watch_all.py)."""

    @property
    def watchers(self) -> Iterable[NamespaceWatch]: ...

    def wait(self, mono: float) -> float:
        """Seconds until it wants to look at the namespaces again."""
        ...

    def follow(self, mono: float, *, readable: bool = False) -> None:
        """Look again when due (`readable`: its own socket woke the loop)."""
        ...


def run_loop(
    sel: selectors.BaseSelector,
    watchers: Iterable[NamespaceWatch],
    *,
    console: Console,
    deadline: float | None,
    follower: Follower | None = None,
) -> bool:
    """Watch until `deadline` (monotonic; None: until a signal raises Stop, which the
    caller catches); True when the deadline ended it. `follower` (--all-netns) owns the
    list of watchers; the selector's keys hold (watcher, tag), or (None, tag) for the
    follower's own socket. With many watchers their timers are looked at every TURN
    seconds, not at every wake-up (which would cost each event a pass over them all)."""
    from ctfix.commands.watch_ns import ENTERED

    active = list(watchers if follower is None else follower.watchers)
    next_tick = time.monotonic() + TICK
    next_turns = 0.0
    while True:
        mono = time.monotonic()
        if deadline is not None and mono >= deadline and all(
            w.resync_due is None for w in active
        ):
            return True
        wait = min(next_tick, deadline or next_tick, console.due(mono)) - mono
        if follower is None:
            for watcher in active:
                wait = min(wait, watcher.wait(mono))
        else:
            wait = min(wait, next_turns - mono, follower.wait(mono))
        ready = sel.select(max(0.0, wait))
        registered = sel.get_map()
        for key, _mask in ready:
            if registered.get(key.fd) is not key:
                # Unregistered by an earlier key of this batch (its namespace is gone, or
                # was left): its socket is closed, or its number already another's.
                continue
            watcher, tag = key.data
            if watcher is None:
                if follower is not None:
                    follower.follow(time.monotonic(), readable=True)
                    # It may have stopped some (their namespace is gone, their
                    # descriptors closed): none of them is touched again.
                    active = list(follower.watchers)
            elif watcher.inside is None or tag not in ENTERED:
                watcher.ready(tag, key.fileobj)
            else:
                inside(watcher, watcher.ready, tag, key.fileobj)
        mono = time.monotonic()
        if follower is None:
            for watcher in active:
                watcher.turn(mono, deadline)
        elif mono >= next_turns or (deadline is not None and mono >= deadline):
            next_turns = mono + TURN
            for watcher in active:
                if watcher.wait(mono) <= 0.0 or (deadline is not None and mono >= deadline):
                    inside(watcher, watcher.turn, mono, deadline)
        if mono >= next_tick:
            next_tick = mono + TICK
            for watcher in active:
                if watcher.inside is None:
                    watcher.tick(mono)
                else:
                    inside(watcher, watcher.tick, mono)
        if follower is not None:
            follower.follow(mono)
            active = list(follower.watchers)
        if console.status:
            console.show(counts(active, many=follower is not None), time.monotonic())


def inside(
    watcher: NamespaceWatch, work: Callable[P, object], *args: P.args, **kwargs: P.kwargs
) -> None:
    """`work` inside the watcher's namespace; none when it is no longer watched (its
    namespace went: ctfix.platform.netns.Entering is closed), never an error."""
    from ctfix.platform.netns import NamespaceGone

    assert watcher.inside is not None
    try:
        with watcher.inside():
            work(*args, **kwargs)
    except NamespaceGone:
        pass


def counts(watchers: Iterable[NamespaceWatch], *, many: bool) -> StatusCounts:
    """The status line's figures, summed over the namespaces watched."""
    from ctfix.render.status import StatusCounts

    events = flows = findings = lost = namespaces = 0
    for watcher in watchers:
        namespaces += 1
        if not watcher.detectors:
            continue
        stats = watcher.detector.stats
        events += stats.events
        flows += stats.new_flows
        lost += watcher.lost
        findings += watcher.reporter.live_findings
    return StatusCounts(events, flows, findings, lost, namespaces if many else None)
