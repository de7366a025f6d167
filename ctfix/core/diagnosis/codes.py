"""The reason codes a diagnosis can give: the stable part of `reasons[]` that scripts
and tests branch on (the text is for people and may change).

Know before changing: a code is a contract. Add codes, never rename one or reuse it
for another meaning; each is explained in docs/json.md (tests/unit/test_reason_codes.py
fails when one is not).
"""

from __future__ import annotations

from typing import Literal

from ctfix.core.model import Reason

ReasonCode = Literal[
    # who is on the port
    "nothing-bound",
    "nothing-answers",
    "forwarded-by-dnat",
    "dnat-to-other-port",
    "forwarded-here-by-dnat",
    "forwarded-to-backend",
    "dnat-destination-unknown",
    "connected-socket",
    "wildcard-socket",
    "specific-bind",
    "answers-from-destination",
    "one-way-service",
    "knowledge-base-contradicted",
    "first-reply-caveat",
    "observed-right-source",
    "fix-already-in-effect",
    # evidence
    "wrong-source-seen",
    "wrong-source-live",
    "nothing-seen-live",
    "history-predates-fix",
    "answered-through-fix",
    "no-conntrack-evidence",
    # stale NAT: entries the DNAT rules no longer send where they go
    "stale-nat",
    "stale-nat-not-judged",
    "not-tracked",
    "tracking-switched-on",
    # exposure per client network
    "client-network-exposed",
    "policy-rule-wrong",
    "only-matching-clients-seen",
    # the uplink a reply to remote clients leaves by
    "reply-leaves-other-uplink",
    "reroute-in-place",
    # netfilter rules
    "snat-zone-in-place",
    "rules-cannot-help",
    # the fix ctfix recorded for the port
    "fix-ineffective",
    "fix-not-covering",
    "netfilter-not-read",
    # unanswered requests, per service and reason (ctfix.core.diagnosis.unanswered)
    "unanswered-no-socket",
    "unanswered-no-reply",
    "unanswered-wrong-source",
    "unanswered-stale-nat",
    "unanswered-one-way",
]


def reason(code: ReasonCode, text: str) -> Reason:
    """A diagnosis reason; `code` is checked against ReasonCode by mypy."""
    return Reason(code, text)
