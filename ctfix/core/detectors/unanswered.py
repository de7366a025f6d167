"""The unanswered detector: UDP requests that ended without any reply, counted per
service (the address:port the client sent to) and classified by why. Pure: no
sockets, no clock, no /proc (what it must know of the system comes through small
hooks the composer fills). It follows the ctfix.core.detectors protocol (kind
"unanswered").

What is counted. A *request* is a remote client's flow to this namespace or to a
service DNAT'd behind it (`is_request`: the rule the wrong-source detector uses). It
is *unanswered* when its conntrack entry ends without IPS_SEEN_REPLY (a DESTROY event:
watch subscribes to those, filtered in the kernel), or when a dump shows it unreplied
(`examine`: explain and scan, and watch's start-up; every unreplied request counts, as
the evidence's "requests without any reply" counts it, so that two commands on one
table agree; at watch's start-up they are history, `existing`). Measured: the kernel
sends no DESTROY event for an entry made while nothing listened to conntrack events in
the namespace (it has no event extension), so the start-up dump is the only chance to
count what was there before watch. Multicast and broadcast requests are not counted
(their answers come from unicast addresses, which conntrack never pairs with them).

Why, the first that holds:
- `stale-nat`: its DNAT target was stale (the `stale` hook: what the stale-nat
  detector judged, `StaleFindings`; watch and explain pass it).
- `wrong-source`: the wrong-source detector matched a wrong-source reply for this
  client (the `wrong` hook): the server did answer, from an address the client refused.
  When it matched a reply from the right source instead (the snat-zone remedy puts
  replies in another conntrack zone, so the request's own entry never sees them), the
  request was answered and is not counted.
- `no-socket`: nothing was bound that takes the datagram (that address and port, a
  wildcard of its family, or a socket connect()ed to this very client). The host's
  ICMP port unreachable for the request, when seen (`icmp_sent`), confirms it, and
  decides it even where the socket view would say otherwise.
- `no-reply`: a socket was bound and no reply reached conntrack: the application did
  not answer, or a rule dropped or untracked the replies before conntrack saw them
  (the `firewall` hook names such rules; a request dropped on its way in leaves no
  entry at all, so it is never counted). A request a DNAT sent to another host is
  `no-reply` too: that host never answered.

One-way services (the knowledge base's `one_way`: syslog, StatsD) never answer by
design: a `no-reply` flow to a socket held by such a program (recognised by the
program, never by the port alone) is counted in a finding of its own, `one_way` True,
and is never a problem (`problem` is False).

Know before changing (over 500 lines on purpose: the hooks' protocols and explain's
implementations of them, `ListenerSockets`, `RulesFirewall`, `dropping_rules`, stay
beside the classification that asks them, so one file says what a reason rests on):
- watch's hot loop feeds this detector only DESTROY events (`kinds`); `feed` tests the
  event kind first all the same.
- When the sockets are looked at: a DESTROY arrives udp_timeout after the flow's last
  datagram, and the socket view is taken then. A service that started in between is
  caught when its holder's process started after the request (`Holder.started`); one
  that stopped in between is taken for `no-socket` unless a socket remains. The ICMP
  port unreachable the host sent at the time settles it when it was seen.
- Memory is bounded: `max_findings` (service, reason) pairs and `max_clients` client
  addresses over all findings; what a cap keeps out is counted
  (`stats.uncounted_flows`, `stats.uncounted_clients`), never silently lost. Entries
  counted from a dump are remembered by conntrack id (at most `max_remembered`) so that
  their DESTROY does not count them again; entries it cannot remember are left to
  their DESTROY.
- A flush (`conntrack -F`) or an early drop of a full table ends unreplied entries
  too: their DESTROY counts them like a timeout does.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from ctfix.core.addr import endpoint, parse_endpoint, unmap
from ctfix.core.decode import DESTROY, IPS_SEEN_REPLY, CtEntry, CtEvent
from ctfix.core.detectors import UDP_TIMEOUT, Change
from ctfix.core.detectors.flows import is_request
from ctfix.core.model import Family, Listener
from ctfix.core.snapshot import NetfilterRule

if TYPE_CHECKING:
    from ctfix.core.rules import KnowledgeBase

UnansweredReason = Literal["no-socket", "no-reply", "wrong-source", "stale-nat"]
#: every reason, in the order they are decided
REASONS: tuple[UnansweredReason, ...] = ("stale-nat", "wrong-source", "no-socket", "no-reply")

#: How much later than the request a socket holder's process must have started to be
#: taken for one that was not there yet: /proc's boot time and conntrack's timeouts
#: are whole seconds.
STARTED_SLACK = 2.0

#: How long the host's ICMP port unreachable for a request is kept to confirm it.
ICMP_MEMORY = 600.0


def _multicast(address: str) -> bool:
    """Multicast, or the IPv4 limited broadcast (directed broadcasts are not local
    addresses: `is_request` leaves them out)."""
    if ":" in address:
        return address[:2].lower() == "ff"
    return int(address.split(".", 1)[0]) >= 224


# -- what the composer tells the detector -----------------------------------------------


class Binding(NamedTuple):
    """A UDP socket as the classification needs it."""

    family: Family
    address: str  # as bound: "0.0.0.0", "::", "::ffff:192.0.2.1", "192.0.2.1"
    port: int
    peer: str | None  # "addr:port" of a connect()ed socket; None when unconnected
    v6only: bool | None
    ident: int  # identifies the socket for `Sockets.holder` (the inode, in watch)


class Holder(NamedTuple):
    """The process that holds a socket."""

    process: str | None  # comm
    cmdline: tuple[str, ...]
    exe: str | None
    started: float | None = None  # when it started (seconds, the caller's clock), if known


class Sockets(Protocol):
    """The namespace's UDP sockets (watch: a cached sock_diag view; explain: its
    listeners)."""

    def on_port(self, port: int) -> Sequence[Binding]: ...

    def holder(self, binding: Binding) -> Holder | None: ...


class Answers(Protocol):
    """The wrong-source detector, asked about one client: was it answered from another
    entry (True: from the wrong source; False: from the right one, e.g. the snat-zone
    remedy's zoned reply, which leaves the request's own entry unreplied; None: no)."""

    def answer_to(self, address: str, port: int) -> bool | None: ...


class StaleTargets(Protocol):
    """The stale-nat detector's judgement, asked about one ended request: did its DNAT
    send it to a stale target? (`StaleFindings` over its findings.)"""

    def was_stale(self, entry: CtEntry) -> bool: ...


class StaleFindings:
    """`StaleTargets` over the stale-nat detector's findings, keyed (service, stale
    target) as ctfix.core.detectors.stale_nat aggregates them: watch passes the live
    dict, explain the port's judgement."""

    def __init__(self, findings: Mapping[tuple[str, str], object]) -> None:
        self.findings = findings

    def was_stale(self, entry: CtEntry) -> bool:
        if not self.findings:  # the usual case: no endpoints to format per request
            return False
        orig, reply = entry.orig, entry.reply
        key = (endpoint(orig.dst, orig.dport), endpoint(reply.src, reply.sport))
        return key in self.findings


