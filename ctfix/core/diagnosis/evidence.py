"""What conntrack shows about the port: wrong-source replies (the detector's findings
in a snapshot), answered and unanswered requests, and which recorded replies predate a
remedy now in place. Pure.

Know before changing: recorded evidence is *history* only when a change on the host
now answers those clients from the right source (a working snat-zone rewrite to the
address the server had to answer from, or a policy rule through which the route
lookup for the client's network now gives that address); what `--listen` saw
happened during this run and is never discounted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from ctfix.core.addr import family_name, parse_endpoint, unmap
from ctfix.core.clientnet import ClientNetworks
from ctfix.core.decode import CtEntry
from ctfix.core.detectors.wrong_source import (
    WrongSourceDetector,
    WrongSourceFinding,
)
from ctfix.core.detectors.wrong_source_words import wrong_source_text
from ctfix.core.diagnosis.codes import reason
from ctfix.core.diagnosis.netfilter import Rewrites
from ctfix.core.diagnosis.requests import Request, client_networks_of, newest_last
from ctfix.core.model import Evidence, Family, Reason, WrongSourceReply
from ctfix.core.snapshot import Snapshot
from ctfix.core.zones import CT_ZONE

MAIN_TABLE = 254


def wrong_source_reply(finding: WrongSourceFinding) -> WrongSourceReply:
    """watch's detector finding as explain's evidence record (0.0: an undated time)."""
    return WrongSourceReply(
        client=finding.client,
        service=finding.service,
        expected_source=finding.expected_source,
        actual_source=finding.actual_source,
        mismatch=finding.mismatch,
        count=finding.count,
        clients=finding.clients,
        client_network=finding.client_network,
        replies_from_other_port=finding.replies_from_other_port,
        first_seen=finding.first_seen or None,
        last_seen=finding.last_seen or None,
    )


def last_packet(entry: CtEntry, snapshot: Snapshot) -> float:
    """When the entry's latest packet passed, as far as the table tells (0.0: unknown).

    Two clocks: the entry's start (conntrack timestamps, net.netfilter.
    nf_conntrack_timestamp=1), and its time left: an unreplied UDP entry lives
    nf_conntrack_udp_timeout seconds after its last packet, so that packet passed
    (timeout - left) seconds before the dump, at the latest. The kernel rounds the
    time left down, so this errs early: it never dates a reply after the fact.
    """
    times: list[float] = []
    if entry.start is not None:
        times.append(entry.start / 1e9)
    if (
        entry.timeout is not None
        and snapshot.udp_timeout
        and snapshot.taken_at
        and not entry.seen_reply
    ):
        times.append(snapshot.taken_at - max(0, snapshot.udp_timeout - entry.timeout))
    return max(times, default=0.0)


def gather(
    snapshot: Snapshot,
    requests: list[Request],
    local: set[str],
    other_port: Callable[[int], bool] | None = None,
) -> Evidence:
    """Wrong-source findings, and the port's requests that were answered or not.

    The detector keeps only remote clients' flows to local addresses as requests
    (ctfix.core.detectors.wrong_source), so the server's own outgoing flows, including
    the snat-zone remedy's zoned replies, are never paired as client and reply. A
    request is answered when its entry saw a reply, or when another entry answered its
    client: a wrong-source reply (counted in `wrong_source`), a zoned reply that left
    from the right source (healthy, and `through_fix` when the zone is ctfix's: the
    remedy's answer, never in `right_answers`, which show the server's own), or, for a
    program that answers from other ports by design (`other_port`), a reply from the
    addressed address and a new port (healthy). Client networks are
    ctfix.core.clientnet's, as in watch.
    """
    networks = client_networks_of(snapshot.addresses)
    detector = WrongSourceDetector(
        local_addresses=frozenset(local),
        track_answers=True,
        networks=networks,
        other_port=other_port,
    )
    # Each reply is dated by its own entry (`last_packet`: when it last left), not as
    # watch's start-up history: a fix's effect is judged by those times.
    detector.dumps_are_history = False
    detector.resync(
        newest_last(snapshot.flows), now=0.0, time_of=lambda e: last_packet(e, snapshot)
    )
    answered = detector.answered or {}
    merged: dict[tuple[str, str, str], WrongSourceReply] = {}
    for finding in detector.found:
        merged[finding.key] = wrong_source_reply(finding)
    for live in snapshot.live_findings:
        key = finding_key(live, networks)
        # --listen resyncs from the table first: its count includes the table's.
        if key not in merged or live.count > merged[key].count:
            merged[key] = live
        elif live.last_seen is not None:  # what --listen saw is the latest
            merged[key] = replace(merged[key], last_seen=live.last_seen)
    wrong = tuple(sorted(merged.values(), key=lambda w: (w.service, w.actual_source, w.client)))
    healthy = through_fix = 0
    right: list[tuple[str, str]] = []
    for r in requests:
        wrongly = answered.get((r.client, r.client_port))
        if r.replied or wrongly is False:
            healthy += 1
            if not r.replied and (r.client, r.client_port) in detector.through_fix:
                through_fix += 1  # the remedy's answer: it shows nothing of the server
            else:
                right.append((r.client, r.addressed))
    # `unanswered` is the unanswered records' count (ctfix.core.diagnosis.unanswered),
    # filled in by diagnose(): one count of requests without a usable reply.
    return Evidence(
        wrong_source=wrong,
        healthy=healthy,
        through_fix=through_fix,
        right_answers=tuple(dict.fromkeys(right)),
    )


def finding_key(
    wrong: WrongSourceReply, networks: ClientNetworks | None = None
) -> tuple[str, str, str]:
    """The detector's aggregation key of a wrong-source record."""
    network = wrong.client_network or (networks or ClientNetworks()).network(
        unmap(parse_endpoint(wrong.client)[0])
    )
    return (wrong.service, wrong.actual_source, network)



