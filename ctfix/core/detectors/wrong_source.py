"""The wrong-source detector: conntrack events (and dumps) -> findings of UDP replies
that leave from another address or port than the client sent to. Pure: no sockets,
no clock. It follows the ctfix.core.detectors protocol (kind "wrong-source").

The rule. A request creates an unreplied entry C:q -> B:p whose reply tuple says the
answer is expected from B':p' and addressed to C':q' (reply.src:sport, reply.dst:dport,
after any NAT of the request). While it is unreplied, a *new* entry whose original
tuple goes to C':q' is the server answering on a flow conntrack could not match:
it is a wrong-source reply when its source, as it leaves after its own NAT
(its reply tuple's dst:dport), is not B':p'. The source port is compared too but not
required to match: a server that answers from another port (TFTP-like) is reported.

Port-changing protocols. A program that answers from another port by design (TFTP's
transfer id, RFC 1350; the knowledge base's `replies_from_other_port`) is named by the
caller's `other_port(server_port)`: its reply from the addressed address but another
port is an answer, not a finding; one from another address is a finding whose actual
source is the address alone (aggregated per address, so that transfers, each from a
new port, do not multiply findings).

History and news. A finding made from an event happened while the caller watched
(`existing` False). One made from a dump is `existing` (it was in the table before)
when the kernel's timestamp of the reply entry (CTA_TIMESTAMP, where
nf_conntrack_timestamp is on) is before `since`, or, without a timestamp, while
`dumps_are_history` (watch's start-up dump: True; its resync dumps after lost events:
False, since the start-up dump already showed everything older). Existing findings
are kept apart from live ones (`history` and `findings`), each aggregated on its own,
and carry the kernel's times where it gave them, else None: never a made-up time.

What is a request, when the namespace's addresses are known (`local_addresses`): a
client is remote (C is not local) and it addressed this namespace (B is local) or a
service DNAT'd behind it (B':p' differs from B:p). Everything else is not a request:
the server's own outgoing flows, i.e. its wrong-source replies and the snat-zone
remedy's zoned replies (their C is local: taken as requests, the next client of B:p
would look like their reply), the namespace's own clients, forwarded flows that
nothing here NATs, directed broadcasts. Without local addresses every unreplied
entry is a candidate (the pure rule, for tests and for callers that cannot list them).

Know before changing (over 500 lines on purpose: this docstring is the rule's
specification, and the rest is one detector whose packed memory of pending requests
and matching against it are one piece of the hot path; the matching rule has two
entries, `feed` for CtEvents and `feed_packed` for watch's hot path, which must agree):
- Memory is the constraint (1M unreplied flows in < 200 MB): a pending request is
  two small `bytes` (key: client address+port; value: expected source, service,
  client, deadline) in a dict, plus one reference in a deque that orders expiry.
  Do not store the decoded tuples.
- Zones: requests and replies are matched across conntrack zones. The snat-zone
  remedy puts replies in another zone on purpose, and its SNAT makes the reply leave
  from the right source; because the actual source is taken after the reply's own
  NAT, a fixed service is not reported. Such an answer is the remedy's, not the
  server's (`through_fix`, by ctfix.core.zones): explain never credits it to the
  server. The price: two clients with the same address
  and port in different zones at the same moment (overlapping address spaces) can be
  confused.
- Time: callers pass `now` (seconds, time.time()); entries expire after the
  kernel's timeout for them (CTA_TIMEOUT of the event, else `udp_timeout`).
- Lost events: after a loss, `resync(dump, complete=True)` makes the pending
  requests what the table says (lost NEW, UPDATE and DESTROY events alike), and a
  wrong-source reply is counted once whether it was seen as an event, in a dump, or
  both (same conntrack id), in either order.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from ctfix.core.addr import endpoint
from ctfix.core.clientnet import ClientNetworks
from ctfix.core.decode import (
    DESTROY,
    DUMPED,
    IPS_SEEN_REPLY,
    NEW,
    P_KIND,
    P_ORIG_DPORT,
    P_ORIG_DST,
    P_ORIG_PROTO,
    P_ORIG_SPORT,
    P_ORIG_SRC,
    P_REPLY_DPORT,
    P_REPLY_DST,
    P_REPLY_SPORT,
    P_REPLY_SRC,
    P_STATUS,
    P_TIMEOUT,
    UPDATE,
    CtEntry,
    CtEvent,
    Packed,
    address_bytes,
    event_of,
)
from ctfix.core.detectors import UDP_TIMEOUT, Change
from ctfix.core.detectors.flows import is_request
from ctfix.core.detectors.wrong_source_snapshot import WrongSourceSnapshot
from ctfix.core.model import Family, Mismatch
from ctfix.core.zones import is_fix_zone

#: How long a wrong-source pair is remembered: to confirm it by ICMP, and not to count
#: it twice when a resync dump shows it again.
PAIR_MEMORY = 180.0


@dataclass(frozen=True, slots=True)
class WrongSourceFinding:
    """One aggregated wrong-source finding: (service, actual source, client network)."""

    family: Family
    proto: Literal["udp"]
    client: str  # "addr:port" of the latest client seen
    service: str  # the addr:port the client sent to
    expected_source: str
    # "addr:port"; the address alone for a program that answers from other ports by
    # design (`replies_from_other_port`): findings aggregate per address then
    actual_source: str
    mismatch: Mismatch
    local: bool
    confirmed: bool
    count: int
    # Seconds since the epoch: when ctfix saw the replies (live), or the kernel's
    # creation time of their entries (existing, with conntrack timestamps); None when
    # nobody can tell (existing, without timestamps).
    first_seen: float | None
    last_seen: float | None
    client_network: str
    # Distinct clients (addr:port as the server saw it) among the `count` replies; one
    # that comes back after PAIR_MEMORY without a wrong reply in between counts again.
    clients: int = 1
    kind: Literal["wrong-source"] = "wrong-source"
    #: found in the table (before the watch began), not seen happening (module doc)
    existing: bool = False
    #: the program answers from another port by design: only the address is compared
    replies_from_other_port: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.service, self.actual_source, self.client_network)


def mismatch_of(expected: tuple[str, int], actual: tuple[str, int]) -> Mismatch | None:
    """ "address", "port", "address+port", or None when they are the same."""
    address = expected[0] != actual[0]
    port = expected[1] != actual[1]
    if address and port:
        return "address+port"
    if address:
        return "address"
    if port:
        return "port"
    return None


_PORT = struct.Struct(">H")
_DEADLINE = struct.Struct(">I")
_UDP = socket.IPPROTO_UDP


def _deadline(value: bytes) -> int:
    """The deadline (in ticks) a pending request's value ends with."""
    return int.from_bytes(value[-4:], "big")