class Firewall(Protocol):
    """Netfilter rules that can drop or untrack replies from `port` before conntrack
    sees them (`dropping_rules`)."""

    def could_drop(self, port: int) -> tuple[str, ...]: ...


def accepts(binding: Binding, family: Family, address: str, client: tuple[str, int]) -> bool:
    """Whether the kernel would deliver a datagram to address:port from `client` to
    this socket (the port is the caller's)."""
    if binding.peer is not None:
        peer_address, peer_port = parse_endpoint(binding.peer)
        if (unmap(peer_address), peer_port) != (unmap(client[0]), client[1]):
            return False
    bound = binding.address
    if binding.family == "ipv4":
        return family == "ipv4" and bound in ("0.0.0.0", address)
    if family == "ipv6":
        return bound in ("::", address)
    if bound == "::":
        return not binding.v6only
    return unmap(bound) == address and bound != address  # ::ffff:a.b.c.d


class ListenerSockets:
    """`Sockets` over explain's listeners (the holder is what the listing found)."""

    def __init__(self, listeners: Sequence[Listener]) -> None:
        self._bindings: dict[int, list[Binding]] = {}
        self._holders: dict[int, Holder] = {}
        for ident, lst in enumerate(listeners):
            family: Family = "ipv6" if lst.family == "ipv6" else "ipv4"
            self._bindings.setdefault(lst.port, []).append(
                Binding(family, lst.address, lst.port, lst.peer, lst.v6only, ident)
            )
            if lst.process is not None or lst.cmdline or lst.exe:
                self._holders[ident] = Holder(lst.process, lst.cmdline, lst.exe)

    def on_port(self, port: int) -> Sequence[Binding]:
        return self._bindings.get(port, ())

    def holder(self, binding: Binding) -> Holder | None:
        return self._holders.get(binding.ident)


