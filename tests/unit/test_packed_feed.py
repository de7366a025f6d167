"""watch's hot path feeds events in the Packed form (addresses and ports as the
kernel's bytes): the detectors must end up with the same findings and state as when
fed the same events as CtEvents, whatever the mix (requests, wrong-source replies,
answered and destroyed flows, other protocols, IPv4 and IPv6, local or not)."""

from __future__ import annotations

import random
import socket
from typing import Any

from ctfix.core import decode
from ctfix.core.decode import (
    DESTROY,
    DUMPED,
    IPS_SEEN_REPLY,
    NEW,
    UPDATE,
    CtEntry,
    CtEvent,
    CtTuple,
)
from ctfix.core.detectors import Detector, feeds_by_kind, packed_feeds_by_kind
from ctfix.core.detectors.unanswered import UnansweredDetector
from ctfix.core.detectors.wrong_source import WrongSourceDetector

LOCAL = frozenset(
    {"198.51.100.13", "198.51.100.14", "2001:db8::13", "2001:db8::14", "fe80::1%eth0"}
)


def events(seed: int, count: int = 3000) -> list[CtEvent]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        v6 = rng.random() < 0.3
        family = socket.AF_INET6 if v6 else socket.AF_INET
        service = rng.choice(["2001:db8::13", "2001:db8::14", "2001:db8:5::9"] if v6
                             else ["198.51.100.13", "198.51.100.14", "192.0.2.77", "224.0.0.251"])
        client = (f"2001:db8:1::{rng.randrange(1, 9)}" if v6
                  else f"203.0.113.{rng.randrange(1, 9)}")
        cport = rng.randrange(20000, 20040)
        dport = rng.choice([53, 69, 123])
        target = service if rng.random() < 0.8 else ("2001:db8::99" if v6 else "198.51.100.99")
        if rng.random() < 0.3:  # a reply from the server, maybe from the wrong source
            source = rng.choice(["2001:db8::13", "2001:db8::14"] if v6
                                else ["198.51.100.13", "198.51.100.14"])
            orig = CtTuple(source, client, rng.choice([dport, 40000]), cport, 17, family)
        else:
            orig = CtTuple(client, service, cport, dport, 17, family)
        reply = CtTuple(target if orig.src == client else orig.dst, orig.src,
                        orig.dport, orig.sport, orig.proto, family)
        if rng.random() < 0.05:
            orig = orig._replace(proto=6)
            reply = reply._replace(proto=6)
        status = IPS_SEEN_REPLY if rng.random() < 0.2 else 0
        entry = CtEntry(orig, reply, status=status, zone=0,
                        timeout=rng.choice([None, 30, 120]), id=n + 1,
                        start=rng.choice([None, 1_700_000_000_000_000_000 + n]))
        kind = rng.choices([NEW, UPDATE, DESTROY, DUMPED], [6, 2, 2, 1])[0]
        out.append(CtEvent(kind, entry))
    return out


def test_the_wrong_source_detector_fed_packed_events_ends_as_fed_events() -> None:
    for seed in range(5):
        by_event = WrongSourceDetector(local_addresses=LOCAL)
        by_bytes = WrongSourceDetector(local_addresses=LOCAL)
        if seed == 4:  # without local addresses every flow may be a request
            by_event.local_addresses = by_bytes.local_addresses = frozenset()
        found = 0
        for step, event in enumerate(events(seed)):
            now = 1000.0 + step * 0.01
            expected = by_event.feed(event, now)
            got = by_bytes.feed_packed(decode.packed_of(event.entry, event.kind), now)
            assert got == expected
            found += expected is not None
        assert found  # the mix has wrong-source replies
        assert by_bytes._pending == by_event._pending
        assert list(by_bytes._order) == list(by_event._order)
        assert by_bytes.stats == by_event.stats
        assert by_bytes.findings == by_event.findings


def test_composed_packed_feeds_report_what_composed_feeds_report() -> None:
    reports: dict[str, list[Any]] = {}
    for name in ("event", "packed"):
        wrong = WrongSourceDetector(local_addresses=LOCAL)
        unanswered = UnansweredDetector(local_addresses=LOCAL, wrong=wrong)
        detectors: list[Detector[Any]] = [wrong, unanswered]
        seen: list[Any] = []
        for step, event in enumerate(events(7)):
            now = 1000.0 + step * 0.01
            if name == "packed":
                found = packed_feeds_by_kind(detectors, seen.append)[event.kind](
                    decode.packed_of(event.entry, event.kind), now
                )
            else:
                found = feeds_by_kind(detectors, seen.append)[event.kind](event, now)
            if found is not None:
                seen.append(found)
        reports[name] = seen
    assert reports["packed"] == reports["event"]
    assert any(finding.kind == "unanswered" for finding, _change in reports["event"])
