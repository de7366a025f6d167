"""What `ctfix fix` says about a fix's effect: after --apply (what listening saw) and
in --status (what the diagnosis says since the fix). Effect, not presence.

Know before changing: "present" is the word for objects found in the kernel, which
proves that rules exist, not that they work; a line about the effect always says what
it rests on (how long it listened and how many requests came, or which conntrack
clock dated the evidence), because a quiet port proves nothing either way.
"""

from __future__ import annotations

from collections.abc import Sequence

from ctfix.core.diagnosis import wrong_text
from ctfix.core.model import FixEffect, WrongSourceReply


def present_line(steps: int) -> str:
    return f"present: all {steps} step(s) in the kernel (rules exist; the effect is below)"


def covers_lines(covers: Sequence[str]) -> list[str]:
    """`covers: clients of 203.0.113.10:40054, DNAT'd to 198.51.100.13:56789`."""
    return [f"covers: {who}" for who in covers]


def _services(found: Sequence[WrongSourceReply]) -> str:
    return ", ".join(sorted({w.service for w in found}))


def listened_lines(
    port: int, seconds: float, requests: int, found: Sequence[WrongSourceReply]
) -> list[str]:
    """After --apply: what the listening right after it saw."""
    window = f"in the {seconds:g} s after applying"
    if found:
        count = sum(w.count for w in found)
        return [
            f"effect: INEFFECTIVE for clients of {_services(found)}: {count} wrong-source "
            f"repl{'ies' if count > 1 else 'y'} {window}",
            *(f"  evidence: {wrong_text(w)}" for w in found),
        ]
    if not requests:
        return [
            f"effect: not shown yet: no request reached port {port} {window}; "
            f"`ctfix fix --status` (or `ctfix explain {port}`) tells later"
        ]
    return [
        f"effect: no wrong-source reply {window} ({requests} request"
        f"{'s' if requests != 1 else ''} to port {port})"
    ]


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def effect_lines(effect: FixEffect, now: float) -> list[str]:
    """--status: the effect since the fix was applied, and services it misses."""
    applied = f"applied {_ago(now - effect.applied_at)} ago"
    basis = "; ".join(effect.evidence)
    lines: list[str] = []
    if effect.verdict == "ineffective":
        count = sum(w.count for w in effect.since_fix)
        lines.append(
            f"effect: INEFFECTIVE for clients of {', '.join(effect.ineffective_for)}: "
            f"{count} wrong-source repl{'ies' if count > 1 else 'y'} since the fix was "
            f"{applied} ({basis})"
        )
        lines += [f"  evidence: {wrong_text(w)}" for w in effect.since_fix]
    elif effect.verdict == "no-failure-seen" and effect.whole_time:
        lines.append(f"effect: no wrong-source reply since the fix was {applied} ({basis})")
    elif effect.verdict == "no-failure-seen":
        lines.append(
            f"effect: no wrong-source reply in the {_ago(effect.window)} that conntrack "
            f"remembers (the fix was {applied}; {basis})"
        )
    else:
        lines.append(
            f"effect: unknown: nothing could show a wrong-source reply since the fix was "
            f"{applied} (conntrack unreadable); try --listen S"
        )
    lines += [
        f"NOT COVERED: clients of {s.label} (a DNAT newer than the fix): revert and apply "
        "again"
        for s in effect.uncovered
    ]
    return lines
