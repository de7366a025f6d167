"""The wrong-source detector's snapshot: one dump fed chunk by chunk (watch's start-up
and resyncs, which never hold the table). Pure. `WrongSourceDetector.snapshot` makes
one; `WrongSourceDetector.resync` is a snapshot of a list.

Know before changing: it works on the detector's own state (pending requests, its
matching rule), as `resync` did in one piece; it is apart only to keep
wrong_source.py readable. tests/unit/test_snapshot_stream.py holds it to `resync`'s
results for any chunking and order.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from ctfix.core.compact import CompactEntries
from ctfix.core.decode import IPS_SEEN_REPLY, CtEntry
from ctfix.core.detectors import Change

if TYPE_CHECKING:
    from ctfix.core.detectors.wrong_source import WrongSourceDetector, WrongSourceFinding


class WrongSourceSnapshot:
    """One dump, chunk by chunk, for a WrongSourceDetector (its `snapshot`).

    Two passes, as the dump's order is the hash table's (a reply may come before its
    request): `add` stores every unreplied entry as a pending request and keeps each
    entry; `finish` matches the kept entries, in order, against what is pending then,
    and undoes the requests that turned out to be replies. Only entries whose original
    destination is pending are built again (what `_match` would look up first).
    """

    def __init__(
        self,
        detector: WrongSourceDetector,
        now: float,
        complete: bool,
        time_of: Callable[[CtEntry], float] | None,
        keep: list[CtEntry] | None,
    ) -> None:
        self.detector = detector
        self.now = now
        self.complete = complete
        self.time_of = time_of
        self._kept = keep
        self._compact = CompactEntries() if keep is None else None
        # key -> the value it had before this dump (None: not pending), for every key
        # the dump stored anew or changed. A reply is only known to be one once its
        # request is stored, and the dump's order is the hash table's: store all, then
        # undo the replies. Not kept when nothing was pending (watch's start-up): then
        # every pending key is one the dump stored, its value before None.
        self.before: dict[bytes, bytes | None] = {}
        self.fresh = not detector._pending
        # complete: the keys pending before the dump that it has not stored (yet); what
        # is left at the end was answered or destroyed while events were lost
        self.unseen: dict[bytes, None] | None = (
            dict.fromkeys(detector._pending) if complete and not self.fresh else None
        )

    def add(self, entries: Iterable[CtEntry]) -> None:
        """Some of the dump's entries, in its order."""
        detector = self.detector
        pending = detector._pending
        before = self.before
        compact = self._compact
        remember = detector._remember
        now = self.now
        udp = socket.IPPROTO_UDP
        fresh = self.fresh
        unseen = self.unseen
        for entry in entries:
            if entry.orig.proto != udp:
                continue
            # Only unreplied entries can be requests still waiting; any entry can be a
            # reply (a TFTP client ACKs the new port's DATA: that reply entry is replied).
            if fresh:
                if not entry.status & IPS_SEEN_REPLY:
                    remember(entry, now)
            elif not entry.status & IPS_SEEN_REPLY:
                previous = pending.get(detector._key(entry))
                key = remember(entry, now)
                if key is not None:
                    if unseen is not None:
                        unseen.pop(key, None)
                    # Unchanged (the same value object): nothing to undo, nothing to keep.
                    if key not in before and pending.get(key) is not previous:
                        before[key] = previous
            if compact is not None:
                compact.append(entry)

    def _stored(self) -> Iterator[CtEntry]:
        """The entries added that are worth a `_match` (all, when the caller kept them)."""
        if self._compact is None:
            udp = socket.IPPROTO_UDP
            yield from (e for e in self._kept or () if e.orig.proto == udp)
            return
        pending = self.detector._pending
        compact = self._compact
        for probe, offset in compact.probes():
            if probe in pending:
                yield compact.entry_at(offset)

    def finish(self) -> list[tuple[WrongSourceFinding, Change]]:
        """Match what was added; the findings it made or changed."""
        detector = self.detector
        pending = detector._pending
        before = self.before
        time_of = self.time_of
        fresh = self.fresh
        results = []
        for entry in self._stored():
            found = detector._match(entry, time_of(entry) if time_of else self.now, from_dump=True)
            if found is not None:
                results.append(found)
            if not detector._matched:
                continue
            key = detector._key(entry)
            value = pending.get(key)
            if value is None or not detector._made_by(value, entry):
                continue
            if fresh:
                del pending[key]
            elif key in before:
                previous = before[key]
                if previous is None:
                    del pending[key]
                    del before[key]
                else:
                    pending[key] = previous  # what was there before it is not stale
        self._compact = self._kept = None
        if fresh:
            detector.stats.recovered += len(pending)
            return results
        if self.unseen is not None:
            stale = [key for key in self.unseen if key in pending]
            for key in stale:
                del pending[key]
            detector.stats.stale += len(stale)
            self.unseen = None
        detector.stats.recovered += sum(
            1 for key, previous in before.items() if previous is None and key in pending
        )
        self.before = {}
        return results
