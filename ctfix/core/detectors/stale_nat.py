"""The stale-nat detector: UDP conntrack entries that still send a service's clients
to a target the current DNAT rules no longer name. Pure. It follows the
ctfix.core.detectors protocol (kind "stale-nat").

The rule. For a UDP entry whose original tuple C:q -> S:p the rules would DNAT:
- it was DNAT'd (its reply tuple comes from T:t != S:p, and the kernel marked it
  IPS_DST_NAT) and the current rules would not send a new flow with that original
  tuple to T:t: the rule changed (`rule-changed`), or nothing forwards the port any
  more (`no-longer-forwarded`);
- it was never DNAT'd (reply from S:p itself) while the current rules would DNAT
  every new flow like it: it was made before the rule existed (`never-natted`).
Conntrack keeps such an entry as long as the client sends (a one-way sender never
lets it expire), so its datagrams go to the old target, or into a black hole.
"Would send" is `ctfix.core.nat.Evaluator`: conservative, so an entry is stale only
when no reading of the rules sends it where it goes; where the rules cannot be
followed (an opaque statement, a ruleset that could not be read) the entry is
`undecided` and nothing is claimed.

Know before changing:
- `feed` does nothing and costs nothing: refreshing a UDP entry emits no conntrack
  event, so staleness is a property of the rules against the table, judged from
  dumps (`examine`, `check`). `snapshot_only` tells `one_feed` to leave the detector
  out of watch's hot path.
- A finding is (service, stale target), with the clients counted; `pinned` keeps a
  few of them with how long their entry has lived and when it was last used (from
  CTA_TIMESTAMP and CTA_COUNTERS when the kernel has them, and the timeout).
- The deleting (ctfix fix --method flush-stale) takes `StaleEntry.entry` as is: the
  exact tuple, zone and id judged here.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from ctfix.core.addr import Family, endpoint
from ctfix.core.decode import IPS_ASSURED, IPS_DST_NAT, CtEntry, CtEvent, CtUsage
from ctfix.core.detectors import UDP_TIMEOUT, UDP_TIMEOUT_STREAM, Change
from ctfix.core.nat import Evaluator, Flow, NatRuleset

StaleWhy = Literal["rule-changed", "no-longer-forwarded", "never-natted"]

#: clients kept per finding, with their entry's age and use (the rest are counted)
MAX_PINNED = 20


@dataclass(frozen=True, slots=True)
class StaleEntry:
    """One conntrack entry the rules would no longer send where it goes."""

    entry: CtEntry
    family: Family
    service: str  # addr:port as the client sends to it (original destination)
    client: str  # addr:port of the client
    target: str  # where the entry sends the datagrams now (for never-natted: service)
    current: tuple[str, ...]  # where the rules send a new flow like it ([] if nowhere)
    why: StaleWhy
    age: float | None  # seconds since the entry was made (nf_conntrack_timestamp)
    idle: float | None  # seconds since its last datagram, from its timeout (estimate)
    packets: int | None  # datagrams the client sent through it (nf_conntrack_acct)
    rules: tuple[str, ...] = ()  # the rules that make the current DNATs
    #: never-natted and the rules match on the input interface: the one its datagrams
    #: arrive by, inferred from the route to the client (a prediction)
    arrival: str | None = None


@dataclass(frozen=True, slots=True)
class Undecided:
    """An entry ctfix could not judge, and why (the rules could not be followed)."""

    service: str
    target: str
    why: str


@dataclass(frozen=True, slots=True)
class Judgement:
    stale: tuple[StaleEntry, ...] = ()
    undecided: tuple[Undecided, ...] = ()
    judged: int = 0  # entries the rules were asked about
    #: every target the rules send the judged entries' flows to now ("addr:port")
    targets: tuple[str, ...] = ()


class Pinned(NamedTuple):
    """A client still sent to the stale target, and its entry's age and use."""

    client: str
    age: float | None
    idle: float | None
    packets: int | None


@dataclass(frozen=True, slots=True)
class StaleNatFinding:
    """One aggregated finding: (service, stale target), with its clients counted."""

    family: Family
    proto: Literal["udp"]
    service: str
    stale_target: str
    current_targets: tuple[str, ...]
    why: StaleWhy
    clients: int
    entries: int
    first_seen: float
    last_seen: float
    existing: bool  # found in a dump at start-up or a resync (not after a change seen live)
    pinned: tuple[Pinned, ...] = ()
    rules: tuple[str, ...] = ()
    arrival: str | None = None  # see StaleEntry.arrival
    kind: Literal["stale-nat"] = "stale-nat"

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.stale_target)


