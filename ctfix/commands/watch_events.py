"""One namespace's conntrack event socket, for `ctfix watch`: subscribing to it,
draining it into the detectors (the hot path), counting what the kernel dropped, and
when to rebuild from a dump after a loss. ctfix/commands/watch_ns.py composes them.

Know before changing: `drain` runs for every event (>100k/s): keep attribute lookups
and allocations out of its loop (bench/watch_bench.py before and after).
CTFIX_WATCH_RCVBUF and CTFIX_WATCH_TEST_SIGNAL_AT are test-only (not in --help): a
small receive buffer forces a real loss (tests/netns/test_watch_overflow.py), and a
stop at a named start-up step tests the clean-up.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ctfix.errors import CtfixError

if TYPE_CHECKING:
    from ctfix.commands.watch_report import Found
    from ctfix.core.decode import Packed
    from ctfix.platform.conntrack import EventSocket

    Feed = Callable[[Packed, float], Found | None]
    #: one feed per event kind, indexed by it (ctfix.core.detectors.packed_feeds_by_kind)
    Feeds = tuple[Feed, ...]
    Report = Callable[[Found | None], None]

#: Test-only: a start-up step ("track-loaded", "subscribing") at which watch sends
#: itself SIGTERM, to check that a stop there ends normally and cleanly.
SIGNAL_AT_ENV = "CTFIX_WATCH_TEST_SIGNAL_AT"


def test_signal(step: str) -> None:
    if os.environ.get(SIGNAL_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGTERM)


def subscribe(rcvbuf: int | None = None) -> EventSocket:
    """The event socket of the current namespace: NEW and UPDATE events of UDP
    entries, and DESTROY events of entries that never saw a reply (both filtered in
    the kernel); `rcvbuf` bytes of kernel buffer (None: conntrack.DEFAULT_RCVBUF)."""
    from ctfix.platform import conntrack

    size = _rcvbuf(rcvbuf or conntrack.DEFAULT_RCVBUF)
    test_signal("subscribing")
    groups = (
        conntrack.NFNLGRP_CONNTRACK_NEW,
        conntrack.NFNLGRP_CONNTRACK_UPDATE,
        conntrack.NFNLGRP_CONNTRACK_DESTROY,  # of unreplied entries only (kernel filter)
    )
    return conntrack.EventSocket(groups=groups, rcvbuf=size)


def resync_due(due: float | None, now: float, last_resync: float) -> float:
    """When to resync after an ENOBUFS at `now` (monotonic seconds).

    0.2 s later, so that the burst that overflowed the buffer drains first; at most
    once a second under a lasting overload (a dump of a big table costs more than it
    recovers); and an ENOBUFS while one is due never postpones it, or a lasting
    overload would postpone it for ever.
    """
    if due is not None:
        return due
    return max(now + 0.2, last_resync + 1.0)


def lost_so_far(events: EventSocket, lost: int, overflows: int) -> int:
    """Events the kernel dropped so far: its count for the socket (each dropped
    message), or, where /proc does not say, at least one per ENOBUFS."""
    drops = events.drops()
    return max(lost, overflows if drops is None else drops)


def drain(
    events: EventSocket,
    feed: Feeds,
    decode_event: Callable[[memoryview], Packed | None],
    report: Report,
    limit: int = 8192,
) -> None:
    """Read and process up to `limit` waiting events (raises Overflow on ENOBUFS).

    `feed`: the detectors' feeds by event kind (ctfix.core.detectors.packed_feeds_by_kind),
    built once; `decode_event`: ctfix.core.decode.packed_event (the Packed form)."""
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


def drain_quietly(
    events: EventSocket,
    feed: Feeds,
    decode_event: Callable[[memoryview], Packed | None],
    report: Report,
) -> int:
    """Feed what is queued before a dump (which covers any loss); the ENOBUFS seen."""
    from ctfix.platform.conntrack import Overflow

    overflows = 0
    for _ in range(64):
        try:
            drain(events, feed, decode_event, report)
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


__all__ = [
    "RCVBUF_ENV",
    "SIGNAL_AT_ENV",
    "drain",
    "drain_quietly",
    "lost_so_far",
    "resync_due",
    "subscribe",
    "test_signal",
]
