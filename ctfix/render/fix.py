"""`ctfix fix` output: the plan (dry run) and the result of --apply; as text for people
and as JSON documents for scripts. What is recorded (applied again, --status, --revert)
is reported by render/fix_status.py.

Know before changing: the plan's text shows every object a step creates and the
equivalent shell commands, so an engineer can review it (or run it by hand) before
--apply; the JSON keys are a contract (docs/json.md). Values come in as data from
ctfix.core.plan and ctfix.platform.remedy; nothing here looks at the system.
"present" is the word for objects found in the kernel, which proves that rules exist,
not that they work; a line about the effect always says what it rests on (how long it
listened and how many requests came, or which conntrack clock dated the evidence),
because a quiet port proves nothing either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ctfix.core.detectors.wrong_source_words import wrong_source_text
from ctfix.core.model import WrongSourceReply
from ctfix.core.plan import Plan, plan_to_dict
from ctfix.render.explain_json import wrong_json
from ctfix.render.jsonout import envelope
from ctfix.render.width import fill

if TYPE_CHECKING:
    from ctfix.platform.remedy import ApplyResult
    from ctfix.platform.remedy.conntrack import Flushed


# -- the plan (dry run, and --method bind) --------------------------------------------


def _said(text: str, width: int | None, indent: str = "", hang: str = "  ") -> str:
    """Prose filled at a terminal's width (none: one line, for a pipe)."""
    return fill(text, width, indent, hang) if width else indent + text


def plan_text(plan: Plan, netns: str, apply_with: str | None, width: int | None = None) -> str:
    """The dry run (or bind's advice); prose fits `width`, commands stay verbatim (to
    review and paste)."""
    def said(text: str, indent: str = "", hang: str = "  ") -> str:
        return _said(text, width, indent, hang)

    if plan.method == "bind":
        out = [said(f"ctfix fix {plan.port} --method bind: nothing to apply; fix the application")]
        # prose filled; indented lines (commands, snippets, links) as they are
        out += [f"  {line}" if line[:1] == " " else said(line, "  ", "  ") for line in plan.advice]
        return "\n".join(out) + "\n"
    out = [
        said(
            f"ctfix fix {plan.port} --method {plan.method} (netns {netns}): "
            f"{len(plan.steps)} step(s), dry run, nothing changed"
        )
    ]
    out += [said(f"warning: {warning}", "  ", "    ") for warning in plan.warnings]
    out += [said(note, "  ", "    ") for note in plan.notes]
    out += [said(f"covers: clients of {target.label}", "  ", "    ") for target in plan.covers]
    for number, step in enumerate(plan.steps, 1):
        out += ["", said(f"{number}. {step.summary}", "", "   ")]
        out += [said(f"creates: {obj}", "   ", "     ") for obj in step.creates]
        for command in step.commands:
            first, *rest = command.splitlines()
            out.append(f"   $ {first}")
            out += [f"     {line}" for line in rest]
        out += [f"   undo: {command}" for command in step.undo]
    for check in plan.checks:
        marked = f" marked {check.mark:#x}" if check.mark is not None else ""
        by = f" by {check.interface}" if check.interface else ""
        out += [
            "",
            said(
                f"after apply, check: a reply to {check.destination}{marked} leaves from "
                f"{check.source}{by}"
            ),
        ]
    if apply_with:
        line = f"apply with: {apply_with}"
        # a command is never broken: it goes under its label when the line is too wide
        fits = not width or len(line) <= width
        out += ["", line] if fits else ["", "apply with:", f"  {apply_with}"]
    return "\n".join(out) + "\n"


def plan_document(plan: Plan, netns: str) -> dict[str, Any]:
    return {**envelope(netns), "applied": False, "plan": plan_to_dict(plan)}


# -- --apply --------------------------------------------------------------------------


def checked_lines(plan: Plan) -> list[str]:
    """What --apply checked in the kernel besides presence: each route lookup."""
    return [
        f"route lookup: a reply from UDP port {plan.port} to {c.destination}"
        + (f" marked {c.mark:#x}" if c.mark is not None else "")
        + f" now leaves from {c.source}"
        + (f" by {c.interface}" if c.interface else "")
        for c in plan.checks
    ]


def present_line(steps: int) -> str:
    return f"present: all {steps} step(s) in the kernel (rules exist; the effect is below)"


@dataclass(frozen=True, slots=True)
class Listened:
    """What listening after --apply saw (platform.snapshot.Listened, as values)."""

    seconds: float
    requests: int
    findings: tuple[WrongSourceReply, ...]


def _services(found: Sequence[WrongSourceReply]) -> str:
    return ", ".join(sorted({w.service for w in found}))