# -- judging entries ------------------------------------------------------------------------


def idle_seconds(entry: CtEntry, udp_timeout: int, stream_timeout: int) -> float | None:
    """Seconds since the entry's last datagram: each datagram resets its timeout to
    the UDP timeout (the stream timeout once ASSURED). An estimate, and None without
    a timeout in the message."""
    if entry.timeout is None:
        return None
    full = stream_timeout if entry.status & IPS_ASSURED else udp_timeout
    return float(max(0, full - entry.timeout))


def judge(
    entries: Iterable[CtEntry],
    evaluator: Evaluator,
    *,
    now: float,
    usage: Mapping[int, CtUsage] | None = None,
    udp_timeout: int = UDP_TIMEOUT,
    stream_timeout: int = UDP_TIMEOUT_STREAM,
    port: int | None = None,
    interface_of: Callable[[str], str | None] | None = None,
) -> Judgement:
    """Which UDP entries the rules would no longer send where they go (module doc).

    port: only entries sent to this port (explain's and fix's port); None: all.
    interface_of: the interface the route to a client address leaves by. Conntrack does
    not record the interface a flow came in by; for an entry that was never DNAT'd
    while rules that match on it would DNAT it now (Docker's `! -i docker0`), the
    route to the client stands in for it, and the entry says so (`arrival`). It is
    never used against a DNAT'd entry: there, not knowing means both ways.
    """
    local = evaluator.local
    forwarded = evaluator.forwarded_ports()
    stale: list[StaleEntry] = []
    undecided: list[Undecided] = []
    targets: dict[str, None] = {}
    judged = 0
    for entry in entries:
        orig = entry.orig
        if orig.proto != socket.IPPROTO_UDP or (port is not None and orig.dport != port):
            continue
        reply = entry.reply
        natted = reply.src != orig.dst or reply.sport != orig.dport
        if natted and not entry.status & IPS_DST_NAT:
            continue  # not netfilter's DNAT (IPVS, a helper): not for these rules to judge
        if not natted and forwarded is not None and orig.dport not in forwarded:
            continue
        judged += 1
        flow = Flow(orig.family, orig.proto, orig.src, orig.sport, orig.dst, orig.dport,
                    local=orig.src in local)
        outcome = evaluator.outcome(flow)
        targets.update(dict.fromkeys(outcome.describe(flow)))
        service = endpoint(orig.dst, orig.dport)
        target = endpoint(reply.src, reply.sport)
        why: StaleWhy
        arrival = None
        if natted:
            if outcome.sends_to(reply.src, reply.sport, flow, local):
                continue
            why = "rule-changed" if outcome.targets else "no-longer-forwarded"
        else:
            if outcome.unnatted and outcome.targets and interface_of and not flow.local:
                arrival = interface_of(orig.src)
                if arrival is not None:
                    outcome = evaluator.outcome(flow._replace(iif=arrival))
            if outcome.unnatted or not outcome.targets:
                continue
            why = "never-natted"
        if outcome.undetermined:
            undecided.append(Undecided(service, target, outcome.undetermined[0]))
            continue
        used = usage.get(entry.id) if usage is not None and entry.id is not None else None
        start = used.start if used is not None else None
        stale.append(
            StaleEntry(
                entry=entry,
                family="ipv6" if orig.family == socket.AF_INET6 else "ipv4",
                service=service,
                client=endpoint(orig.src, orig.sport),
                target=target,
                current=outcome.describe(flow),
                why=why,
                age=max(0.0, now - start / 1e9) if start is not None else None,
                idle=idle_seconds(entry, udp_timeout, stream_timeout),
                packets=used.orig_packets if used is not None else None,
                rules=outcome.rules,
                arrival=arrival,
            )
        )
    return Judgement(tuple(stale), tuple(undecided), judged, tuple(targets))


def aggregate(
    stale: Sequence[StaleEntry], now: float, *, existing: bool
) -> list[StaleNatFinding]:
    """One finding per (service, stale target), clients counted, in first-seen order."""
    groups: dict[tuple[str, str], list[StaleEntry]] = {}
    for one in stale:
        groups.setdefault((one.service, one.target), []).append(one)
    findings = []
    for (service, target), members in groups.items():
        first = members[0]
        clients = {m.client for m in members}
        # The ones most worth seeing first: still in use, longest pinned.
        busiest = sorted(members, key=lambda m: (m.idle if m.idle is not None else 1e9,
                                                 -(m.age or 0.0)))
        findings.append(
            StaleNatFinding(
                family=first.family,
                proto="udp",
                service=service,
                stale_target=target,
                current_targets=first.current,
                why=first.why,
                clients=len(clients),
                entries=len(members),
                first_seen=now,
                last_seen=now,
                existing=existing,
                pinned=tuple(Pinned(m.client, m.age, m.idle, m.packets)
                             for m in busiest[:MAX_PINNED]),
                rules=first.rules,
                arrival=first.arrival,
            )
        )
    return findings


