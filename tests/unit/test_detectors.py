"""The detector seam: every detector fits the protocol composers rely on, and
composing adds nothing to the hot path when there is one detector."""

from __future__ import annotations

import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from ctfix.core.decode import NEW, CtEntry, CtEvent, CtTuple
from ctfix.core.detectors import Change, Detector, one_feed
from ctfix.core.detectors.wrong_source import WrongSourceDetector, WrongSourceFinding

LOCAL = frozenset({"198.51.100.13", "192.0.2.1"})


def udp(src: str, sport: int, dst: str, dport: int) -> CtEvent:
    orig = CtTuple(src, dst, sport, dport, 17, socket.AF_INET)
    reply = CtTuple(dst, src, dport, sport, 17, socket.AF_INET)
    return CtEvent(NEW, CtEntry(orig, reply, timeout=30))


def test_wrong_source_is_a_detector_of_its_kind() -> None:
    detector: Detector[WrongSourceFinding] = WrongSourceDetector(local_addresses=LOCAL)
    assert detector.kind == "wrong-source"
    assert detector.feed(udp("192.0.2.3", 40000, "198.51.100.13", 53), 1.0) is None
    found = detector.feed(udp("192.0.2.1", 53, "192.0.2.3", 40000), 1.1)
    assert found is not None and found[1] is Change.NEW
    assert found[0].kind == "wrong-source"
    assert [f.key for f in detector.found] == [found[0].key]
    # The snapshot path: the same pair in a dump is the same finding, counted once.
    again = WrongSourceDetector(local_addresses=LOCAL)
    dump = [udp("192.0.2.3", 40000, "198.51.100.13", 53).entry,
            udp("192.0.2.1", 53, "192.0.2.3", 40000).entry]
    [(finding, change)] = again.examine(dump, 2.0)
    assert (finding.key, change) == (found[0].key, Change.NEW)


@dataclass(frozen=True)
class Seen:
    source: str
    kind: Literal["health"] = "health"

    @property
    def key(self) -> str:
        return self.source


class EveryNew:
    """A stand-in second detector: every NEW event is a finding of its own kind."""

    kind: Literal["health"] = "health"

    def __init__(self) -> None:
        self.seen: dict[str, Seen] = {}

    def feed(self, event: CtEvent, now: float) -> tuple[Seen, Change] | None:
        finding = Seen(event.entry.orig.src)
        self.seen[finding.key] = finding
        return finding, Change.NEW

    def examine(
        self, entries: Sequence[CtEntry], now: float, *, complete: bool = False
    ) -> list[tuple[Seen, Change]]:
        return []

    def snapshot(self, now: float, *, complete: bool = False) -> EveryNew:
        return self

    def add(self, entries: Sequence[CtEntry]) -> None:
        pass

    def finish(self) -> list[tuple[Seen, Change]]:
        return []

    def expire(self, now: float) -> None:
        pass

    @property
    def found(self) -> Collection[Seen]:
        return self.seen.values()


def test_one_detector_is_fed_directly_several_are_fanned_out() -> None:
    wrong_source = WrongSourceDetector(local_addresses=LOCAL)
    reported: list[tuple[Seen, Change]] = []
    # One: the composer's feed is the detector's own bound method (no extra call).
    assert one_feed([wrong_source], lambda found: None) == wrong_source.feed
    # Several: each is fed, every finding is reported once, the loop gets None.
    first, second = EveryNew(), EveryNew()
    feed = one_feed([first, second], reported.append)
    assert feed(udp("192.0.2.3", 40000, "198.51.100.13", 53), 1.0) is None
    assert [(f.kind, change) for f, change in reported] == [("health", Change.NEW)] * 2
