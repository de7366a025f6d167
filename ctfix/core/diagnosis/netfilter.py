"""Netfilter rules that touch the port: which cannot fix wrong-source replies and why,
and which addresses a working snat-zone setup already rewrites replies to. Pure.

Know before changing: the PROBLEM_* texts are shown with each rule and in the
runbook; a rule is judged together with the rules of its own backend only (a zone in
nftables does not rescue an SNAT in iptables-legacy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ctfix.core.addr import endpoint, unmap
from ctfix.core.diagnosis.codes import reason
from ctfix.core.model import Reason, RuleHit
from ctfix.core.snapshot import NetfilterRule

# -- what cannot work, and why (shown with each rule, and in the runbook) --------------

PROBLEM_SNAT_REPLY = (
    "SNAT/MASQUERADE of the reply cannot work alone: the rewritten reply has the same "
    "tuple as the request's conntrack entry, so it is dropped when its entry is "
    "confirmed (conntrack -S: insert_failed rises) and the server's sendto() fails "
    "with EPERM. It needs the reply in another conntrack zone first (snat-zone)."
)
PROBLEM_NOTRACK = (
    "NOTRACK takes the port's packets out of connection tracking: no NAT can rewrite "
    "untracked replies, and conntrack-based tools (ctfix watch) see nothing."
)
PROBLEM_DNAT_REPLY = (
    "DNAT/REDIRECT on the reply path changes where the reply goes, not the source "
    "address it leaves with: the client still sees the wrong source."
)
PROBLEM_ZONE_ALONE = (
    "a conntrack zone alone changes nothing on the wire: the reply still leaves from "
    "the routing source. It only helps together with an SNAT of the zoned replies "
    "(snat-zone)."
)
PROBLEM_SNAT_REQUEST = (
    "SNAT/MASQUERADE of the requests changes the address the server sees as the "
    "client, not the source it answers from."
)
PROBLEM_DROP_REPLY = "drops the server's replies from the port."

_NAT_SOURCE = frozenset({"snat", "masquerade"})


def rule_problem(rule: NetfilterRule, ruleset: Sequence[NetfilterRule]) -> str | None:
    """Why a rule that mentions the port cannot fix wrong-source replies (None: fine)."""
    same_backend = [r for r in ruleset if r.backend == rule.backend]
    zoned = any("zone" in r.actions and r.matches_sport for r in same_backend)
    snatted = any(
        r.actions & _NAT_SOURCE and (r.matches_sport or r.matches_mark or r.to_port)
        for r in same_backend
    )
    if "notrack" in rule.actions:
        return PROBLEM_NOTRACK
    if rule.actions & _NAT_SOURCE:
        if rule.matches_sport or (rule.to_port and not rule.matches_dport):
            return None if zoned else PROBLEM_SNAT_REPLY
        if rule.matches_dport:
            return PROBLEM_SNAT_REQUEST
    if rule.actions & {"dnat", "redirect"} and rule.matches_sport:
        return PROBLEM_DNAT_REPLY
    if "zone" in rule.actions and rule.matches_sport and not snatted:
        return PROBLEM_ZONE_ALONE
    if rule.actions & {"drop", "reject"} and rule.matches_sport:
        return PROBLEM_DROP_REPLY
    return None



@dataclass(frozen=True, slots=True)
class Rewrites:
    """Where a working snat-zone setup rewrites the port's replies to: an SNAT of the
    replies that a zone in the same backend makes possible, by (address, port); the
    port is None when the SNAT keeps the server's port."""

    port: int
    endpoints: frozenset[tuple[str, int | None]] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.endpoints)

    def to(self, address: str, port: int | None = None) -> bool:
        """Are wrong-source replies rewritten to address:port (default: the server's)?"""
        port = self.port if port is None else port
        return (address, port) in self.endpoints or (
            port == self.port and (address, None) in self.endpoints
        )

    def names(self) -> list[str]:
        """`198.51.100.13` (the server's port kept), `203.0.113.10:40054`, sorted."""
        return sorted(
            address if port in (None, self.port) else endpoint(address, port)
            for address, port in self.endpoints
        )


def rewrites(port: int, ruleset: Sequence[NetfilterRule]) -> Rewrites:
    return Rewrites(
        port,
        frozenset(
            (unmap(r.nat_to), r.nat_port)
            for r in ruleset
            if r.nat_to
            and r.actions & _NAT_SOURCE
            and (r.matches_sport or r.to_port)
            and rule_problem(r, ruleset) is None
        ),
    )


def rule_hits(ruleset: Sequence[NetfilterRule]) -> tuple[RuleHit, ...]:
    return tuple(
        RuleHit(
            backend=r.backend,
            table=f"{r.family} {r.table}" if r.backend == "nftables" else r.table,
            chain=r.chain,
            rule=r.rule,
            problem=rule_problem(r, ruleset),
        )
        for r in ruleset
    )


def netfilter_reasons(rewritten: Rewrites, rules: Sequence[RuleHit]) -> list[Reason]:
    reasons: list[Reason] = []
    if rewritten:
        reasons.append(
            reason(
                "snat-zone-in-place",
                f"Replies to clients of {', '.join(rewritten.names())} that leave from another "
                "address are rewritten by SNAT in a separate conntrack zone (snat-zone): those "
                "clients get the right source.",
            )
        )
    doomed = [r for r in rules if r.problem]
    if doomed:
        reasons.append(
            reason(
                "rules-cannot-help",
                f"{len(doomed)} netfilter rule{'s' if len(doomed) > 1 else ''} on the port "
                "cannot fix this (see the rules and their problems).",
            )
        )
    return reasons