def listened_lines(port: int, listened: Listened) -> list[str]:
    """After --apply: what the listening right after it saw."""
    window = f"in the {listened.seconds:g} s after applying"
    found = listened.findings
    if found:
        count = sum(w.count for w in found)
        return [
            f"effect: INEFFECTIVE for clients of {_services(found)}: {count} wrong-source "
            f"repl{'ies' if count > 1 else 'y'} {window}",
            *(f"  evidence: {wrong_source_text(w)}" for w in found),
        ]
    if not listened.requests:
        return [
            f"effect: not shown yet: no request reached port {port} {window}; "
            f"`ctfix fix --status` (or `ctfix explain {port}`) tells later"
        ]
    requests = listened.requests
    return [
        f"effect: no wrong-source reply {window} ({requests} request"
        f"{'s' if requests != 1 else ''} to port {port})"
    ]


def applied_text(
    plan: Plan, result: ApplyResult, netns: str, undo: str, listened: Listened | None = None
) -> str:
    if result.already:
        out = [f"ctfix fix {plan.port}: already applied ({plan.method}); nothing changed"]
    else:
        out = [
            f"ctfix fix {plan.port}: applied {plan.method} ({len(plan.steps)} step(s)) in "
            f"netns {netns}"
        ]
    out += [f"  covers: clients of {target.label}" for target in plan.covers]
    out.append(f"  {present_line(len(plan.steps))}")
    out += [f"  checked: {line}" for line in checked_lines(plan)]
    if listened is not None:
        out += [f"  {line}" for line in listened_lines(plan.port, listened)]
    out += [f"  warning: {warning}" for warning in plan.warnings]
    out += [f"  note: {note}" for note in result.notes]
    out.append(f"  undo with: {undo}")
    return "\n".join(out) + "\n"


def applied_document(
    plan: Plan, result: ApplyResult, netns: str, listened: Listened | None = None
) -> dict[str, Any]:
    return {
        **envelope(netns),
        "applied": not result.already,
        "already_applied": result.already,
        "present": len(plan.steps),
        "checks": checked_lines(plan),
        "notes": list(result.notes),
        "effect": None if listened is None else {
            "listened": listened.seconds,
            "requests": listened.requests,
            "wrong_source": [wrong_json(w) for w in listened.findings],
            "ineffective": bool(listened.findings),
        },
        "plan": plan_to_dict(plan),
    }


def _flush_notes(plan: Plan) -> list[str]:
    return [note for note in plan.notes if note.startswith("Nothing to revert")]


def _next_words(done: Flushed) -> tuple[list[str], list[str]]:
    """(checks, problems): where each flushed client's next entry went, in words."""
    checks: list[str] = []
    problems: list[str] = []
    for one in done.next:
        if one.target is None:
            checks.append(
                f"{one.client} sent nothing to {one.service} within {done.waited:g} s: its "
                "next entry was not checked"
            )
        elif one.follows_rules:
            checks.append(
                f"{one.client}'s next datagram to {one.service} made a new entry to "
                f"{one.target}, as the rules say"
            )
        else:
            port = one.service.rsplit(":", 1)[1]
            problems.append(
                f"{one.client}'s next datagram to {one.service} made a new entry to "
                f"{one.target}, not to {', '.join(one.current) or 'its own address'}: the "
                f"rules may be more than ctfix reads (`ctfix explain {port}`)"
            )
    return checks, problems


def flushed_text(plan: Plan, done: Flushed, netns: str) -> str:
    """--apply of flush-stale: what was deleted, where the clients' next entries went."""
    entries = f"{done.deleted} stale conntrack entr{'ies' if done.deleted != 1 else 'y'}"
    gone = f" ({done.gone} already gone: expired, or taken by a newer flow)" if done.gone else ""
    checks, problems = _next_words(done)
    out = [f"ctfix fix {plan.port}: deleted {entries} in netns {netns}{gone}"]
    out += [f"  checked: {line}" for line in checks]
    out += [f"  PROBLEM: {line}" for line in problems]
    out += [f"  note: {note}" for note in _flush_notes(plan)]
    return "\n".join(out) + "\n"


def flushed_document(plan: Plan, done: Flushed, netns: str) -> dict[str, Any]:
    checks, problems = _next_words(done)
    return {
        **envelope(netns),
        "applied": True,
        "recorded": False,
        "deleted": done.deleted,
        "already_gone": done.gone,
        "next_entries": [
            {
                "client": one.client,
                "service": one.service,
                "target": one.target,
                "current_targets": list(one.current),
                "follows_rules": one.follows_rules,
            }
            for one in done.next
        ],
        "checks": checks,
        "problems": problems,
        "notes": _flush_notes(plan),
        "plan": plan_to_dict(plan),
    }


def interrupted_text(
    port: int, signal_name: str, removed: int, failures: Sequence[str], revert: str
) -> str:
    """For stderr: a signal stopped --apply, which rolled back (or could not)."""
    if failures:
        return (
            f"ctfix fix {port}: interrupted ({signal_name}); rollback incomplete: "
            f"{failures[0]}; run `{revert}`\n"
        )
    return (
        f"ctfix fix {port}: interrupted ({signal_name}); rolled back {removed} step(s) "
        "already made, nothing changed\n"
    )
