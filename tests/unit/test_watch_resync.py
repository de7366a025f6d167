"""The detector after lost events: what a resync from a dump must learn, forget and
count once. Built from hand-made entries (ids as the kernel's CTA_ID would give)."""

from __future__ import annotations

import math
import socket

from ctfix.core.decode import DUMPED, IPS_SEEN_REPLY, NEW, UPDATE, CtEntry, CtEvent, CtTuple
from ctfix.core.detectors import Change
from ctfix.core.detectors.wrong_source import WrongSourceDetector

SERVICE, BRIDGE, CLIENT = "198.51.100.13", "192.0.2.1", "192.0.2.3"


def entry(
    src: str, sport: int, dst: str, dport: int, *, ct_id: int | None, status: int = 0
) -> CtEntry:
    orig = CtTuple(src, dst, sport, dport, 17, socket.AF_INET)
    reply = CtTuple(dst, src, dport, sport, 17, socket.AF_INET)
    return CtEntry(orig, reply, status=status, timeout=30, id=ct_id)


def request(client_port: int, *, ct_id: int | None = None, status: int = 0) -> CtEntry:
    return entry(CLIENT, client_port, SERVICE, 53, ct_id=ct_id, status=status)


def bad_reply(client_port: int, *, ct_id: int | None = None) -> CtEntry:
    return entry(BRIDGE, 53, CLIENT, client_port, ct_id=ct_id)


def watching() -> WrongSourceDetector:
    """A detector past watch's start-up dump: a later dump's new findings are news."""
    d = WrongSourceDetector()
    d.dumps_are_history = False
    return d


def counts(d: WrongSourceDetector) -> dict[str, int]:
    return {f.service: f.count for f in d.findings.values()}


def test_a_reply_seen_as_an_event_and_in_the_dump_is_counted_once() -> None:
    d = watching()
    d.feed(CtEvent(NEW, request(4000, ct_id=1)), 1.0)
    assert d.feed(CtEvent(NEW, bad_reply(4000, ct_id=2)), 1.1) is not None
    assert d.resync([request(4000, ct_id=1), bad_reply(4000, ct_id=2)], 2.0, complete=True) == []
    assert counts(d) == {f"{SERVICE}:53": 1}


def test_a_reply_created_during_the_dump_and_then_seen_as_an_event_is_counted_once() -> None:
    d = watching()
    d.feed(CtEvent(NEW, request(4000, ct_id=1)), 1.0)
    found = d.resync([request(4000, ct_id=1), bad_reply(4000, ct_id=2)], 2.0, complete=True)
    assert [change for _f, change in found] == [Change.NEW]
    # Its NEW event was queued while the dump ran, and is read after it.
    assert d.feed(CtEvent(NEW, bad_reply(4000, ct_id=2)), 2.1) is None
    assert counts(d) == {f"{SERVICE}:53": 1}


def test_a_new_reply_entry_whose_event_was_lost_counts_again() -> None:
    d = watching()
    d.feed(CtEvent(NEW, request(4000, ct_id=1)), 1.0)
    d.feed(CtEvent(NEW, bad_reply(4000, ct_id=2)), 1.1)
    # The first reply entry expired, the server answered again: a new entry (new id)
    # for the same pair, its event lost.
    found = d.resync([request(4000, ct_id=1), bad_reply(4000, ct_id=3)], 40.0, complete=True)
    assert [(f.count, change) for f, change in found] == [(2, Change.COUNTED)]


def test_recovered_counts_requests_learnt_from_the_dump_not_replies() -> None:
    d = watching()
    d.feed(CtEvent(NEW, request(4000, ct_id=1)), 1.0)
    dump = [bad_reply(4001, ct_id=4), request(4000, ct_id=1), request(4001, ct_id=3)]
    found = d.resync(dump, 2.0, complete=True)
    assert [f.client for f, _new in found] == [f"{CLIENT}:4001"]
    assert d.stats.recovered == 1  # request 4001; 4000 was known, the reply is no request
    assert d.pending == 2


def test_a_complete_resync_forgets_requests_answered_while_events_were_lost() -> None:
    d = watching()
    d.feed(CtEvent(NEW, request(4000, ct_id=1)), 1.0)
    d.feed(CtEvent(NEW, request(4001, ct_id=2)), 1.0)
    d.feed(CtEvent(NEW, request(4002, ct_id=3)), 1.0)
    # Lost: 4000's UPDATE (answered correctly) and 4001's DESTROY.
    d.resync(
        [request(4000, ct_id=1, status=IPS_SEEN_REPLY), request(4002, ct_id=3)], 2.0, complete=True
    )
    assert d.pending == 1 and d.stats.stale == 2
    # The clients' later traffic from those ports is not taken for a wrong-source reply.
    assert d.feed(CtEvent(NEW, bad_reply(4000, ct_id=7)), 3.0) is None
    assert d.feed(CtEvent(NEW, bad_reply(4001, ct_id=8)), 3.0) is None
    assert d.feed(CtEvent(NEW, bad_reply(4002, ct_id=9)), 3.0) is not None


def test_a_partial_dump_only_adds() -> None:
    d = watching()
    d.feed(CtEvent(NEW, request(4000, ct_id=1)), 1.0)
    d.resync([request(4001, ct_id=2)], 2.0)
    assert d.pending == 2 and d.stats.stale == 0


def test_without_ids_a_dump_never_counts_a_known_pair_again() -> None:
    d = watching()
    d.feed(CtEvent(NEW, request(4000)), 1.0)
    d.feed(CtEvent(NEW, bad_reply(4000)), 1.1)
    assert d.resync([request(4000), bad_reply(4000)], 2.0) == []
    assert d.feed(CtEvent(DUMPED, bad_reply(4000)), 2.5) is None
    d.feed(CtEvent(UPDATE, request(4000)), 2.6)
    assert counts(d) == {f"{SERVICE}:53": 1}


def test_an_overflow_schedules_a_resync_that_later_overflows_do_not_postpone() -> None:
    from ctfix.commands.watch_ns import _resync_due

    first = _resync_due(None, 100.0, last_resync=-math.inf)
    assert first == 100.2
    assert _resync_due(first, 100.15, last_resync=-math.inf) == first
    # Right after a resync, the next one waits a second.
    assert _resync_due(None, 101.0, last_resync=100.9) == 101.9
