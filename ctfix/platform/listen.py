"""`explain --listen S`: conntrack events of the port for S seconds, as live evidence
(the wrong-source replies that happened meanwhile, the requests that came, the
entries that ended unreplied), with tracking switched on first where the command
asks for it.

Know before changing: what happened from the subscription on is news, even when the
first dump shows it before its event is read (`fresh_ids`); everything the dump shows
otherwise is history (ctfix.core.detectors.wrong_source's module doc).
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctfix.core.decode import DESTROY, NEW, CtEntry, CtEvent
from ctfix.core.diagnosis import newest_last, wrong_source_reply
from ctfix.core.diagnosis.requests import client_networks_of, usable_addresses
from ctfix.core.model import WrongSourceReply
from ctfix.core.snapshot import LocalAddress
from ctfix.platform.port_flows import conntrack_flows

if TYPE_CHECKING:
    from ctfix.core.rules import KnowledgeBase
    from ctfix.platform.conntrack import EventSocket


def _ours(service: str, expected_source: str, port: int) -> bool:
    # A DNAT'd request names the port it was sent to; the server's port is expected.
    return service.endswith(f":{port}") or expected_source.endswith(f":{port}")


@dataclass(frozen=True, slots=True)
class Listened:
    """What `listen` saw: the port's wrong-source replies that happened meanwhile, how
    many new requests reached the port (a quiet port proves nothing either way), and
    the families `track` switched tracking on for."""

    since: float  # when listening began (seconds since the epoch)
    seconds: float
    findings: tuple[WrongSourceReply, ...]
    requests: int
    switched: tuple[str, ...] = ()
    #: the port's entries that ended without a reply meanwhile (DESTROY events, which
    #: the kernel filter passes only for unreplied entries)
    ended: tuple[CtEntry, ...] = ()


def _request_to(entry: CtEntry, port: int, local: frozenset[str]) -> bool:
    """A remote client's new flow to the port, or DNAT'd to it on a local address."""
    orig = entry.orig
    return (
        orig.proto == 17
        and orig.src not in local
        and (orig.dport == port or (entry.reply.sport == port and entry.reply.src in local))
    )


def listen(
    port: int,
    seconds: float,
    addresses: Sequence[LocalAddress],
    kb: KnowledgeBase | None = None,
    track: Callable[[Sequence[str]], tuple[str, ...]] | None = None,
) -> Listened:
    """Watch conntrack events for `seconds`; the wrong-source replies of the port
    that happened meanwhile, and the families `track` switched tracking on for.

    `track` is called once subscribed (so that nothing it makes visible is missed),
    with the families clients can reach (a global address of theirs is here): it
    switches tracking on where it is off and says for which families. What happened
    from the subscription on is news, even when the first dump shows it before its
    event is read (`fresh_ids`).
    """
    from ctfix.core.detectors.wrong_source import WrongSourceDetector
    from ctfix.platform import conntrack
    from ctfix.platform.programs import OtherPortPrograms

    detector = WrongSourceDetector(
        local_addresses=frozenset(a.address for a in addresses),
        networks=client_networks_of(addresses),
        other_port=OtherPortPrograms(kb),
    )
    events = conntrack.EventSocket(
        groups=(
            conntrack.NFNLGRP_CONNTRACK_NEW,
            conntrack.NFNLGRP_CONNTRACK_UPDATE,
            conntrack.NFNLGRP_CONNTRACK_DESTROY,
        )
    )
    local = frozenset(a.address for a in addresses)
    detector.since = since = time.time()  # subscribed: only what happens from here is news
    switched: tuple[str, ...] = ()
    requests = 0
    ended: list[CtEntry] = []

    def feed(event: CtEvent, now: float) -> int:
        """Feed one event; 1 when it is a new request to the port."""
        entry = event.entry
        ended_here = port in (entry.orig.dport, entry.reply.sport)
        if event.kind == DESTROY and not entry.seen_reply and ended_here:
            ended.append(entry)
        detector.feed(event, now)
        return int(event.kind == NEW and _request_to(entry, port, local))

    try:
        if track is not None:
            reachable = [f for f in ("ipv4", "ipv6") if usable_addresses(addresses, f)]
            switched = track(reachable)
        # The first dump teaches the detector the requests already waiting; its other
        # findings are the table's (history), but for entries whose NEW event is
        # queued (made since the subscription): those are fed after it. The queue is
        # read after the dump: an entry made between a drain and the dump would be in
        # the dump without its event in the queue, and taken for history.
        dumped = newest_last(conntrack_flows(port))
        queued = _queued(events)
        detector.fresh_ids = {e.entry.id for e in queued if e.kind == NEW and e.entry.id}
        detector.resync(dumped, now=time.time())
        detector.dumps_are_history = False
        now = time.time()
        for event in queued:
            requests += feed(event, now)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([events], [], [], min(left, 0.5))
            if not readable:
                continue
            try:
                batch = events.read()
            except conntrack.Overflow:
                detector.resync(newest_last(conntrack_flows(port)), now=time.time())
                continue
            now = time.time()
            for event in batch:
                requests += feed(event, now)
    finally:
        events.close()
    live = tuple(
        wrong_source_reply(f)
        for f in detector.findings.values()
        if _ours(f.service, f.expected_source, port)
    )
    return Listened(since, seconds, live, requests, switched, tuple(ended))


def _queued(events: EventSocket) -> list[CtEvent]:
    """The events waiting on the socket (a loss is covered by the dump that follows)."""
    from ctfix.platform import conntrack

    queued: list[CtEvent] = []
    while True:
        try:
            batch = events.read()
        except conntrack.Overflow:
            return queued
        if not batch:
            return queued
        queued.extend(batch)
