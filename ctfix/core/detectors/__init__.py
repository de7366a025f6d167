"""Detectors: one per problem kind, each turning conntrack into typed findings. Pure.

A detector is fed by one stream of decoded events (`feed(event, now)`, the hot path
of `ctfix watch`) and by snapshots of the table (`examine(entries, now)`: explain's
and scan's dump; `snapshot(now)`, fed chunk by chunk: watch's start-up and its resyncs
after lost events, which never hold the whole table). Each returns findings of its
own type, every one with a `kind` (FindingKind) and an aggregation `key`, paired with
what the event changed (`Change`). watch, explain and scan compose detectors; the
renderers show findings by kind.

Today: `wrong_source` (a reply that leaves from another address or port than the
client sent to), `stale_nat` (entries the current DNAT rules would no longer send
where they go; it learns from dumps only) and `unanswered` (requests that ended
without any reply, classified by why; it takes DESTROY events only). Planned kinds:
health.

Know before changing: `feed` runs for every conntrack event (>100k/s): a detector
must not allocate or add indirections there for events that are not findings, and
composers bind `detector.feed` once, outside their loops. Memory must stay bounded
whatever the traffic (each detector takes its own limits).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Literal, Protocol, TypeVar

from ctfix.core.decode import DESTROY, DUMPED, NEW, UPDATE, CtEntry, CtEvent, Packed, event_of

FindingKind = Literal["wrong-source", "stale-nat", "unanswered", "health"]

#: The kernel's defaults (nf_conntrack_udp_timeout, nf_conntrack_udp_timeout_stream).
UDP_TIMEOUT = 30
UDP_TIMEOUT_STREAM = 120


class Change(enum.IntEnum):
    """What one event changed about its finding (the second element of what `feed` /
    `examine` return).

    Falsy only for COUNTED, so a caller that asks "is it worth a line?" can test it
    as a bool; NEW == 1 keeps callers that wrote `if is_new` right as long as nothing
    confirms (only watch confirms, by ICMP).
    """

    COUNTED = 0  # an existing finding's count moved: update counts, not the screen
    NEW = 1  # a new finding: print it
    CONFIRMED = 2  # an existing finding is now confirmed (e.g. its ICMP came first): print


class Finding(Protocol):
    """What every detector's findings have in common."""

    @property
    def kind(self) -> FindingKind: ...

    @property
    def key(self) -> Hashable: ...


FindingT = TypeVar("FindingT", bound=Finding, covariant=True)


class Snapshot(Protocol[FindingT]):
    """A dump being examined (`Detector.snapshot`): `add` each chunk of entries in the
    dump's order, then `finish` once for the findings."""

    def add(self, entries: Sequence[CtEntry]) -> None: ...

    def finish(self) -> Sequence[tuple[FindingT, Change]]: ...


class Detector(Protocol[FindingT]):
    """One problem kind's detector (see the module docstring)."""

    @property
    def kind(self) -> FindingKind: ...

    def feed(self, event: CtEvent, now: float) -> tuple[FindingT, Change] | None:
        """One decoded event; the finding it made or changed, if any."""
        ...

    def examine(
        self, entries: Sequence[CtEntry], now: float, *, complete: bool = False
    ) -> Sequence[tuple[FindingT, Change]]:
        """A snapshot of the table (`complete`: the whole table, after every event that
        came before it was fed); the findings it made or changed."""
        ...

    def snapshot(self, now: float, *, complete: bool = False) -> Snapshot[FindingT]:
        """`examine` fed chunk by chunk: a dump read as it comes, never held whole
        (watch's start-up and resyncs); the same findings as `examine` of all chunks."""
        ...

    def expire(self, now: float) -> None:
        """Forget what the kernel has forgotten; call about once a second."""
        ...

    @property
    def found(self) -> Collection[FindingT]:
        """Every finding so far (one per key)."""
        ...


F = TypeVar("F", bound=Finding)
E = TypeVar("E")