def _remedy_for(
    wrong: WrongSourceReply, snapshot: Snapshot, rewritten: Rewrites, expected: str
) -> str | None:
    """The remedy now in place that answers this record's clients from the right
    source, in words; None when there is none (the record is the present).

    Only a change on the host counts, never a claim: a working snat-zone rewrite to
    the address the server had to answer from (for clients of a DNAT'd service: to
    the service itself), or a policy rule on the port through which the route lookup
    for the client's network now gives that address. A knowledge-base entry or a
    network that merely looks ok proves nothing.
    """
    service = parse_endpoint(wrong.service)
    forwarded = unmap(service[0]) != expected or service[1] != snapshot.port
    if forwarded and rewritten.to(unmap(service[0]), service[1]):
        return f"the snat-zone rewrite to {wrong.service}"
    if not forwarded and rewritten.to(expected):
        return f"the snat-zone rewrite to {expected}"
    policy = [r.text for r in snapshot.policy_rules if r.matches_reply_from(snapshot.port)]
    if not policy:
        return None
    client = ipaddress.ip_address(unmap(parse_endpoint(wrong.client)[0]))
    for network, probe in snapshot.probes.items():
        net = ipaddress.ip_network(network)
        if net.version != client.version or client not in net:
            continue
        choice = next((c for c in snapshot.route_choices if c.destination == probe), None)
        if (
            choice is not None
            and choice.table not in (None, MAIN_TABLE)
            and choice.source is not None
            and unmap(choice.source) == expected
        ):
            return f"the policy rule `{policy[0]}` (replies to {network} from {expected})"
    return None




def through_fix_reasons(evidence: Evidence, rewritten: Rewrites) -> list[Reason]:
    """Requests answered through ctfix's own zones while no snat-zone rewrite is in
    place (a fix reverted moments ago, its entries still in the table): the replies
    were the remedy's, and say nothing about the server (ctfix.core.zones)."""
    count = evidence.through_fix
    if not count or rewritten:
        return []
    return [
        reason(
            "answered-through-fix",
            f"{count} request{'s' if count > 1 else ''} in the table "
            f"{'were' if count > 1 else 'was'} answered through ctfix's snat-zone fix "
            f"(replies rewritten in conntrack zones from {CT_ZONE}), which is no longer "
            "in place: those replies were the fix's work, not the server's, so they show "
            "nothing of how the server answers now. They leave the table with their "
            "entries.",
        )
    ]


def live_keys(snapshot: Snapshot) -> set[tuple[str, str, str]]:
    return {finding_key(w) for w in snapshot.live_findings}


def evidence_reasons(evidence: Evidence, snapshot: Snapshot) -> list[Reason]:
    """Each wrong-source record, and what listening did not see."""
    live = live_keys(snapshot)
    reasons: list[Reason] = []
    for wrong in evidence.wrong_source:
        seen_live = finding_key(wrong) in live
        when = " (seen live, during --listen)" if seen_live else ""
        reasons.append(
            reason(
                "wrong-source-live" if seen_live else "wrong-source-seen",
                f"Conntrack shows wrong-source replies{when}: {wrong_source_text(wrong)}. A "
                "connect()ed client drops such a reply and answers ICMP port unreachable.",
            )
        )
    if snapshot.listened_seconds and not snapshot.live_findings:
        reasons.append(
            reason(
                "nothing-seen-live",
                f"No wrong-source reply was seen during {snapshot.listened_seconds:g} s of "
                "listening.",
            )
        )
    return reasons


@dataclass(frozen=True, slots=True)
class Present:
    """The wrong-source records that are the present, and why the others are history."""

    current: tuple[WrongSourceReply, ...]
    history: tuple[Reason, ...]


def after_fix(wrong: WrongSourceReply, snapshot: Snapshot) -> bool:
    """Did a reply of this record leave after the recorded fix was applied? Seen live
    while listening after it, or dated after it by the table (`last_packet`)."""
    if snapshot.fix is None:
        return False
    applied = snapshot.fix.applied_at
    if finding_key(wrong) in live_keys(snapshot) and (snapshot.listened_since or 0) >= applied:
        return True
    return wrong.last_seen is not None and wrong.last_seen > applied


def split_history(
    evidence: Evidence,
    snapshot: Snapshot,
    rewritten: Rewrites,
    caveat: Collection[Family] = (),
) -> Present:
    """Recorded evidence is history only when a remedy now in place covers its clients
    and nothing dates it after the recorded fix; what --listen saw happened during this
    run and is never discounted. `caveat`: families whose one wrong-source reply is the
    program's documented first-request caveat (ctfix.core.diagnosis.listeners): not
    the present either (its reason says what it is)."""
    live = live_keys(snapshot)
    current: list[WrongSourceReply] = []
    history: dict[str, int] = {}
    for wrong in evidence.wrong_source:
        if family_name(unmap(parse_endpoint(wrong.client)[0])) in caveat:
            continue
        expected = unmap(parse_endpoint(wrong.expected_source)[0])
        remedy = None
        if finding_key(wrong) not in live and not after_fix(wrong, snapshot):
            remedy = _remedy_for(wrong, snapshot, rewritten, expected)
        if remedy is None:
            current.append(wrong)
        else:
            history[remedy] = history.get(remedy, 0) + wrong.count
    reasons = tuple(
        reason(
            "history-predates-fix",
            f"The {replies} wrong-source repl{'ies' if replies > 1 else 'y'} in the "
            f"conntrack table went to clients that {remedy} now answers from the right "
            "source: they predate the change and expire with their entries (30 s for "
            "unreplied UDP).",
        )
        for remedy, replies in history.items()
    )
    return Present(tuple(current), reasons)
