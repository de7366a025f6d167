"""Stale NAT entries of the port: conntrack entries of clients that still go to a
target the current DNAT rules no longer name (ctfix.core.detectors.stale_nat). Pure.

Know before changing: only entries sent *to* the port count (the port clients send
to: a Docker published port, a Service's port), judged against the rules as the
snapshot read them; where the rules could not be followed the reason says ctfix
could not judge, and the verdict does not move.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctfix.core.detectors import UDP_TIMEOUT, UDP_TIMEOUT_STREAM
from ctfix.core.detectors.stale_nat import (
    StaleEntry,
    StaleNatFinding,
    aggregate,
    judge,
    stale_nat_text,
)
from ctfix.core.diagnosis.codes import reason
from ctfix.core.model import Fix, Reason
from ctfix.core.nat import Evaluator
from ctfix.core.snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class StaleNat:
    """What the port's conntrack entries show against its DNAT rules."""

    entries: tuple[StaleEntry, ...] = ()
    findings: tuple[StaleNatFinding, ...] = ()
    reasons: tuple[Reason, ...] = ()
    fixes: tuple[Fix, ...] = ()
    #: where the rules send the port's clients now: nothing need be bound here
    backends: tuple[str, ...] = ()


def forwarded_reason(port: int, backends: tuple[str, ...]) -> Reason:
    """For a port without sockets that the rules forward to backends elsewhere."""
    return reason(
        "forwarded-to-backend",
        f"Nothing is bound to UDP port {port} here, and none needs to be: the DNAT rules "
        f"forward its clients to {', '.join(backends)}.",
    )


def stale_nat(snapshot: Snapshot) -> StaleNat:
    """The port's stale entries, their reasons and the flush-stale fix (if any)."""
    if snapshot.nat_rules is None or snapshot.conntrack_error:
        return StaleNat()
    port = snapshot.port
    now = snapshot.taken_at
    evaluator = Evaluator(snapshot.nat_rules, (a.address for a in snapshot.addresses))
    udp = snapshot.udp_timeout or UDP_TIMEOUT
    stream = snapshot.udp_timeout_stream or UDP_TIMEOUT_STREAM
    judgement = judge(
        snapshot.flows,
        evaluator,
        now=now,
        usage=snapshot.nat_usage,
        udp_timeout=udp,
        stream_timeout=stream,
        port=port,
        interface_of=snapshot.client_interfaces.get,
    )
    findings = tuple(aggregate(judgement.stale, now, existing=True))
    reasons = [
        reason(
            "stale-nat",
            f"STALE NAT: {stale_nat_text(f)}. Conntrack keeps such an entry for as long as "
            "the client sends, so its datagrams never reach the current target; deleting "
            "exactly these entries lets the next datagram follow the rules.",
        )
        for f in findings
    ]
    if judgement.undecided:
        first = judgement.undecided[0]
        reasons.append(
            reason(
                "stale-nat-not-judged",
                f"Could not judge {len(judgement.undecided)} DNAT'd "
                f"entr{'ies' if len(judgement.undecided) > 1 else 'y'} of the port (e.g. "
                f"{first.service} -> {first.target}) against the rules: {first.why}. "
                "ctfix does not call them stale.",
            )
        )
    fixes: tuple[Fix, ...] = ()
    if judgement.stale:
        count = len(judgement.stale)
        fixes = (
            Fix(
                method="flush-stale",
                summary=f"delete the {count} stale conntrack entr{'ies' if count > 1 else 'y'} "
                "of the port, exactly (by tuple and id), so that the clients' next datagrams "
                "follow the current rules",
                detail=f"ctfix fix {port} --method flush-stale lists them; add --apply to "
                "delete them. Nothing to revert: a deleted entry is re-created by the "
                "client's next datagram, the way the rules say now.",
                recommended=True,
            ),
        )
    return StaleNat(judgement.stale, findings, tuple(reasons), fixes, judgement.targets)