_DROPPING = frozenset({"drop", "reject"})


def dropping_rules(rules: Sequence[NetfilterRule], port: int) -> tuple[str, ...]:
    """Rules that can leave a request's entry unreplied while a socket takes it: a
    drop or reject of the replies from `port` before conntrack sees them (output,
    or prerouting for a DNAT target's replies: iptables-legacy's raw table, or an
    nftables chain on those hooks, whose priority is not read), or a NOTRACK of them
    (the client may even get the reply; conntrack never sees it).

    Measured: a request dropped in input (or anywhere before its entry is confirmed)
    leaves no entry at all, and a reply dropped in filter output has already marked
    its entry replied; neither can make an unanswered flow, so neither is named.
    """
    found: list[str] = []
    for rule in rules:
        if not rule.matches_sport:
            continue
        before_conntrack = (
            rule.table == "raw"  # mangle, filter, nat: after conntrack
            if rule.backend == "iptables-legacy"
            else rule.hook in (None, "output", "prerouting")
        )
        drops = bool(rule.actions & _DROPPING) and before_conntrack
        if drops or "notrack" in rule.actions:
            table = f"{rule.family} {rule.table}" if rule.backend == "nftables" else rule.table
            text = f"{rule.backend} {table} {rule.chain}: {rule.rule}"
            if text not in found:
                found.append(text)
    return tuple(found)


class RulesFirewall:
    """`Firewall` over rules already read (explain's snapshot)."""

    def __init__(self, rules: Sequence[NetfilterRule]) -> None:
        self.rules = rules

    def could_drop(self, port: int) -> tuple[str, ...]:
        return dropping_rules(self.rules, port)


# -- findings --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnansweredFinding:
    """Unanswered requests to one service, for one reason."""

    family: Family
    proto: Literal["udp"]
    service: str  # the addr:port the clients sent to
    reason: UnansweredReason
    flows: int  # requests (conntrack entries) that ended without a reply
    clients: int  # distinct client addresses among them
    first_seen: float
    last_seen: float
    client: str  # "addr:port" of the latest client
    one_way: bool = False  # a one-way service (knowledge base): expected, not a problem
    #: requests in the table when watch started (its start-up dump): history, kept in a
    #: finding of their own, apart from the same service's flows that end while watching
    existing: bool = False
    target: str | None = None  # where a DNAT sent them, when not the service itself
    confirmed: bool = False  # no-socket: the host's ICMP port unreachable was seen
    program: str | None = None  # no-reply: the process holding the socket
    rules: tuple[str, ...] = ()  # no-reply: rules that can drop or untrack the replies
    kind: Literal["unanswered"] = "unanswered"

    @property
    def key(self) -> tuple[str, UnansweredReason, bool, bool]:
        return (self.service, self.reason, self.one_way, self.existing)

    @property
    def problem(self) -> bool:
        """Whether it is something to act on (a one-way service's flows are not)."""
        return not self.one_way


@dataclass
class Stats:
    flows: int = 0  # unanswered requests counted
    one_way: int = 0  # of which to one-way services
    from_dump: int = 0  # of which counted from a dump
    uncounted_flows: int = 0  # not counted: max_findings reached
    uncounted_clients: int = 0  # clients not counted: max_clients reached


class _Classified(NamedTuple):
    reason: UnansweredReason
    one_way: bool
    confirmed: bool
    program: str | None


