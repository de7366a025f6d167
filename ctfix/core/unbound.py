"""Requests to ports with nothing bound: scan's bounded summary of them, counted from
the conntrack dump scan takes anyway. Pure.

`ctfix explain PORT` reports a port with nothing bound (`unanswered-no-socket`), but
scan lists services, so requests arriving where nothing listens would be invisible
there; listing each such port as a service would flood a real host with port-scan
noise. So scan counts them per (family, service address:port), worst first, lists
at most `LIMIT` and says how many more. Information, not a verdict: it changes no
count and no exit status (scan's or check's).

What is counted: an entry that never saw a reply, from a remote client to a local
address of this namespace, not NATted (the unanswered detector's request,
ctfix.core.detectors.flows.is_request, on its plainest path), to a port no socket of
the namespace is bound to (the detector's `no-socket` when no socket at all is on
the port), that scan does not already list, and that the knowledge base does not
give only to one-way services (syslog, StatsD: their senders expect no reply).
`clients` counts client hosts (addresses), as the detector's records do.

Know before changing: this is a tally, not the detector: the detector costs
microseconds a flow and a port scan can leave 200k entries, so the count is made while
the dump streams past, mostly on raw values the decoder hands over without building
the entry (`UnboundTally.count_raw`; `tee` for the entries it builds), and nothing is
kept but the counts. For a port with nothing bound the detector gives `no-socket` to
exactly these requests, so `ctfix explain PORT` counts the same (a netns test compares
them); a request another port answered (explain's rarer `wrong-source`) is not looked
for here.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctfix.core.addr import endpoint, unmap
from ctfix.core.decode import IPS_SEEN_REPLY, CtEntry
from ctfix.core.model import Family

if TYPE_CHECKING:
    from ctfix.core.rules import KnowledgeBase

#: at most this many services are listed; the rest are counted (`more`)
LIMIT = 10

UDP = 17


@dataclass(frozen=True, slots=True)
class UnboundService:
    """Unreplied requests to one address:port with nothing bound."""

    family: Family
    service: str  # the address:port the clients sent to
    flows: int  # unreplied requests (conntrack entries)
    clients: int  # distinct client hosts among them


@dataclass(frozen=True, slots=True)
class UnboundSummary:
    """The worst `LIMIT` services, how many more there are, or why none could be
    counted (`error`: the conntrack table could not be read)."""

    services: tuple[UnboundService, ...] = ()
    more: int = 0
    error: str | None = None


class UnboundTally:
    """Counts requests to ports with nothing bound as a dump streams past.

    The gatherer (ctfix.platform.snapshot.collect_services) says what is local, bound
    and listed (`begin`), hands the dump's decoder `count_raw` (the entries it does not
    build) and passes the entries it builds through `tee`, and sets `error` when the
    dump failed; the command then asks for the `summary`. Addresses are kept packed
    (as inet_pton gives them) and formatted once, in the summary."""

    def __init__(self) -> None:
        self.skip: frozenset[int] = frozenset()  # bound or listed ports
        self.error: str | None = None
        self._local: frozenset[bytes] = frozenset()
        self._flows: dict[tuple[int, bytes, int], int] = {}
        self._clients: dict[tuple[int, bytes, int], set[bytes]] = {}

    def begin(self, local: Iterable[str], bound: Iterable[int], listed: Iterable[int]) -> None:
        """What the namespace holds: its addresses, the ports any UDP socket is bound
        to, the ports scan lists."""
        self._local = frozenset(packed for a in local if (packed := _packed(a)) is not None)
        self.skip = frozenset(bound) | frozenset(listed)

    def count_raw(self, family: int, src: bytes, dst: bytes, dport: int) -> None:
        """Count an unreplied, not NATted UDP entry (its orig tuple's values) when it is
        a remote client's request to a local port with nothing bound."""
        if dport in self.skip or dst not in self._local or src in self._local:
            return
        key = (family, dst, dport)
        flows = self._flows.get(key)
        if flows is None:
            self._flows[key] = 1
            self._clients[key] = {src}
        else:
            self._flows[key] = flows + 1
            self._clients[key].add(src)

    def count(self, entry: CtEntry) -> None:
        """`count_raw` for an entry the dump built."""
        orig, reply = entry.orig, entry.reply
        if (
            entry.status & IPS_SEEN_REPLY
            or orig.proto != UDP
            or orig.dport in self.skip
            or reply.src != orig.dst
            or reply.sport != orig.dport
        ):
            return
        src, dst = _packed(orig.src), _packed(orig.dst)
        if src is not None and dst is not None:
            self.count_raw(orig.family, src, dst, orig.dport)

    def tee(self, entries: Iterable[CtEntry], touching: frozenset[int]) -> Iterator[CtEntry]:
        """Count every entry; pass on those whose orig sport, orig dport or reply sport
        is in `touching` (the dump's own choice: an entry it built for this count
        alone, in an unusual layout, goes no further)."""
        for entry in entries:
            self.count(entry)
            orig = entry.orig
            if (
                orig.sport in touching
                or orig.dport in touching
                or entry.reply.sport in touching
            ):
                yield entry

    def summary(self, kb: KnowledgeBase | None, limit: int = LIMIT) -> UnboundSummary:
        """Most requests first (then most clients, then by service); a port the
        knowledge base gives only to one-way services left out."""
        if self.error is not None:
            return UnboundSummary(error=self.error)
        one_way = {port: _one_way(kb, port) for _family, _address, port in self._flows}
        found = [
            UnboundService(
                "ipv6" if family == socket.AF_INET6 else "ipv4",
                endpoint(_text(address), port),
                flows,
                len({unmap(_text(client)) for client in self._clients[family, address, port]}),
            )
            for (family, address, port), flows in self._flows.items()
            if not one_way[port]
        ]
        found.sort(key=lambda s: (-s.flows, -s.clients, s.family, s.service))
        return UnboundSummary(tuple(found[:limit]), max(0, len(found) - limit))


def _one_way(kb: KnowledgeBase | None, port: int) -> bool:
    """The knowledge base names the port for one-way services only (syslog on 514)."""
    rules = kb.by_port(port) if kb is not None else ()
    return bool(rules) and all(rule.one_way for rule in rules)


def _packed(address: str) -> bytes | None:
    """An address as conntrack's attributes carry it (None: not an address)."""
    text = address.split("%", 1)[0]
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except OSError:
        return None


def _text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(packed) == 16 else socket.AF_INET, packed)
