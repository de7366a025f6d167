"""Does the fix ctfix recorded for the port work? Effect, not presence. Pure.

Know before changing (the definitions `fix --status` and explain show):
* The fix's *apply time* comes from its record (the state file, a hint); the rules
  themselves are read from the kernel elsewhere. Without a record there is no
  verdict here (explain still judges rules it finds, as history or not).
* *Since the fix*: a wrong-source reply dated after the apply time, by conntrack
  (the entry's start with nf_conntrack_timestamp=1, or its time left; see
  `evidence.last_packet`), or seen live while listening after it.
* *Ineffective*: wrong-source replies since the fix, named by the services their
  clients sent to. *Uncovered*: a service a DNAT forwards here now, with one known
  address and port, that a snat-zone fix does not remember clients of (a DNAT made
  after the fix). *No failure seen* is not proof that it works: the table keeps an
  unreplied entry for nf_conntrack_udp_timeout seconds only, and quiet clients send
  nothing to fail; the wording says what was looked at.
"""

from __future__ import annotations

from collections.abc import Sequence

from ctfix.core.addr import family_name
from ctfix.core.detectors.wrong_source_words import wrong_source_text
from ctfix.core.diagnosis.codes import reason
from ctfix.core.diagnosis.evidence import after_fix
from ctfix.core.model import (
    Evidence,
    Family,
    FixEffect,
    FixVerdict,
    ForwardedService,
    Reason,
)
from ctfix.core.snapshot import Snapshot


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _dated_by(snapshot: Snapshot) -> tuple[list[str], float, bool]:
    """What could have shown a wrong-source reply since the fix, how far back, and
    whether that reaches back to the apply."""
    found: list[str] = []
    window = 0.0
    fix = snapshot.fix
    since = snapshot.taken_at - fix.applied_at if fix and snapshot.taken_at else 0.0
    if snapshot.conntrack_error is None:
        if any(e.start is not None for e in snapshot.flows):
            found.append("conntrack timestamps")
        if snapshot.udp_timeout:
            found.append(
                "conntrack time left: a wrong-source reply stays in the table "
                f"{snapshot.udp_timeout} s after its last packet"
            )
            window = max(0.0, min(float(snapshot.udp_timeout), since))
    if snapshot.listened_seconds and fix and (snapshot.listened_since or 0) >= fix.applied_at:
        found.append(f"live conntrack events for {snapshot.listened_seconds:g} s")
        window = max(window, snapshot.listened_seconds)
    return found, window, bool(found) and window >= since


def fix_effect(
    snapshot: Snapshot,
    evidence: Evidence,
    forwarded: Sequence[ForwardedService],
    exposed: dict[Family, bool],
) -> FixEffect | None:
    """The recorded fix's effect on the port (None: nothing recorded)."""
    fix = snapshot.fix
    if fix is None:
        return None
    since = tuple(w for w in evidence.wrong_source if after_fix(w, snapshot))
    covered = {service for service, _target in fix.covers}
    uncovered = tuple(
        s
        for s in forwarded
        if fix.method == "snat-zone"
        and s.exact
        and s.service not in covered
        and exposed.get(family_name(s.target_address))
    )
    dated, window, whole_time = _dated_by(snapshot)
    verdict: FixVerdict = "ineffective" if since else "no-failure-seen" if dated else "unknown"
    return FixEffect(
        method=fix.method,
        applied_at=fix.applied_at,
        covers=tuple(
            f"clients of {service}" + (f", DNAT'd to {target}" if target != service else "")
            for service, target in fix.covers
        ),
        verdict=verdict,
        since_fix=since,
        ineffective_for=tuple(sorted({w.service for w in since})),
        uncovered=uncovered,
        evidence=tuple(dated),
        window=window,
        whole_time=whole_time,
    )


def effect_reasons(effect: FixEffect | None, snapshot: Snapshot) -> list[Reason]:
    """The fix's effect in words: ineffective (with the evidence), what it misses."""
    if effect is None:
        return []
    now = snapshot.taken_at
    applied = f"the {effect.method} fix recorded for port {snapshot.port}, applied " + (
        f"{_ago(now - effect.applied_at)} ago" if now else "earlier"
    )
    reasons: list[Reason] = []
    if effect.since_fix:
        count = sum(w.count for w in effect.since_fix)
        latest = max((w.last_seen or 0.0) for w in effect.since_fix)
        when = f", the latest {_ago(now - latest)} ago" if now and latest else ""
        reasons.append(
            reason(
                "fix-ineffective",
                f"INEFFECTIVE: {applied}, is in place, yet "
                f"{count} wrong-source repl{'ies' if count > 1 else 'y'} left since{when} "
                f"({'; '.join(effect.evidence) or 'the evidence'}), for clients of "
                f"{', '.join(effect.ineffective_for)}: "
                + "; ".join(wrong_source_text(w) for w in effect.since_fix)
                + ".",
            )
        )
    for service in effect.uncovered:
        reasons.append(
            reason(
                "fix-not-covering",
                f"Requests to {service.label} reach the port, and {applied} does not "
                "remember their clients (the DNAT is newer than the fix): revert it and "
                "apply it again to cover them.",
            )
        )
    return reasons