class UnansweredDetector:
    """Counts and classifies unanswered requests (see the module docstring).

    Hooks: `sockets` (required for no-socket vs no-reply; without it a flow is
    no-socket only when the ICMP confirms it), `wrong`, `stale`, `firewall`, `kb` (for
    one-way services). `remember`: keep the conntrack ids counted from dumps so that
    their DESTROY events are not counted again (watch); explain and scan, which see
    one dump, leave it False.
    """

    kind: Literal["unanswered"] = "unanswered"
    #: the events watch's loop gives it (ctfix.core.detectors.feeds_by_kind)
    kinds = frozenset({DESTROY})

    def __init__(
        self,
        *,
        sockets: Sockets | None = None,
        wrong: Answers | None = None,
        stale: StaleTargets | None = None,
        firewall: Firewall | None = None,
        kb: KnowledgeBase | Callable[[], KnowledgeBase] | None = None,
        local_addresses: frozenset[str] = frozenset(),
        udp_timeout: int = UDP_TIMEOUT,
        remember: bool = False,
        max_findings: int = 4096,
        max_clients: int = 65536,
        max_remembered: int = 65536,
    ) -> None:
        self.sockets = sockets
        self.wrong = wrong
        self.stale = stale
        self.firewall = firewall
        self.kb = kb
        self.local_addresses = local_addresses
        self.udp_timeout = udp_timeout
        self.remember = remember
        #: dumps find history (`existing` findings) until the composer says otherwise:
        #: watch, after its start-up dump (a resync's finds are news, as for wrong-source)
        self.dumps_are_history = True
        self.max_findings = max_findings
        self.max_clients = max_clients
        self.max_remembered = max_remembered
        self.stats = Stats()
        self.findings: dict[tuple[str, UnansweredReason, bool, bool], UnansweredFinding] = {}
        self._clients: dict[tuple[str, UnansweredReason, bool, bool], set[str]] = {}
        self._client_count = 0
        # conntrack id -> deadline (the caller's clock) of entries counted from a dump
        self._counted: dict[int, float] = {}
        # (client addr, client port, service addr, service port) -> when the host's
        # ICMP port unreachable for it was seen; insertion order is time order
        self._icmp: dict[tuple[str, int, str, int], float] = {}
        self._one_way: dict[tuple[str | None, str | None, tuple[str, ...], int], bool] = {}

    @property
    def found(self) -> Collection[UnansweredFinding]:
        return self.findings.values()

    # -- events ----------------------------------------------------------------------

    def feed(self, event: CtEvent, now: float) -> tuple[UnansweredFinding, Change] | None:
        """A DESTROY event of an entry that never saw a reply is an unanswered request
        (anything else is ignored)."""
        if event[0] != DESTROY:
            return None
        entry = event[1]
        if entry.status & IPS_SEEN_REPLY or entry.orig.proto != socket.IPPROTO_UDP:
            return None  # the kernel filter lets through what it cannot read
        if entry.id is not None and self._counted.pop(entry.id, None) is not None:
            return None  # counted from a dump already
        if not is_request(entry, self.local_addresses) or _multicast(entry.orig.dst):
            return None
        return self._count(entry, now, since=now - self.udp_timeout, existing=False)

    def examine(
        self, entries: Sequence[CtEntry], now: float, *, complete: bool = False
    ) -> list[tuple[UnansweredFinding, Change]]:
        """Unreplied requests in a dump.

        `complete` changes nothing: a dump cannot bring back flows that ended while
        events were lost (their entries are gone).
        """
        snapshot = self.snapshot(now, complete=complete)
        snapshot.add(entries)
        return snapshot.finish()

    def snapshot(self, now: float, *, complete: bool = False) -> UnansweredSnapshot:
        """`examine` fed chunk by chunk (each entry is counted as it comes)."""
        del complete
        return UnansweredSnapshot(self, now)

    def _examine(
        self, entries: Iterable[CtEntry], now: float, seen: set[object] | None
    ) -> Iterator[tuple[UnansweredFinding, Change]]:
        """`examine`'s work; `seen`: the entries of this dump so far (None when the
        detector `remember`s: then `_counted` is that set, for every entry it counts)."""
        udp = socket.IPPROTO_UDP
        local = self.local_addresses
        counted = self._counted
        remember = self.remember
        for entry in entries:
            orig = entry.orig
            if orig.proto != udp or entry.status & IPS_SEEN_REPLY:
                continue
            ident: object = entry.id if entry.id is not None else (orig, entry.zone)
            if ident in counted:
                continue
            if seen is not None:
                if ident in seen:
                    continue
                seen.add(ident)
            if remember and (entry.id is None or len(counted) >= self.max_remembered):
                # Not to be remembered: its DESTROY will count it. Checked before the
                # rest: in a big table, most of a start-up dump's entries end here.
                continue
            left = entry.timeout
            idle = self.udp_timeout - left if left is not None else self.udp_timeout
            if not is_request(entry, local) or _multicast(orig.dst):
                continue
            if remember and entry.id is not None:
                # Its DESTROY comes `left` seconds from now, later if the client sends
                # again; long after that the id is forgotten (a count twice at worst).
                counted[entry.id] = now + (left or 0) + 4 * self.udp_timeout + 60
            found = self._count(entry, now, since=now - idle, existing=self.dumps_are_history)
            if found is not None:
                self.stats.from_dump += 1
                yield found

    def icmp_sent(
        self, client: str, client_port: int, service: str, service_port: int, now: float
    ) -> None:
        """The host sent ICMP port unreachable for a datagram client -> service."""
        pair = (unmap(client), client_port, unmap(service), service_port)
        self._icmp.pop(pair, None)
        self._icmp[pair] = now
        if len(self._icmp) > 4096:
            self._icmp.pop(next(iter(self._icmp)))

    def expire(self, now: float) -> None:
        old = []
        for pair, seen in self._icmp.items():
            if now - seen <= ICMP_MEMORY:
                break
            old.append(pair)
        for pair in old:
            del self._icmp[pair]
        if self._counted:
            for ct_id in [i for i, deadline in self._counted.items() if deadline < now]:
                del self._counted[ct_id]
        if len(self._one_way) > 4096:
            self._one_way.clear()

    # -- classification ------------------------------------------------------------------

    def classify(self, entry: CtEntry, since: float) -> _Classified | None:
        """Why this request got no reply (module docstring), None when another entry
        answered it from the right source; `since`: when its last datagram came (the
        caller's clock)."""
        orig, reply = entry.orig, entry.reply
        if self.stale is not None and self.stale.was_stale(entry):
            return _Classified("stale-nat", False, False, None)
        if self.wrong is not None:
            answer = self.wrong.answer_to(reply.dst, reply.dport)
            if answer is not None:
                return _Classified("wrong-source", False, False, None) if answer else None
        icmp = self._icmp
        if icmp and (
            (unmap(orig.src), orig.sport, unmap(orig.dst), orig.dport) in icmp
            or (unmap(reply.dst), reply.dport, unmap(reply.src), reply.sport) in icmp
        ):
            return _Classified("no-socket", False, True, None)
        local = self.local_addresses
        if self.sockets is None or (local and reply.src not in local):
            # No socket view, or a DNAT sent it to another host: that host never answered.
            return _Classified("no-reply", False, False, None)
        family: Family = "ipv6" if orig.family == socket.AF_INET6 else "ipv4"
        target = unmap(reply.src)
        client = (reply.dst, reply.dport)
        bound = [
            b for b in self.sockets.on_port(reply.sport) if accepts(b, family, target, client)
        ]
        if not bound:
            return _Classified("no-socket", False, False, None)
        holders = [self.sockets.holder(b) for b in bound]
        if all(
            h is not None and h.started is not None and h.started > since + STARTED_SLACK
            for h in holders
        ):
            return _Classified("no-socket", False, False, None)  # it started after the request
        holder = next((h for h in holders if h is not None), None)
        one_way = holder is not None and self._is_one_way(holder, reply.sport)
        return _Classified("no-reply", one_way, False, holder.process if holder else None)

    def _is_one_way(self, holder: Holder, port: int) -> bool:
        if callable(self.kb):
            self.kb = self.kb()  # loaded when first needed (watch's start stays fast)
        if self.kb is None:
            return False
        key = (holder.process, holder.exe, holder.cmdline, port)
        known = self._one_way.get(key)
        if known is None:
            match = self.kb.match(holder.process, holder.cmdline, port, exe=holder.exe)
            known = match is not None and match.rule.one_way and not match.port_only
            self._one_way[key] = known
        return known

    def _count(
        self, entry: CtEntry, now: float, *, since: float, existing: bool
    ) -> tuple[UnansweredFinding, Change] | None:
        orig, reply = entry.orig, entry.reply
        why = self.classify(entry, since)
        if why is None:
            return None
        service = endpoint(orig.dst, orig.dport)
        key = (service, why.reason, why.one_way, existing)
        old = self.findings.get(key)
        if old is None and len(self.findings) >= self.max_findings:
            self.stats.uncounted_flows += 1
            return None
        self.stats.flows += 1
        self.stats.one_way += why.one_way
        client = unmap(orig.src)
        clients = self._clients.setdefault(key, set())
        if client not in clients:
            if self._client_count < self.max_clients:
                clients.add(client)
                self._client_count += 1
            else:
                self.stats.uncounted_clients += 1
        latest = endpoint(orig.src, orig.sport)
        if old is not None:
            # The constructor, not dataclasses.replace (3x its cost): a start-up dump
            # counts up to max_remembered flows here, one new finding object each.
            finding = UnansweredFinding(
                family=old.family,
                proto=old.proto,
                service=old.service,
                reason=old.reason,
                flows=old.flows + 1,
                clients=len(clients),
                first_seen=old.first_seen,
                last_seen=now,
                client=latest,
                one_way=old.one_way,
                existing=old.existing,
                target=old.target,
                confirmed=old.confirmed or why.confirmed,
                program=why.program or old.program,
                rules=old.rules,
            )
            self.findings[key] = finding
            return finding, Change.COUNTED
        natted = reply.src != orig.dst or reply.sport != orig.dport
        rules: tuple[str, ...] = ()
        if why.reason == "no-reply" and not why.one_way and self.firewall is not None:
            rules = self.firewall.could_drop(reply.sport)  # the port replies leave from
        finding = UnansweredFinding(
            family="ipv6" if orig.family == socket.AF_INET6 else "ipv4",
            proto="udp",
            service=service,
            reason=why.reason,
            flows=1,
            clients=len(clients),
            first_seen=now,
            last_seen=now,
            client=latest,
            one_way=why.one_way,
            existing=existing,
            target=endpoint(reply.src, reply.sport) if natted else None,
            confirmed=why.confirmed,
            program=why.program,
            rules=rules,
        )
        self.findings[key] = finding
        return finding, Change.NEW


class UnansweredSnapshot:
    """One dump, chunk by chunk, for an UnansweredDetector (its `snapshot`).

    A big table counts thousands of flows into a few findings: of each finding's
    changes it keeps the first and the latest (a finding carries its counts, so the
    ones between say nothing more), not one finding object per flow."""

    def __init__(self, detector: UnansweredDetector, now: float) -> None:
        self.detector = detector
        self.now = now
        #: finding key -> its first change in this dump, and its latest one after it
        self.results: dict[Hashable, list[tuple[UnansweredFinding, Change]]] = {}
        self._seen: set[object] | None = None if detector.remember else set()

    def add(self, entries: Iterable[CtEntry]) -> None:
        """Some of the dump's entries, in its order."""
        results = self.results
        for found in self.detector._examine(entries, self.now, self._seen):
            changes = results.get(found[0].key)
            if changes is None:
                results[found[0].key] = [found]
            elif len(changes) == 1:
                changes.append(found)
            else:
                changes[1] = found

    def finish(self) -> list[tuple[UnansweredFinding, Change]]:
        """The findings the dump made or changed (each finding's first and latest
        change, in the order findings first changed)."""
        self._seen = None
        return [found for changes in self.results.values() for found in changes]