def one_feed(
    detectors: Sequence[Detector[F]], report: Callable[[tuple[F, Change]], None]
) -> Callable[[CtEvent, float], tuple[F, Change] | None]:
    """The single `feed` a composer's hot loop calls for each event.

    With one detector it is that detector's bound `feed`, so composing costs nothing
    per event; with several, one function feeds each and reports what they find
    itself (it returns None, so the loop's own report never fires twice). Detectors
    that learn from dumps only (a true `snapshot_only` attribute) are left out.
    """
    fed = [d.feed for d in detectors if not getattr(d, "snapshot_only", False)]
    return _all_of(fed, report)


def _all_of(
    fed: Sequence[Callable[[E, float], tuple[F, Change] | None]],
    report: Callable[[tuple[F, Change]], None],
) -> Callable[[E, float], tuple[F, Change] | None]:
    """One feed of several (`one_feed`): itself for one."""
    if len(fed) == 1:
        return fed[0]
    feeds = tuple(fed)

    def feed_all(event: E, now: float) -> tuple[F, Change] | None:
        for feed in feeds:
            found = feed(event, now)
            if found is not None:
                report(found)
        return None

    return feed_all


#: the event kinds a detector gets unless it names its own (a `kinds` attribute)
ALL_KINDS = frozenset({NEW, UPDATE, DESTROY, DUMPED})


def _nothing(event: object, now: float) -> None:
    del event, now


def feeds_by_kind(
    detectors: Sequence[Detector[F]], report: Callable[[tuple[F, Change]], None]
) -> tuple[Callable[[CtEvent, float], tuple[F, Change] | None], ...]:
    """One `one_feed` per event kind, indexed by the kind (NEW, UPDATE, DESTROY,
    DUMPED; index 0 is unused): `feeds[event[0]](event, now)`.

    A detector that takes only some kinds says so in a `kinds` attribute (the
    unanswered detector: DESTROY). So the wrong-source detector alone still gets NEW
    and UPDATE events through its own bound `feed`: composing costs one tuple index
    per event, not a call per detector.
    """
    table: list[Callable[[CtEvent, float], tuple[F, Change] | None]] = [_nothing]
    for kind in (NEW, UPDATE, DESTROY, DUMPED):
        wanted = [d for d in detectors if kind in getattr(d, "kinds", ALL_KINDS)]
        table.append(one_feed(wanted, report) if wanted else _nothing)
    return tuple(table)


def packed_feeds_by_kind(
    detectors: Sequence[Detector[F]], report: Callable[[tuple[F, Change]], None]
) -> tuple[Callable[[Packed, float], tuple[F, Change] | None], ...]:
    """`feeds_by_kind` for events in the Packed form (ctfix.core.decode; watch's hot
    path): a detector's `feed_packed` where it has one (the wrong-source detector:
    NEW and UPDATE events build no entry), else its `feed` of the event built from it."""
    table: list[Callable[[Packed, float], tuple[F, Change] | None]] = [_nothing]
    for kind in (NEW, UPDATE, DESTROY, DUMPED):
        wanted = [
            _packed_feed(d)
            for d in detectors
            if kind in getattr(d, "kinds", ALL_KINDS) and not getattr(d, "snapshot_only", False)
        ]
        table.append(_all_of(wanted, report) if wanted else _nothing)
    return tuple(table)


def _packed_feed(detector: Detector[F]) -> Callable[[Packed, float], tuple[F, Change] | None]:
    fast: Callable[[Packed, float], tuple[F, Change] | None] | None = getattr(
        detector, "feed_packed", None
    )
    if fast is not None:
        return fast
    feed = detector.feed

    def converted(event: Packed, now: float) -> tuple[F, Change] | None:
        return feed(event_of(event), now)

    return converted


__all__ = [
    "ALL_KINDS",
    "UDP_TIMEOUT",
    "UDP_TIMEOUT_STREAM",
    "Change",
    "Detector",
    "Finding",
    "FindingKind",
    "Snapshot",
    "feeds_by_kind",
    "one_feed",
    "packed_feeds_by_kind",
]