# -- the detector -----------------------------------------------------------------------------


class StaleNatDetector:
    """Keeps the stale-nat findings of one namespace (see the module docstring).

    `set_rules(ruleset, local_addresses)` before examining; `check()` judges a dump
    (all of the table, or the entries of some ports: `ports`), `examine()` is the
    protocol's entry for a resync dump (findings marked `existing`).
    """

    kind: Literal["stale-nat"] = "stale-nat"
    #: learns from dumps only: `one_feed` leaves it out of the event loop
    snapshot_only = True

    def __init__(
        self,
        *,
        udp_timeout: int = UDP_TIMEOUT,
        stream_timeout: int = UDP_TIMEOUT_STREAM,
        max_findings: int = 10_000,
    ) -> None:
        self.udp_timeout = udp_timeout
        self.stream_timeout = stream_timeout
        self.max_findings = max_findings
        self.evaluator: Evaluator | None = None
        #: the route's interface to a client (see `judge`); watch sets it
        self.interface_of: Callable[[str], str | None] | None = None
        self.findings: dict[tuple[str, str], StaleNatFinding] = {}
        #: keys the last check that covered their port found stale -> that port
        self._active: dict[tuple[str, str], int] = {}
        self.undecided: tuple[Undecided, ...] = ()

    def set_rules(self, ruleset: NatRuleset, local_addresses: Iterable[str]) -> None:
        self.evaluator = Evaluator(ruleset, local_addresses)

    def feed(self, event: CtEvent, now: float) -> tuple[StaleNatFinding, Change] | None:
        del event, now
        return None

    def check(
        self,
        entries: Sequence[CtEntry],
        now: float,
        *,
        usage: Mapping[int, CtUsage] | None = None,
        existing: bool = False,
        ports: Collection[int] | None = None,
        interface_of: Callable[[str], str | None] | None = None,
    ) -> list[tuple[StaleNatFinding, Change]]:
        """Judge a dump: the whole table (ports None) or every entry to `ports`.

        A (service, target) newly stale is NEW; one still stale is COUNTED with its
        clients and entries as this dump has them; one not stale any more is kept as
        history (`found`) and is NEW again if it comes back.
        """
        if self.evaluator is None:
            return []
        judgement = self._judge(entries, now, usage, interface_of)
        return self._conclude(judgement, now, existing, ports)

    def _judge(
        self,
        entries: Iterable[CtEntry],
        now: float,
        usage: Mapping[int, CtUsage] | None = None,
        interface_of: Callable[[str], str | None] | None = None,
    ) -> Judgement:
        assert self.evaluator is not None
        return judge(
            entries,
            self.evaluator,
            now=now,
            usage=usage,
            udp_timeout=self.udp_timeout,
            stream_timeout=self.stream_timeout,
            interface_of=interface_of or self.interface_of,
        )

    def _conclude(
        self, judgement: Judgement, now: float, existing: bool, ports: Collection[int] | None
    ) -> list[tuple[StaleNatFinding, Change]]:
        """What a judgement of a dump changes about the findings (`check`)."""
        self.undecided = judgement.undecided
        results: list[tuple[StaleNatFinding, Change]] = []
        found_now: dict[tuple[str, str], int] = {}
        for finding in aggregate(judgement.stale, now, existing=existing):
            key = finding.key
            found_now[key] = _port_of(finding.service)
            old = self.findings.get(key)
            if old is None and len(self.findings) >= self.max_findings:
                continue
            if old is not None:
                finding = replace(
                    finding,
                    first_seen=old.first_seen,
                    existing=old.existing if key in self._active else existing,
                )
            self.findings[key] = finding
            results.append((finding, Change.COUNTED if key in self._active else Change.NEW))
        for key, port in list(self._active.items()):
            if key not in found_now and (ports is None or port in ports):
                del self._active[key]
        self._active.update(found_now)
        return results

    def examine(
        self, entries: Sequence[CtEntry], now: float, *, complete: bool = False
    ) -> list[tuple[StaleNatFinding, Change]]:
        """A resync dump (watch's start-up, or after lost events): findings `existing`."""
        snapshot = self.snapshot(now, complete=complete)
        snapshot.add(entries)
        return snapshot.finish()

    def snapshot(self, now: float, *, complete: bool = False) -> StaleNatSnapshot:
        """`examine` fed chunk by chunk: each chunk judged as it comes (judging one
        entry never depends on another), the judgements merged at `finish`."""
        return StaleNatSnapshot(self, now, complete)

    def expire(self, now: float) -> None:
        """Nothing to forget: findings are kept as the watch's history (bounded by
        max_findings), and each check says what is stale now."""
        del now

    @property
    def active(self) -> list[StaleNatFinding]:
        """The findings the last checks found stale (not yet flushed or expired)."""
        return [self.findings[key] for key in self._active if key in self.findings]

    @property
    def active_ports(self) -> frozenset[int]:
        """The ports of the findings the last checks found stale (what a re-check of
        the entries still stale dumps)."""
        return frozenset(self._active.values())

    @property
    def found(self) -> Collection[StaleNatFinding]:
        return self.findings.values()


