"""`ctfix fix` reports on what is recorded: the fix already applied (--apply again),
--status (each recorded fix against the kernel, and its effect) and --revert; as text
for people and as JSON documents for scripts.

Know before changing: the JSON keys are a contract (docs/json.md). Values come in as
data from ctfix.platform.fixstate and ctfix.platform.remedy; nothing here looks at the
system. "present" is the word for objects found in the kernel, which proves that rules
exist, not that they work; a line about the effect always says what it rests on (which
conntrack clock dated the evidence, or how long it listened), because a quiet port
proves nothing either way. The plan and --apply's report are in render/fix.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ctfix.core.detectors.wrong_source_words import wrong_source_text
from ctfix.core.model import FixEffect
from ctfix.core.plan import Step, spec_object, step_to_dict
from ctfix.render.explain_json import effect_json
from ctfix.render.jsonout import envelope

if TYPE_CHECKING:
    from ctfix.platform.fixstate import RecordedFix, StepStatus
    from ctfix.platform.remedy import Reverted
    from ctfix.platform.remedy.marks import Marked

#: (fix, [(step, recorded status, present in the kernel)]), as remedy.status gives it
StatusReport = Sequence[tuple["RecordedFix", Sequence[tuple[Step, "StepStatus", bool]]]]
#: per port, the recorded fix's effect (a string: why it could not be judged)
Effects = Mapping[int, "FixEffect | str"]


# -- the fix already applied (--apply again) -------------------------------------------


@dataclass(frozen=True, slots=True)
class Again:
    """The way to a fix planned afresh: revert the recorded one, then apply again."""

    revert: str
    apply: str


def _already_words(fix: RecordedFix, effect: FixEffect | str | None) -> str:
    """Why applying again changed nothing, and whether that is the end of it."""
    if isinstance(effect, FixEffect) and effect.uncovered:
        services = ", ".join(s.label for s in effect.uncovered)
        return (
            f"already applied ({fix.method} via {fix.backend}), but the recorded fix does "
            f"not cover clients of {services}, which a new plan would add; nothing changed"
        )
    if isinstance(effect, FixEffect) and effect.verdict == "ineffective":
        return (
            f"already applied ({fix.method} via {fix.backend}), but INEFFECTIVE: applying "
            "it again would change nothing; nothing changed"
        )
    return f"already applied ({fix.method} via {fix.backend}); nothing changed"


def already_text(
    port: int,
    fix: RecordedFix,
    effect: FixEffect | str | None = None,
    again: Again | None = None,
    now: float = 0.0,
) -> str:
    """Same port and method already recorded and whole: nothing was planned again;
    `effect`: what --status would say of it (uncovered services: the way out)."""
    out = [f"ctfix fix {port}: {_already_words(fix, effect)}"]
    if isinstance(effect, str):
        out.append(f"  effect: unknown: {effect}")
    elif effect is not None:
        lines = effect_lines(effect, now)
        if effect.uncovered:  # said in the first line; the way out is below
            lines = [line for line in lines if not line.startswith("NOT COVERED")]
        out += [f"  {line}" for line in lines]
    if isinstance(effect, FixEffect) and effect.uncovered and again is not None:
        out.append(
            f"  to cover them: `{again.revert}`, then `{again.apply}` (between the two, "
            "no reply from the port is rewritten)"
        )
    elif failing(effect) and again is not None:
        out.append(f"  see `ctfix explain {port}`; undo with: `{again.revert}`")
    return "\n".join(out) + "\n"


def already_document(
    fix: RecordedFix,
    netns: str,
    effect: FixEffect | str | None = None,
    again: Again | None = None,
) -> dict[str, Any]:
    uncovered = isinstance(effect, FixEffect) and bool(effect.uncovered)
    return {
        **envelope(netns),
        "applied": False,
        "already_applied": True,
        "method": fix.method,
        "backend": fix.backend,
        "ok": not failing(effect),
        "effect": effect_json(_effect(effect)),
        "effect_error": _error(effect),
        # uncovered services: what to run to have them covered (null: nothing to do)
        "cover_with": [again.revert, again.apply] if uncovered and again else None,
    }


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
    pointing = sorted({port for port, _index in refused})
    for fix, steps in report:
        condition = "applied" if complete[fix.port] else (
            "RECORD POINTS AT OBJECTS NOT CTFIX'S: the state file was edited or is corrupt"
            if fix.port in pointing
            else "INTERRUPTED apply: revert it" if not fix.complete else "DAMAGED: revert it"
        )
        out.append(f"  port {fix.port}: {fix.method} via {fix.backend}, {condition}")
        for index, (step, status, here) in enumerate(steps):
            why = refused.get((fix.port, index))
            mark = "FOREIGN" if why else "present" if here else "MISSING"
            # A record pointing elsewhere: the object it names, not what ctfix made.
            first, *rest = (spec_object(step.spec),) if why else step.creates or ("(nothing)",)
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
        if port not in pointing:  # else --revert PORT refuses: the way out is below
            out.append(f"  remove them with: {_with_port(revert, port)}")
    if pointing:
        out.append(f"  way out: {aside_hint(state_path, revert, pointing)}")
    elif not all(complete.values()):
        out.append(f"  revert with: {revert}")
    return "\n".join(out) + "\n"


def aside_hint(state_path: str, revert: str, ports: Sequence[int]) -> str:
    """The way out of a record that points at objects that are not ctfix's: --revert
    refuses to follow it, and without it ctfix finds its own objects by their marks."""
    commands = " and ".join(f"`{_with_port(revert, port)}`" for port in ports)
    return (
        f"move the state file aside (`mv {state_path} {state_path}.aside`), then run "
        f"{commands}: it removes ctfix's own objects, found by their marks, and nothing "
        "else"
    )


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
    pointing = sorted({port for port, _index in refused})
    return {
        **envelope(netns),
        "state_file": state_path,
        "way_out": aside_hint(state_path, revert, pointing) if pointing else None,
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
                        # what the record points at (an edited record: not ctfix's)
                        "object": spec_object(step.spec),
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
                # null: a record of the port points elsewhere; `way_out` says what to do
                "remove_with": None if m.port in pointing else _with_port(revert, m.port),
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