_PACK_CACHE: dict[str, bytes] = {}


def _pack(address: str) -> bytes:
    raw = _PACK_CACHE.get(address)
    if raw is None:
        raw = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        if len(_PACK_CACHE) >= 1 << 16:
            _PACK_CACHE.clear()
        _PACK_CACHE[address] = raw
    return raw


def _unpack_endpoint(raw: bytes) -> tuple[str, int]:
    family = socket.AF_INET6 if len(raw) == 18 else socket.AF_INET
    return socket.inet_ntop(family, raw[:-2]), _PORT.unpack(raw[-2:])[0]


@dataclass
class Stats:
    events: int = 0
    new_flows: int = 0
    pending: int = 0
    expired: int = 0
    evicted: int = 0
    recovered: int = 0  # unreplied requests first learnt from a resync dump
    stale: int = 0  # pending requests a complete resync found answered or gone


class WrongSourceDetector:
    """Keeps the unreplied UDP flows and turns wrong-source replies into findings.

    `feed()` one event at a time; it returns (finding, Change) when the event was a
    wrong-source reply. `examine()` (alias `resync()`) learns from a dump.
    `expire(now)` drops flows the kernel has forgotten; call it about once a second.
    `max_flows` bounds memory whatever the traffic.
    """

    kind: Literal["wrong-source"] = "wrong-source"

    def __init__(
        self,
        *,
        max_flows: int = 2_000_000,
        max_findings: int = 10_000,
        udp_timeout: int = UDP_TIMEOUT,
        local_addresses: frozenset[str] = frozenset(),
        track_answers: bool = False,
        networks: ClientNetworks | None = None,
        other_port: Callable[[int], bool] | None = None,
    ) -> None:
        self.max_flows = max_flows
        self.max_findings = max_findings
        self.udp_timeout = udp_timeout
        self.local_addresses = local_addresses
        #: the namespace's client networks (ctfix.core.clientnet): findings' grouping
        self.networks = networks if networks is not None else ClientNetworks()
        #: server port -> whether its program answers from other ports by design
        self.other_port = other_port
        #: History and news (module doc): watching since (epoch seconds), and whether a
        #: dump finding without a kernel timestamp is history.
        self.since: float | None = None
        self.dumps_are_history = True
        #: conntrack ids of entries whose NEW event came after `since` but was read
        #: after a dump that shows them (explain --listen's start-up): news all the same
        self.fresh_ids: set[int] = set()
        # track_answers (explain, one bounded snapshot; not watch, unbounded): request
        # client (addr, port) -> True when a new entry answered it from the wrong
        # source, False when from the right one (the snat-zone remedy's zoned reply).
        self.answered: dict[tuple[str, int], bool] | None = {} if track_answers else None
        #: track_answers: the clients answered from the right source by an entry in one
        #: of ctfix's own zones (ctfix.core.zones): the snat-zone remedy's work, not the
        #: server's, whether or not the remedy is still in place
        self.through_fix: set[tuple[str, int]] = set()
        self.stats = Stats()
        self._epoch: float | None = None
        # client (packed addr + port) -> expected(18|6) + service + client + deadline
        self._pending: dict[bytes, bytes] = {}
        self._order: deque[bytes] = deque()
        # live findings, and existing ones (history), apart: see the module doc
        self.findings: dict[tuple[str, str, str], WrongSourceFinding] = {}
        self.history: dict[tuple[str, str, str], WrongSourceFinding] = {}
        # (actual source, client) -> (finding key, last seen, conntrack id of the reply
        # entry, whether the finding is history); for ICMP confirmation and not to
        # count one entry twice
        self._pairs: dict[
            tuple[str, int, str, int], tuple[tuple[str, str, str], float, int | None, bool]
        ] = {}
        self._icmp_seen: dict[tuple[str, int, str, int], float] = {}
        # client (addr, port) another entry answered -> (when, from the wrong source);
        # for `answer_to`, in last-seen order
        self._answers: dict[tuple[str, int], tuple[float, bool]] = {}
        self._matched = False  # set by _match: the entry answered a pending request
        self._local_of: frozenset[str] | None = None  # what _local_bytes was made from
        self._local_bytes: frozenset[bytes] = frozenset()
        self._probe = b""  # set by _match: packed orig dst + dport, reused by _remember

    # -- state ---------------------------------------------------------------------

    def _tick(self, now: float) -> int:
        if self._epoch is None:
            self._epoch = now
        return int(now - self._epoch)

    def _remember(self, entry: CtEntry, now: float, service: bytes | None = None) -> bytes | None:
        """Store an unreplied entry as a pending request; its key (None: not stored).

        service: packed orig dst + dport when the caller has it (`_match` did).
        """
        if not is_request(entry, self.local_addresses):
            return None
        reply = entry.reply
        orig = entry.orig
        if service is None:
            service = _pack(orig.dst) + _PORT.pack(orig.dport)
        if service[0] >= 224 if len(service) == 6 else service[0] == 0xFF:
            # Multicast/broadcast requests (mDNS, SSDP, DHCP) are answered from unicast
            # addresses by design, and conntrack never pairs those answers with them.
            return None
        key = _pack(reply.dst) + _PORT.pack(reply.dport)
        timeout = entry.timeout if entry.timeout is not None else self.udp_timeout
        value = b"".join(
            (
                _pack(reply.src),
                _PORT.pack(reply.sport),
                service,
                _pack(orig.src),
                _PORT.pack(orig.sport),
                _DEADLINE.pack(self._tick(now) + timeout + 1),
            )
        )
        return self._store(key, value)

    def _store(self, key: bytes, value: bytes) -> bytes:
        pending = self._pending
        old = pending.get(key)
        if (
            old is not None
            and old[:-4] == value[:-4]
            and -1 <= _deadline(old) - _deadline(value) <= 1
        ):
            # Unchanged (a dump repeating what the events said; its deadline within the
            # rounding of whole seconds, the kernel's and this clock's): its place in
            # the expiry order stands, and no second copy of key and value is kept.
            return key
        pending[key] = value
        self._order.append(key)
        if len(pending) > self.max_flows:
            self._evict_one()
        return key

    def _local_raw(self) -> frozenset[bytes]:
        """`local_addresses` as the kernel's bytes (for `feed_packed`), kept while the
        caller keeps the same set."""
        local = self.local_addresses
        if self._local_of is not local:
            raw = set()
            for address in local:
                try:
                    raw.add(address_bytes(address))
                except OSError:  # not an address inet_ntop gives: it matches no entry
                    continue
            self._local_bytes = frozenset(raw)
            self._local_of = local
        return self._local_bytes

    @staticmethod
    def _key(entry: CtEntry) -> bytes:
        return _pack(entry.reply.dst) + _PORT.pack(entry.reply.dport)

    @staticmethod
    def _made_by(value: bytes, entry: CtEntry) -> bool:
        """Whether a stored pending value is the request `entry` made."""
        return value[:-4].endswith(_pack(entry.orig.src) + _PORT.pack(entry.orig.sport))

    def _forget(self, entry: CtEntry) -> None:
        """Drop the pending request this entry made, if it is still the stored one."""
        key = self._key(entry)
        value = self._pending.get(key)
        if value is not None and self._made_by(value, entry):
            del self._pending[key]

    def _evict_one(self) -> None:
        while self._order:
            key = self._order.popleft()
            if key in self._pending:
                del self._pending[key]
                self.stats.evicted += 1
                return

    def expire(self, now: float) -> None:
        """Forget pending requests whose conntrack entry has timed out."""
        tick = self._tick(now)
        order = self._order
        pending = self._pending
        while order:
            key = order[0]
            value = pending.get(key)
            if value is not None and _DEADLINE.unpack(value[-4:])[0] > tick:
                break
            order.popleft()
            # A refreshed key is queued again later; delete only when it is due.
            if value is not None:
                del pending[key]
                self.stats.expired += 1
        # deque copies of refreshed keys are bounded by the event rate x timeout
        while len(order) > 2 * self.max_flows:
            order.popleft()
        # Both dicts are in last-seen order: one pass from the front, then delete
        # (repeated next(iter(d)) after deletions would be quadratic).
        old_pairs = []
        for pair, (_key, seen, _id, _history) in self._pairs.items():
            if now - seen <= PAIR_MEMORY:
                break
            old_pairs.append(pair)
        for pair in old_pairs:
            del self._pairs[pair]
        old_icmp = []
        for pair, seen in self._icmp_seen.items():
            if now - seen <= 10.0:
                break
            old_icmp.append(pair)
        for pair in old_icmp:
            del self._icmp_seen[pair]
        old_clients = []
        for client, (seen, _wrong) in self._answers.items():
            if now - seen <= PAIR_MEMORY:
                break
            old_clients.append(client)
        for client in old_clients:
            del self._answers[client]
        self.stats.pending = len(pending)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def limit_flows(self, max_flows: int) -> None:
        """A new `max_flows` (`watch --all-netns` shares one budget between its
        namespaces), enforced now: the oldest pending requests go first, counted as
        evicted. Not on the hot path: called when the set of namespaces changes."""
        self.max_flows = max(1, max_flows)
        while len(self._pending) > self.max_flows and self._order:
            self._evict_one()
        self.stats.pending = len(self._pending)

    def answer_to(self, address: str, port: int) -> bool | None:
        """What answered this client (addr, port as the server addressed it) from
        another entry within PAIR_MEMORY: True a wrong-source reply, False a reply
        from the right source (the snat-zone remedy's zoned reply), None nothing.
        What the unanswered detector asks about a request whose entry saw no reply."""
        answer = self._answers.get((address, port))
        return None if answer is None else answer[1]

    def _answered(self, client: tuple[str, int], now: float, wrong: bool) -> None:
        self._answers.pop(client, None)
        self._answers[client] = (now, wrong)

    @property
    def found(self) -> Collection[WrongSourceFinding]:
        """Every finding: the live ones, then the existing ones."""
        return [*self.findings.values(), *self.history.values()]

    def _findings_of(self, history: bool) -> dict[tuple[str, str, str], WrongSourceFinding]:
        return self.history if history else self.findings

    # -- events --------------------------------------------------------------------

    def feed(self, event: CtEvent, now: float) -> tuple[WrongSourceFinding, Change] | None:
        """Process one event; return (finding, change) for a wrong-source reply."""
        entry = event.entry
        if entry.orig.proto != socket.IPPROTO_UDP:
            return None
        self.stats.events += 1
        kind = event.kind
        if kind == NEW:
            self.stats.new_flows += 1
            return self._new_flow(entry, now, from_dump=False)
        if kind in (UPDATE, DESTROY):
            if kind == DESTROY or entry.status & IPS_SEEN_REPLY:
                self._forget(entry)
            return None
        if kind == DUMPED:
            return self._new_flow(entry, now, from_dump=True)
        return None

    def feed_packed(self, event: Packed, now: float) -> tuple[WrongSourceFinding, Change] | None:
        """`feed` for an event in the Packed form (watch's hot path): the same state and
        findings. A NEW event that answers nothing pending (nearly all of them) is
        stored from its bytes as they came, without building an entry; the rest take
        `feed`'s own path."""
        if event[P_ORIG_PROTO] != _UDP:
            return None
        kind = event[P_KIND]
        if kind == NEW:
            probe = event[P_ORIG_DST] + event[P_ORIG_DPORT]
            pending = self._pending
            if probe in pending:  # a reply, or the same client again: the full rule
                return self.feed(event_of(event), now)
            self.stats.events += 1
            self.stats.new_flows += 1
            self._matched = False
            if not event[P_STATUS] & IPS_SEEN_REPLY:
                self._remember_packed(event, now, probe)
            return None
        if kind in (UPDATE, DESTROY):
            self.stats.events += 1
            if kind == DESTROY or event[P_STATUS] & IPS_SEEN_REPLY:
                key = event[P_REPLY_DST] + event[P_REPLY_DPORT]
                value = self._pending.get(key)
                if value is not None and value[:-4].endswith(
                    event[P_ORIG_SRC] + event[P_ORIG_SPORT]
                ):
                    del self._pending[key]
            return None
        return self.feed(event_of(event), now)

    def _remember_packed(self, event: Packed, now: float, service: bytes) -> None:
        """`_remember` of a Packed NEW event (`feed_packed`): the same rule on bytes."""
        if self.local_addresses:  # flows.is_request, on bytes
            local = self._local_raw()
            if event[P_ORIG_SRC] in local:
                return
            if event[P_ORIG_DST] not in local and (
                event[P_REPLY_SRC] == event[P_ORIG_DST]
                and event[P_REPLY_SPORT] == event[P_ORIG_DPORT]
            ):
                return
        if service[0] >= 224 if len(service) == 6 else service[0] == 0xFF:
            return  # multicast/broadcast (`_remember`)
        timeout = event[P_TIMEOUT]
        if timeout is None:
            timeout = self.udp_timeout
        value = b"".join(
            (
                event[P_REPLY_SRC],
                event[P_REPLY_SPORT],
                service,
                event[P_ORIG_SRC],
                event[P_ORIG_SPORT],
                _DEADLINE.pack(self._tick(now) + timeout + 1),
            )
        )
        self._store(event[P_REPLY_DST] + event[P_REPLY_DPORT], value)

    def resync(
        self,
        entries: Sequence[CtEntry],
        now: float,
        *,
        complete: bool = False,
        time_of: Callable[[CtEntry], float] | None = None,
    ) -> list[tuple[WrongSourceFinding, Change]]:
        """Rebuild from a dump after lost events: learn unreplied flows, then match.

        complete: `entries` is the whole UDP table of the namespace, taken after every
        event that came before it was fed. A pending request it does not list as
        unreplied was answered or destroyed while events were lost: it is forgotten.
        Leave it False for a partial dump (one port), which can only add.
        time_of: when a wrong-source reply entry's last packet left, as far as the
        table tells (explain dates its evidence so); findings then say when they
        happened instead of `now`.
        """
        kept = list(entries)
        snapshot = self.snapshot(now, complete=complete, time_of=time_of, keep=kept)
        snapshot.add(kept)
        return snapshot.finish()

    def snapshot(
        self,
        now: float,
        *,
        complete: bool = False,
        time_of: Callable[[CtEntry], float] | None = None,
        keep: list[CtEntry] | None = None,
    ) -> WrongSourceSnapshot:
        """`resync` fed chunk by chunk (`add`, then `finish`): a dump read as it comes,
        never held whole. The entries are kept as bytes (ctfix.core.compact) until
        `finish` matches them; `keep`: the caller holds them all already (as a list)."""
        return WrongSourceSnapshot(self, now, complete, time_of, keep)

    #: the snapshot entry of the ctfix.core.detectors protocol
    examine = resync

    def _new_flow(
        self, entry: CtEntry, now: float, *, from_dump: bool
    ) -> tuple[WrongSourceFinding, Change] | None:
        found = self._match(entry, now, from_dump=from_dump)
        # A flow that answered a pending request is a reply, not a request: keeping it
        # would make the client's next request look like a reply to it.
        if not self._matched and not entry.status & IPS_SEEN_REPLY:
            self._remember(entry, now, self._probe)
        return found

    def _match(
        self, entry: CtEntry, now: float, *, from_dump: bool
    ) -> tuple[WrongSourceFinding, Change] | None:
        self._matched = False
        orig = entry.orig
        self._probe = key = _pack(orig.dst) + _PORT.pack(orig.dport)
        value = self._pending.get(key)
        if value is None:
            return None
        size = 6 if len(key) == 6 else 18
        expected = _unpack_endpoint(value[:size])
        service = _unpack_endpoint(value[size : 2 * size])
        client = _unpack_endpoint(value[2 * size : 3 * size])
        if client == (orig.src, orig.sport):
            # The same client again: the same flow (a dump repeating an event), or its
            # next flow when a masquerade made its first one's reply go to the address
            # and port it sends to (a fixed-port sender NATed to the service's own
            # address): a request, never a reply to itself.
            return None
        self._matched = True
        # The source the reply leaves with, after its own NAT (snat-zone remedy).
        actual = (entry.reply.dst, entry.reply.dport)
        # A reply rewritten to what a DNAT'd client sent to (the snat-zone remedy for
        # clients of a ClusterIP) is as right as one from the DNAT's target.
        mismatch = None if actual == service else mismatch_of(expected, actual)
        by_design = False
        if mismatch is not None and mismatch != "address" and self.other_port is not None:
            # Another port: an answer for a program that changes ports by design.
            by_design = self.other_port(expected[1])
            if by_design and mismatch == "port":
                mismatch = None
        if self.answered is not None:
            self.answered[client] = self.answered.get(client, False) or mismatch is not None
            if mismatch is None and is_fix_zone(entry.zone):
                self.through_fix.add(client)
        if mismatch is None:
            self._answered((orig.dst, orig.dport), now, wrong=False)
            return None
        pair = (actual[0], actual[1], orig.dst, orig.dport)
        known = self._pairs.get(pair)
        if known is not None:
            if entry.id is not None and known[2] is not None:
                if entry.id == known[2]:
                    return None  # the same entry again: an event and a dump, either order
            elif from_dump:
                return None  # without ids, a dump never counts a known pair again
        return self._record(
            entry, expected, service, client, actual, mismatch, pair, now, from_dump, by_design
        )

    def _is_history(self, entry: CtEntry, from_dump: bool) -> bool:
        """Whether a reply was in the table before the watch began (module doc)."""
        if not from_dump or (entry.id is not None and entry.id in self.fresh_ids):
            return False
        if entry.start is not None and self.since is not None:
            return entry.start < self.since * 1e9
        return self.dumps_are_history

    def _record(
        self,
        entry: CtEntry,
        expected: tuple[str, int],
        service: tuple[str, int],
        client: tuple[str, int],
        actual: tuple[str, int],
        mismatch: Mismatch,
        pair: tuple[str, int, str, int],
        now: float,
        from_dump: bool = False,
        by_design: bool = False,
    ) -> tuple[WrongSourceFinding, Change] | None:
        family: Family = "ipv6" if entry.orig.family == socket.AF_INET6 else "ipv4"
        service_s = endpoint(*service)
        # A program that changes ports by design: its findings aggregate per address.
        actual_s = actual[0] if by_design else endpoint(*actual)
        network = self.networks.network(client[0])
        key = (service_s, actual_s, network)
        history = self._is_history(entry, from_dump)
        # Live: when ctfix saw it. History: the kernel's creation time, else unknown.
        seen = now if not history else None if entry.start is None else entry.start / 1e9
        local = expected[0] in self.local_addresses and actual[0] in self.local_addresses
        confirmed = self._icmp_seen.pop(pair, None) is not None
        findings = self._findings_of(history)
        old = findings.get(key)
        known = self._pairs.pop(pair, None)
        new_client = known is None or known[0] != key or known[3] != history
        self._pairs[pair] = (key, now, entry.id, history)
        self._answered(pair[2:], now, wrong=True)
        if old is None:
            if len(self.findings) + len(self.history) >= self.max_findings:
                return None
            finding = WrongSourceFinding(
                family=family,
                proto="udp",
                client=endpoint(*client),
                service=service_s,
                expected_source=endpoint(*expected),
                actual_source=actual_s,
                mismatch=mismatch,
                local=local,
                confirmed=confirmed,
                count=1,
                first_seen=seen,
                last_seen=seen,
                client_network=network,
                existing=history,
                replies_from_other_port=by_design,
            )
            findings[key] = finding
            return finding, Change.NEW
        finding = replace(
            old,
            client=endpoint(*client),
            count=old.count + 1,
            clients=old.clients + new_client,
            first_seen=_earliest(old.first_seen, seen),
            last_seen=_latest(old.last_seen, seen),
            local=local or old.local,
            confirmed=confirmed or old.confirmed,
        )
        findings[key] = finding
        # The client's ICMP came before the reply's event (read in another batch, or
        # the event came from a resync dump): the confirmation is news, say so.
        return finding, Change.CONFIRMED if confirmed and not old.confirmed else Change.COUNTED

    # -- ICMP confirmation ---------------------------------------------------------

    def icmp_port_unreachable(
        self, inner_src: str, inner_sport: int, inner_dst: str, inner_dport: int, now: float
    ) -> WrongSourceFinding | None:
        """The client rejected a datagram src:sport -> dst:dport; confirm a finding.

        Returns the finding when this newly confirms it (so the caller can show it).
        """
        pair = (inner_src, inner_sport, inner_dst, inner_dport)
        known = self._pairs.get(pair)
        if known is None:
            self._icmp_seen[pair] = now
            if len(self._icmp_seen) > 4096:
                self._icmp_seen.pop(next(iter(self._icmp_seen)))
            return None
        findings = self._findings_of(known[3])
        finding = findings.get(known[0])
        if finding is None or finding.confirmed:
            return None
        finding = replace(finding, confirmed=True)
        findings[known[0]] = finding
        return finding


def _earliest(old: float | None, seen: float | None) -> float | None:
    """The first time of an aggregate: unknown as soon as one reply's time is unknown
    (an entry without a timestamp predates those with one, so it could be the first)."""
    if old is None or seen is None:
        return None
    return min(old, seen)


def _latest(old: float | None, seen: float | None) -> float | None:
    """The last time of an aggregate: the latest known one (an entry without a
    timestamp was made before timestamps were on, so before every known one)."""
    if old is None:
        return seen
    if seen is None:
        return old
    return max(old, seen)