class StaleNatSnapshot:
    """One dump, chunk by chunk, for a StaleNatDetector (its `snapshot`)."""

    def __init__(self, detector: StaleNatDetector, now: float, complete: bool) -> None:
        self.detector = detector
        self.now = now
        self.ports: set[int] | None = None if complete else set()
        self.stale: list[StaleEntry] = []
        self.undecided: list[Undecided] = []
        self.judged = 0
        self.targets: dict[str, None] = {}

    def add(self, entries: Sequence[CtEntry]) -> None:
        """Some of the dump's entries, in its order."""
        if self.ports is not None:
            self.ports.update(e.orig.dport for e in entries)
        if self.detector.evaluator is None:
            return
        judgement = self.detector._judge(entries, self.now)
        self.stale += judgement.stale
        self.undecided += judgement.undecided
        self.judged += judgement.judged
        self.targets.update(dict.fromkeys(judgement.targets))

    def finish(self) -> list[tuple[StaleNatFinding, Change]]:
        """What the whole dump changed; the findings (existing), as `examine` gives them."""
        if self.detector.evaluator is None:
            return []
        judgement = Judgement(
            tuple(self.stale), tuple(self.undecided), self.judged, tuple(self.targets)
        )
        return self.detector._conclude(judgement, self.now, True, self.ports)


def _port_of(service: str) -> int:
    return int(service.rsplit(":", 1)[1])


# -- wording shared by watch and explain ----------------------------------------------------


def _plural(count: int, word: str, words: str) -> str:
    return f"{count} {word if count == 1 else words}"


def duration(seconds: float | None) -> str:
    """ "42 s", "3 min", "2.5 h"; "?" when unknown."""
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def usage_words(age: float | None, idle: float | None, packets: int | None) -> list[str]:
    """ "5 min old", "last used 0 s ago", "1500 datagrams": what is known of an entry."""
    words = []
    if age is not None:
        words.append(f"{duration(age)} old")
    if idle is not None:
        words.append(f"last used {duration(idle)} ago")
    if packets is not None:
        words.append(_plural(packets, "datagram", "datagrams"))
    return words


def stale_nat_text(finding: StaleNatFinding, mark: Callable[[str], str] = str) -> str:
    """One stale-nat finding in words, the same in watch and explain (`mark` styles the
    stale target).

    `198.51.100.13:5140 still sends 1 client (1 entry) to 198.51.100.21:5140; the
    rules now send new flows to 198.51.100.22:5140 (e.g. 192.0.2.3:5140: entry 5 min
    old, last used 0 s ago, 1500 datagrams)`.
    """
    service, stale_target = finding.service, mark(finding.stale_target)
    who = (
        f"{_plural(finding.clients, 'client', 'clients')} "
        f"({_plural(finding.entries, 'entry', 'entries')})"
    )
    now = ", ".join(finding.current_targets)
    if finding.why == "never-natted":
        via = (
            f" (arriving by {finding.arrival}, predicted from the route to the client)"
            if finding.arrival
            else ""
        )
        head = (
            f"{service}: {who} predate the DNAT and are still delivered to {service} "
            f"itself; the rules now send new flows{via} to {now}"
        )
    elif finding.why == "no-longer-forwarded" or not finding.current_targets:
        head = f"{service} still sends {who} to {stale_target}; the rules no longer forward it"
    else:
        head = (
            f"{service} still sends {who} to {stale_target}; the rules now send new flows "
            f"to {now}"
        )
    if finding.pinned:
        first = finding.pinned[0]
        words = usage_words(first.age, first.idle, first.packets)
        if first.age is not None:
            words[0] = f"entry {words[0]}"
        detail = f": {', '.join(words)}" if words else ""
        head += f" (e.g. {first.client}{detail})"
    return head
