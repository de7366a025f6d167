"""Apply a `ctfix.core.plan.Plan` all-or-nothing, check it, revert it, report it.
What each kind of step is made and removed with is `registry.py` (one backend module
per kind: iproute, nftables, legacy, conntrack; asked as `registry.create(...)`, so a
test can stand a fake kernel in for all of them); which netfilter backend snat-zone
uses is `backend_choice.py`; whose an object is, `marks.py`.

Works in the network namespace the process is in (the command enters `--netns`
first). Backends: policy routing (pyroute2), nftables (one table of ctfix's own, one
atomic batch) and iptables-legacy (python-iptables) plus ipset.

Know before changing: the order inside `apply_plan` is the crash-safety contract:
record the step as pending in the state file, THEN change the kernel, then mark it
done. Revert walks the record backwards and removes each object only if it is there,
so it is correct after a failure, a `kill -9` at any point, or a second revert.
That is only safe because nothing already in the kernel is ever recorded: an object
(or name) that is there before the apply is refused up front, and a create that finds
one in a race raises `AlreadyThere`, whose step is dropped from the record before the
rollback, so the rollback never removes what somebody else made.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ctfix.core.model import Method
from ctfix.core.plan import Backend, Plan, RouteSpec, Spec, Step
from ctfix.errors import CtfixError
from ctfix.platform import iptables_legacy
from ctfix.platform.fixstate import FixState, RecordedFix, StepStatus
from ctfix.platform.remedy import registry
from ctfix.platform.remedy.backend_choice import choose_backend
from ctfix.platform.remedy.marks import AlreadyThere
from ctfix.platform.remedy.registry import clash, create, present, present_all, remove

#: Test hook: seconds to sleep after recording each step as pending, before applying
#: it, so a test can `kill -9` the process in the middle of an apply.
PAUSE_ENV = "CTFIX_TEST_PAUSE_BETWEEN_STEPS"


# -- apply / verify / revert --------------------------------------------------------------


class Interrupted(Exception):
    """A signal asked the apply to stop; it was rolled back (see `failures`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.removed: list[tuple[str, ...]] = []
        self.failures: list[str] = []


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The plan is in the kernel and verified (its route checks hold, every step is
    present); `already`: it was, and nothing changed."""

    already: bool
    notes: tuple[str, ...] = ()


def apply_plan(
    plan: Plan,
    state: FixState,
    verify: Callable[[Plan], list[str]],
    stop: Callable[[], int | None] = lambda: None,
) -> ApplyResult:
    """Apply every step or none; `verify` returns problems (empty list = fine).

    `stop` returns the number of a signal that asked to stop (or None). It is asked
    between steps, never inside one: the caller's handler only records the signal, so
    a step and its record are never cut in half; a stop rolls back like a failure and
    raises `Interrupted`.
    """
    existing = state.fixes.get(plan.port)
    if existing is not None:
        if existing.complete and existing.same_plan(plan):
            here = registry.present_all([r.step.spec for r in existing.steps])
            missing = [
                f"{r.step.summary}: not in the kernel"
                for r, found in zip(existing.steps, here, strict=True)
                if not found
            ]
            problems = missing or verify(plan)
            if not problems:
                return ApplyResult(True, tuple(existing.notes))
            raise CtfixError(
                f"the recorded fix for port {plan.port} is no longer whole in the kernel "
                f"({problems[0]})",
                f"run `ctfix fix --revert {plan.port}` and apply again",
            )
        what = "an interrupted apply" if not existing.complete else f"a {existing.method} fix"
        raise CtfixError(
            f"port {plan.port} already has {what} recorded in this namespace",
            f"run `ctfix fix --revert {plan.port}` first (`ctfix fix --status` shows it)",
        )
    _refuse_what_is_there(plan)
    legacy_before = _legacy_tables()
    fix = state.begin(plan)
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    try:
        for step in plan.steps:
            _stop_if_asked(stop)
            recorded = state.record_pending(fix, step)
            if pause:
                time.sleep(pause)
            try:
                registry.create(step.spec)
            except AlreadyThere:
                # Somebody else's object appeared since the check: not ours to undo.
                state.drop_step(fix, recorded)
                raise
            state.mark_done(recorded, _made(step.spec))
        _stop_if_asked(stop)
        problems = verify(plan)
        if problems:
            raise CtfixError(f"the fix did not take: {problems[0]}", "nothing was left applied")
        _stop_if_asked(stop)
    except BaseException as err:
        removed, failures, _missing = _undo(state, fix)
        if isinstance(err, Interrupted):
            err.removed, err.failures = removed, failures
        if isinstance(err, CtfixError):
            err.message += (
                f" (rolled back {len(removed)} step(s) already made; nothing changed)"
                if not failures
                else f" (rollback incomplete: {failures[0]}; run `ctfix fix --revert "
                f"{plan.port}`)"
            )
        raise
    fix.notes = list(_legacy_notes(legacy_before))
    state.finish(fix)
    return ApplyResult(False, tuple(fix.notes))


def _refuse_what_is_there(plan: Plan) -> None:
    """Refuse before recording anything when a step's object or slot is taken.

    It is not in this namespace's record (apply_plan checked), so somebody else made
    it (or a state file was lost): recording it would make a rollback or a revert
    delete it.
    """
    # iptables-legacy rules and the others are known by name alone: taken if present.
    taken = registry.present_all([s.spec for s in plan.steps if not isinstance(s.spec, RouteSpec)])
    named = iter(taken)
    for step in plan.steps:
        why = registry.clash(step.spec) if isinstance(step.spec, RouteSpec) else (
            "it is already in the kernel" if next(named) else None
        )
        if why is not None:
            made = step.creates[0] if step.creates else step.summary
            raise CtfixError(
                f"{made}: {why}, and ctfix fix has no record of making it in this "
                "namespace; nothing changed",
                "somebody else's? inspect it and remove it yourself if it is stale; if "
                "`ctfix fix --status` lists it as ctfix's with no record, `ctfix fix "
                f"--revert {plan.port}` removes it",
            )


def _stop_if_asked(stop: Callable[[], int | None]) -> None:
    signum = stop()
    if signum is not None:
        raise Interrupted(signum)


def _made(spec: Spec) -> dict[str, Any]:
    from ctfix.platform.remedy import marks

    return marks.made(spec)


def _undo(
    state: FixState, fix: RecordedFix
) -> tuple[list[tuple[str, ...]], list[str], list[tuple[str, ...]]]:
    """Remove the fix's recorded objects, last first; (removed, failures, missing).

    A step whose removal fails stays recorded (and so does the fix), so that a later
    `--revert` can retry it; the others are still removed. A step whose object is
    not in the kernel (removed by hand) is done: it is `missing`, and leaves the record.
    """
    removed: list[tuple[str, ...]] = []
    failures: list[str] = []
    missing: list[tuple[str, ...]] = []
    steps = list(reversed(list(fix.steps)))
    outcomes = registry.remove_each([recorded.step.spec for recorded in steps])
    for recorded, outcome in zip(steps, outcomes, strict=True):
        if isinstance(outcome, CtfixError):
            failures.append(f"{recorded.step.summary}: {outcome.one_line()}")
            continue
        if outcome:
            removed.append(recorded.step.creates)
        else:
            missing.append(recorded.step.creates)
        state.drop_step(fix, recorded)
    if not failures:
        state.forget(fix.port)
    else:
        fix.complete = False
        state.save()
    return removed, failures, missing


@dataclass(frozen=True, slots=True)
class Reverted:
    """One fix undone: what was recorded, what was actually removed from the kernel."""

    port: int
    method: Method
    backend: Backend
    recorded: int  # steps in the record
    removed_steps: int  # steps found in the kernel and removed (the others were gone)
    removed: tuple[str, ...]  # the objects those steps had created
    notes: tuple[str, ...]
    missing: tuple[str, ...] = ()  # the objects of the steps already gone (by hand?)


def foreign_steps(state: FixState, port: int | None = None) -> dict[tuple[int, int], str]:
    """{(port, step index): why its recorded object is not ctfix's}: a record that
    points at anything but ctfix's own objects (edited, corrupt) is never acted on."""
    from ctfix.platform.remedy import marks

    return {
        (p, index): why
        for p, fix in sorted(state.fixes.items())
        if port is None or p == port
        for index, recorded in enumerate(fix.steps)
        if (why := marks.foreign(recorded.step.spec, p, recorded.made)) is not None
    }


def revert(state: FixState, port: int | None) -> list[Reverted]:
    """Undo the recorded fix for port (or every fix).

    Refuses, removing nothing, when any recorded step points at an object that is not
    ctfix's (the kernel is the truth, the state file a hint).
    """
    ports = [port] if port is not None else sorted(state.fixes)
    if port is not None and port not in state.fixes:
        raise CtfixError(
            f"no ctfix fix is recorded for port {port} in this namespace",
            "`ctfix fix --status` lists what is recorded",
        )
    refused = foreign_steps(state, port)
    if refused:
        (p, _index), why = next(iter(refused.items()))
        raise CtfixError(
            f"refusing to revert port {p}: {why}; nothing was removed",
            f"the state file {state.path} was edited or is corrupt: inspect it (ctfix's "
            "own objects are found by their marks without it: `ctfix fix --status`)",
        )
    done: list[Reverted] = []
    failures: list[str] = []
    for p in ports:
        fix = state.fixes[p]
        recorded = len(fix.steps)
        removed, failed, missing = _undo(state, fix)
        done.append(
            Reverted(
                p, fix.method, fix.backend, recorded, len(removed),
                tuple(obj for creates in removed for obj in creates), tuple(fix.notes),
                tuple(obj for creates in missing for obj in creates),
            )
        )
        failures.extend(failed)
    if failures:
        raise CtfixError(
            f"could not remove everything: {failures[0]}",
            "it stays recorded; fix the cause and run --revert again",
        )
    return done


def _legacy_tables() -> dict[str, set[str]]:
    return {f: set(iptables_legacy.loaded_tables(f)) for f in ("ipv4", "ipv6")}


def _legacy_notes(before: dict[str, set[str]]) -> tuple[str, ...]:
    created = [
        f"{'ip6tables' if family == 'ipv6' else 'iptables'} {name}"
        for family, names in _legacy_tables().items()
        for name in sorted(names - before[family])
    ]
    if not created:
        return ()
    return (
        f"this loaded the iptables-legacy table(s) {', '.join(created)}; the kernel "
        "cannot unload a legacy table from a live namespace, so after --revert they "
        "stay, empty, with ACCEPT policies",
    )


def verify_plan(plan: Plan) -> list[str]:
    """What is wrong after apply (empty: every object is loaded, every lookup right)."""
    here = registry.present_all([s.spec for s in plan.steps])
    problems = [
        f"{s.summary}: not in the kernel"
        for s, found in zip(plan.steps, here, strict=True)
        if not found
    ]
    if problems:
        return problems
    from ctfix.platform import routing

    for check in plan.checks:
        choice = routing.reply_source(check.destination, plan.port, mark=check.mark)
        marked = f" marked {check.mark:#x}" if check.mark is not None else ""
        if choice.source != check.source:
            problems.append(
                f"a reply from port {plan.port} to {check.destination}{marked} would leave "
                f"from {choice.source or 'nowhere'}, not {check.source}"
            )
        elif check.interface is not None and choice.interface != check.interface:
            problems.append(
                f"a reply from port {plan.port} to {check.destination}{marked} would leave "
                f"by {choice.interface or 'nowhere'}, not {check.interface}"
            )
    return problems


def status(state: FixState) -> list[tuple[RecordedFix, list[tuple[Step, StepStatus, bool]]]]:
    """For each recorded fix: (fix, [(step, recorded status, present in the kernel)])."""
    report: list[tuple[RecordedFix, list[tuple[Step, StepStatus, bool]]]] = []
    for _port, fix in sorted(state.fixes.items()):
        here = registry.present_all([r.step.spec for r in fix.steps])
        report.append(
            (fix, [(r.step, r.status, found) for r, found in zip(fix.steps, here, strict=True)])
        )
    return report


__all__ = [
    "PAUSE_ENV",
    "AlreadyThere",
    "ApplyResult",
    "Interrupted",
    "Reverted",
    "apply_plan",
    "choose_backend",
    "clash",
    "create",
    "foreign_steps",
    "present",
    "present_all",
    "remove",
    "revert",
    "status",
    "verify_plan",
]
