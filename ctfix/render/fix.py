"""`ctfix fix` output: the plan (dry run), the result of --apply, --status, --revert;
as text for people and as JSON documents for scripts.

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

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ctfix.core.detectors.wrong_source_words import wrong_source_text
from ctfix.core.model import FixEffect, WrongSourceReply
from ctfix.core.plan import Plan, Step, plan_to_dict, step_to_dict
from ctfix.render.explain import effect_json, wrong_json
from ctfix.render.jsonout import envelope
from ctfix.render.width import fill

if TYPE_CHECKING:
    from ctfix.platform.fixstate import RecordedFix, StepStatus
    from ctfix.platform.remedy import ApplyResult, Reverted
    from ctfix.platform.remedy.conntrack import Flushed
    from ctfix.platform.remedy.marks import Marked

#: (fix, [(step, recorded status, present in the kernel)]), as remedy.status gives it
StatusReport = Sequence[tuple["RecordedFix", Sequence[tuple[Step, "StepStatus", bool]]]]
#: per port, the recorded fix's effect (a string: why it could not be judged)
Effects = Mapping[int, "FixEffect | str"]


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


def already_text(port: int, fix: RecordedFix) -> str:
    """Same port and method already recorded and whole: nothing was planned again."""
    return f"ctfix fix {port}: already applied ({fix.method} via {fix.backend}); nothing changed\n"


def already_document(fix: RecordedFix, netns: str) -> dict[str, Any]:
    return {
        **envelope(netns),
        "applied": False,
        "already_applied": True,
        "method": fix.method,
        "backend": fix.backend,
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


# -- --status ---------------------------------------------------------------------------

#: {(port, step index): why the recorded step's kernel object is not ctfix's}
Foreign = Mapping[tuple[int, int], str]


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
        lines += [f"  evidence: {wrong_source_text(w)}" for w in effect.since_fix]
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


def failing(found: FixEffect | str | None) -> bool:
    """The fix is in place but ineffective, or misses a service DNAT'd to its port."""
    return isinstance(found, FixEffect) and (
        found.verdict == "ineffective" or bool(found.uncovered)
    )


def whole(report: StatusReport, foreign: Foreign | None = None) -> dict[int, bool]:
    """Per port: the fix is complete, every step is in the kernel, and every recorded
    object is ctfix's own (a record pointing elsewhere is never acted on)."""
    refused = foreign or {}
    return {
        fix.port: fix.complete
        and all(here for _s, _st, here in steps)
        and not any(port == fix.port for port, _index in refused)
        for fix, steps in report
    }


def by_port(marked: Sequence[Marked]) -> list[tuple[int, list[Marked]]]:
    """ctfix-marked objects grouped by port, in port order."""
    ports = sorted({m.port for m in marked})
    return [(port, [m for m in marked if m.port == port]) for port in ports]


def status_text(
    report: StatusReport,
    netns: str,
    state_path: str,
    revert: str,
    foreign: Foreign | None = None,
    stray: Sequence[Marked] = (),
    effects: Effects | None = None,
    now: float = 0.0,
) -> str:
    """`revert`: the revert command for this namespace (a port is appended for orphans);
    `effects`: each whole fix's effect (`now`: when they were judged)."""
    if not report and not stray:
        return f"ctfix fix --status: no fix recorded in netns {netns}\n"
    refused = foreign or {}
    complete = whole(report, refused)
    out = [f"ctfix fix --status (netns {netns}, {state_path}):"]
    for fix, steps in report:
        condition = "applied" if complete[fix.port] else (
            "INTERRUPTED apply: revert it" if not fix.complete else "DAMAGED: revert it"
        )
        out.append(f"  port {fix.port}: {fix.method} via {fix.backend}, {condition}")
        for index, (step, status, here) in enumerate(steps):
            why = refused.get((fix.port, index))
            mark = "FOREIGN" if why else "present" if here else "MISSING"
            first, *rest = step.creates or ("(nothing)",)
            out.append(f"    [{status:7}] {mark:7} {first}")
            # One object per line: an nftables table lists its parts.
            out += [f"    {'':9} {'':7} {obj}" for obj in rest]
            if why:
                out.append(f"    {'':9} refused: {why}")
        out += [f"    covers: clients of {c.get('label')}" for c in fix.covers]
        judged = (effects or {}).get(fix.port)
        if isinstance(judged, str):
            out.append(f"    effect: unknown: {judged}")
        elif judged is not None:
            out += [f"    {line}" for line in effect_lines(judged, now)]
        out += [f"    note: {note}" for note in fix.notes]
    for port, found in by_port(stray):
        out.append(
            f"  port {port}: no record explains {len(found)} object(s) with ctfix's marks "
            "(state file lost or edited?):"
        )
        out += [f"    {marked.obj}" for marked in found]
        out.append(f"  remove them with: {_with_port(revert, port)}")
    if not all(complete.values()):
        out.append(f"  revert with: {revert}")
    return "\n".join(out) + "\n"


