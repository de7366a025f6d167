"""watch's start-up and resync dumps are fed to the detectors chunk by chunk
(`snapshot`), never held whole: the findings and what the detectors keep must be
those of `examine` on the whole dump, whatever the chunk size and the dump's order
(a wrong-source reply's entry may come before its request's)."""

from __future__ import annotations

import random
import socket

from ctfix.core.compact import CompactEntries
from ctfix.core.decode import IPS_SEEN_REPLY, CtEntry, CtTuple
from ctfix.core.detectors.unanswered import UnansweredDetector
from ctfix.core.detectors.wrong_source import WrongSourceDetector

LOCAL = frozenset({"198.51.100.13", "198.51.100.14", "2001:db8::13", "2001:db8::14"})


def entry(
    src: str, sport: int, dst: str, dport: int, *, ct_id: int | None, status: int = 0,
    family: int = socket.AF_INET, start: int | None = None, timeout: int | None = 30,
) -> CtEntry:
    orig = CtTuple(src, dst, sport, dport, 17, family)
    reply = CtTuple(dst, src, dport, sport, 17, family)
    return CtEntry(orig, reply, status=status, timeout=timeout, id=ct_id, start=start)


def table(seed: int) -> list[CtEntry]:
    """A table as a dump gives it: requests (some answered), wrong-source replies from
    another local address, noise; shuffled like a hash table's order."""
    rows: list[CtEntry] = []
    ct_id = 1
    for family, service, other, client in (
        (socket.AF_INET, "198.51.100.13", "198.51.100.14", "203.0.113."),
        (socket.AF_INET6, "2001:db8::13", "2001:db8::14", "2001:db8:1::"),
    ):
        for n in range(300):
            address = f"{client}{n % 50 + 1}"
            port = 20000 + n
            status = IPS_SEEN_REPLY if n % 7 == 0 else 0
            start = None if n % 5 == 0 else 1_700_000_000_000_000_000 + n
            rows.append(entry(address, port, service, 53, ct_id=ct_id, status=status,
                              family=family, start=start))
            ct_id += 1
            if n % 3 == 0:  # its reply from the wrong address
                rows.append(entry(other, 53, address, port, ct_id=ct_id, family=family,
                                  start=start, timeout=None if n % 2 else 29))
                ct_id += 1
            if n % 11 == 0:  # without an id
                rows.append(entry(address, port + 1000, service, 5353, ct_id=None,
                                  family=family))
    random.Random(seed).shuffle(rows)
    return rows


def detector() -> WrongSourceDetector:
    return WrongSourceDetector(local_addresses=LOCAL)


def test_entries_kept_as_bytes_come_back_equal() -> None:
    rows = table(1)
    kept = CompactEntries()
    for row in rows:
        kept.append(row)
    assert list(kept) == rows
    assert len(kept) == len(rows) and kept.nbytes < 110 * len(rows)


def test_a_wrong_source_snapshot_in_chunks_finds_what_a_whole_resync_finds() -> None:
    for seed in range(4):
        rows = table(seed)
        whole = detector()
        expected = whole.resync(rows, 100.0, complete=True)
        assert expected  # the table has wrong-source replies, before and after requests
        for size in (1, 7, 2048):
            streamed = detector()
            snapshot = streamed.snapshot(100.0, complete=True)
            for at in range(0, len(rows), size):
                snapshot.add(rows[at : at + size])
            assert snapshot.finish() == expected
            assert streamed._pending == whole._pending
            assert streamed.stats == whole.stats
            assert streamed.history == whole.history


def test_a_snapshot_from_nothing_pending_is_one_onto_pending_requests() -> None:
    """watch's start-up (nothing pending yet) keeps no record of what the dump stored:
    the same findings and requests as a complete dump onto a detector that already
    waits for an unrelated request (which that dump forgets), and the same again when
    it repeats what the detector already holds (a resync after lost events)."""
    rows = table(9)
    fresh = detector()
    expected = fresh.resync(rows, 100.0, complete=True)
    waiting = detector()
    unrelated = entry("203.0.113.200", 999, "198.51.100.13", 53, ct_id=10_000)
    key = waiting._remember(unrelated, 1.0)
    assert key is not None and waiting.pending == 1
    assert waiting.resync(rows, 100.0, complete=True) == expected
    # the unrelated request is not in the (complete) dump: answered or gone meanwhile
    assert key not in waiting._pending and waiting.stats.stale == 1
    # the same requests (deadlines count from each detector's first request)
    assert {k: v[:-4] for k, v in waiting._pending.items()} == {
        k: v[:-4] for k, v in fresh._pending.items()
    }
    assert waiting.stats.recovered == fresh.stats.recovered
    # the same dump again: nothing new, nothing stale, the same requests
    pending = dict(waiting._pending)
    assert waiting.resync(rows, 100.0, complete=True) == []  # the same replies (ids)
    assert waiting._pending == pending and waiting.stats.stale == 1
    # a second later, the kernel's timeouts as they were (whole seconds round both
    # ways): the same requests, kept once, in the same expiry order
    order = len(waiting._order)
    assert waiting.resync(rows, 101.0, complete=True) == []
    assert waiting._pending == pending and len(waiting._order) == order


def test_an_unanswered_snapshot_in_chunks_counts_what_examine_counts() -> None:
    rows = table(5)
    rows += rows[:40]  # a dump can repeat entries (the table grew while it ran)
    for remember in (False, True):
        whole = UnansweredDetector(local_addresses=LOCAL, remember=remember)
        expected = whole.examine(rows, 100.0, complete=True)
        assert expected
        streamed = UnansweredDetector(local_addresses=LOCAL, remember=remember)
        snapshot = streamed.snapshot(100.0, complete=True)
        for at in range(0, len(rows), 13):
            snapshot.add(rows[at : at + 13])
        assert snapshot.finish() == expected
        assert streamed.findings == whole.findings
