"""watch's filters, as `conntrack -E` and tcpdump users know them: `--port P`,
`--client CIDR`, `--service ADDR[:PORT]`. Pure.

Which findings they select (every kind): values of one option are alternatives
(`--port 53 --port 123`: either), options narrow each other (`--port 53 --client
10.0.0.0/8`: both). The service (the address:port clients sent to) is part of every
finding's key, so `--port` and `--service` select whole findings. `--client` selects
by the client that made or changed the finding: a wrong-source or unanswered finding
is shown once a reply to (a request from) a selected client counts in it, and its
counts are the finding's own (every client of its aggregate); a stale-nat finding by
the clients still pinned to the stale target.

Know before changing: the filters act on findings, not on conntrack events, because
a wrong-source reply's own tuple is not the service's (its source is the wrong
address, its destination the client's port): an event filter by port or address
would drop exactly the replies watch exists to see. The one event filter
(`Selection.requests`) is for the unanswered detector, whose findings are keyed by
the request's own original destination, so dropping the requests of other services
before it classifies them selects the same findings and counts (tested in
tests/unit/test_watch_filter.py).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ctfix.core.addr import parse_endpoint, unmap
from ctfix.core.decode import CtEntry, CtEvent

if TYPE_CHECKING:
    from ctfix.core.detectors import Change
    from ctfix.core.detectors.stale_nat import StaleNatFinding
    from ctfix.core.detectors.unanswered import (
        UnansweredDetector,
        UnansweredFinding,
        UnansweredSnapshot,
    )
    from ctfix.core.detectors.wrong_source import WrongSourceFinding

    AnyFinding = WrongSourceFinding | StaleNatFinding | UnansweredFinding

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> str:
    """An address as the decoder prints it (inet_ntop's form), IPv4-mapped ones as the
    IPv4 address they carry (as `endpoint` prints them); ValueError if it is none."""
    ip = ipaddress.ip_address(text)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return unmap(socket.inet_ntop(family, ip.packed))


def parse_client(text: str) -> Network:
    """`--client CIDR`: a network (an address alone is one host); ValueError when it is
    not one."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an address or a network (e.g. 192.0.2.0/24, 2001:db8::/32)"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:  # ::ffff:a.b.c.d/128: the IPv4 client it stands for
            return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


def parse_service(text: str) -> tuple[str, int | None]:
    """`--service ADDR[:PORT]` (`[V6]:PORT` with a port): (address, port or None);
    ValueError when it is neither."""
    raw = text.strip()
    port: int | None = None
    try:
        if raw.startswith("[") or raw.count(":") == 1:
            raw, port = parse_endpoint(raw)
        address = _address(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not ADDRESS, ADDRESS:PORT or [IPv6]:PORT") from None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: the port must be 1-65535")
    return address, port


def _split(endpoint_text: str) -> tuple[str, int] | None:
    try:
        address, port = parse_endpoint(endpoint_text)
    except ValueError:
        return None
    return unmap(address), port


@dataclass(frozen=True, slots=True)
class Selection:
    """The filters of one watch; empty: everything is selected."""

    ports: frozenset[int] = frozenset()
    clients: tuple[Network, ...] = ()
    services: tuple[tuple[str, int | None], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.ports or self.clients or self.services)

    @property
    def by_service(self) -> bool:
        return bool(self.ports or self.services)

    def service_selected(self, address: str, port: int) -> bool:
        """Whether a service (the address and port clients sent to) is selected."""
        if self.ports and port not in self.ports:
            return False
        if self.services:
            return any(
                address == want and (want_port is None or want_port == port)
                for want, want_port in self.services
            )
        return True

    def client_selected(self, address: str) -> bool:
        if not self.clients:
            return True
        try:
            ip = ipaddress.ip_address(unmap(address))
        except ValueError:
            return False
        return any(ip.version == net.version and ip in net for net in self.clients)

    def selects(self, finding: AnyFinding) -> bool:
        """Whether a finding, as it stands now, is one the user asked for."""
        if self.empty:
            return True
        service = _split(finding.service)
        if service is None or not self.service_selected(*service):
            return False
        if not self.clients:
            return True
        if finding.kind == "stale-nat":
            pinned = (_split(p.client) for p in finding.pinned)
            return any(c is not None and self.client_selected(c[0]) for c in pinned)
        client = _split(finding.client)
        return client is not None and self.client_selected(client[0])

    def requests(self, detector: UnansweredDetector) -> UnansweredDetector | ServiceRequests:
        """The unanswered detector, fed only the requests of selected services (module
        doc); itself when no service filter is given."""
        return ServiceRequests(detector, self) if self.by_service else detector


class ServiceRequests:
    """The unanswered detector behind a service filter: a request to a service that is
    not selected is dropped before it is classified (the detector's protocol, so that
    watch composes it like the detector itself)."""

    kind: Literal["unanswered"] = "unanswered"

    def __init__(self, detector: UnansweredDetector, selection: Selection) -> None:
        self.detector = detector
        self.kinds = detector.kinds
        self._selected = selection.service_selected
        self._snapshot: UnansweredSnapshot | None = None

    def feed(self, event: CtEvent, now: float) -> tuple[UnansweredFinding, Change] | None:
        orig = event[1].orig
        if not self._selected(orig.dst, orig.dport):
            return None
        return self.detector.feed(event, now)

    def examine(
        self, entries: Sequence[CtEntry], now: float, *, complete: bool = False
    ) -> Sequence[tuple[UnansweredFinding, Change]]:
        selected = self._selected
        chosen = [e for e in entries if selected(e.orig.dst, e.orig.dport)]
        return self.detector.examine(chosen, now, complete=complete)

    def snapshot(self, now: float, *, complete: bool = False) -> ServiceRequests:
        self._snapshot = self.detector.snapshot(now, complete=complete)
        return self

    def add(self, entries: Sequence[CtEntry]) -> None:
        """A chunk of the snapshot begun by `snapshot` (the selected services' entries)."""
        selected = self._selected
        assert self._snapshot is not None, "snapshot() first"
        self._snapshot.add([e for e in entries if selected(e.orig.dst, e.orig.dport)])

    def finish(self) -> list[tuple[UnansweredFinding, Change]]:
        assert self._snapshot is not None, "snapshot() first"
        snapshot, self._snapshot = self._snapshot, None
        return snapshot.finish()

    def expire(self, now: float) -> None:
        self.detector.expire(now)

    @property
    def found(self) -> Collection[UnansweredFinding]:
        return self.detector.found


def selection(
    ports: Sequence[int] = (),
    clients: Sequence[Network] = (),
    services: Sequence[tuple[str, int | None]] = (),
) -> Selection:
    return Selection(frozenset(ports), tuple(clients), tuple(services))