def _effect(found: FixEffect | str | None) -> FixEffect | None:
    return found if isinstance(found, FixEffect) else None


def _error(found: FixEffect | str | None) -> str | None:
    return found if isinstance(found, str) else None


def _with_port(revert: str, port: int) -> str:
    """`ctfix fix --revert --netns X` -> `ctfix fix --revert PORT --netns X`."""
    head, sep, tail = revert.partition("--revert")
    return f"{head}{sep} {port}{tail}"


def status_document(
    report: StatusReport,
    netns: str,
    state_path: str,
    revert: str,
    foreign: Foreign | None = None,
    stray: Sequence[Marked] = (),
    effects: Effects | None = None,
) -> dict[str, Any]:
    refused = foreign or {}
    complete = whole(report, refused)
    found = effects or {}
    return {
        **envelope(netns),
        "state_file": state_path,
        "fixes": [
            {
                "port": fix.port,
                "method": fix.method,
                "backend": fix.backend,
                "complete": fix.complete,
                "whole": complete[fix.port],
                "ok": complete[fix.port] and not failing(found.get(fix.port)),
                "started": fix.started,
                "applied": fix.applied,
                "covers": fix.covers,
                "effect": effect_json(_effect(found.get(fix.port))),
                "effect_error": _error(found.get(fix.port)),
                "notes": fix.notes,
                "steps": [
                    {
                        "status": status,
                        "present": here,
                        "step": step_to_dict(step),
                        "foreign": refused.get((fix.port, index)),
                    }
                    for index, (step, status, here) in enumerate(steps)
                ],
            }
            for fix, steps in report
        ],
        "unrecorded": [
            {
                "port": m.port,
                "kind": m.kind,
                "object": m.obj,
                "remove_with": _with_port(revert, m.port),
            }
            for m in stray
        ],
    }


# -- --revert ---------------------------------------------------------------------------


def reverted_lines(done: Sequence[Reverted]) -> list[str]:
    """Per port a summary, then one removed object per line."""
    lines: list[str] = []
    for fix in done:
        lines.append(
            f"port {fix.port}: removed {fix.removed_steps} of {fix.recorded} recorded step(s)"
            + (" (the others were not in the kernel)" if fix.removed_steps < fix.recorded else "")
        )
        lines.extend(f"  removed {obj}" for obj in fix.removed)
        lines.extend(f"  missing {obj} (already gone from the kernel)" for obj in fix.missing)
        lines.extend(f"  note: {note}" for note in fix.notes)
    return lines


def reverted_text(
    done: Sequence[Reverted],
    port: int | None,
    netns: str,
    nothing: str | None,
    stray: Sequence[Marked] = (),
) -> str:
    """`nothing`: why nothing was recorded (and so nothing changed); `stray`: objects with
    ctfix's marks that no record explained, removed too."""
    if nothing is not None and not stray:
        return f"ctfix fix --revert: {nothing}; nothing changed\n"
    what = f"port {port}" if port is not None else "every fix"
    out = [f"ctfix fix --revert: removed {what} in netns {netns}"]
    out += [f"  {line}" for line in reverted_lines(done)]
    for stray_port, found in by_port(stray):
        out.append(
            f"  port {stray_port}: removed {len(found)} object(s) that no record explained "
            "(found by ctfix's marks; the state file was lost or edited)"
        )
        out += [f"    removed {marked.obj}" for marked in found]
    return "\n".join(out) + "\n"


def reverted_document(
    done: Sequence[Reverted], netns: str, nothing: str | None, stray: Sequence[Marked] = ()
) -> dict[str, Any]:
    return {
        **envelope(netns),
        "changed": bool(done or stray),
        "reason": nothing,
        "reverted": [asdict(fix) for fix in done],
        "unrecorded_removed": [{"port": m.port, "kind": m.kind, "object": m.obj} for m in stray],
    }
