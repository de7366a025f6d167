"""Apply a `ctfix.core.plan.Plan` all-or-nothing, check it, revert it, report it.

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
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Never, NoReturn

from ctfix.core.model import Method
from ctfix.core.plan import (
    Backend,
    ConntrackEntrySpec,
    IpsetSpec,
    IptRuleSpec,
    NftTableSpec,
    Plan,
    RouteSpec,
    RuleSpec,
    Spec,
    Step,
)
from ctfix.errors import CtfixError, MissingFeatureError
from ctfix.platform import iptables_legacy
from ctfix.platform.fixstate import FixState, RecordedFix, StepStatus

#: Test hook: seconds to sleep after recording each step as pending, before applying
#: it, so a test can `kill -9` the process in the middle of an apply.
PAUSE_ENV = "CTFIX_TEST_PAUSE_BETWEEN_STEPS"
#: tables ctfix makes and choose_backend must not count as the namespace's own rules:
#: `ctfix fix`'s `ctfix_<port>` and `ctfix watch --track`'s `ctfix_watch_<pid>[_<start>_<pidns>]`.
#: (`ctfix_lab` is the lab's own, a real user of netfilter, so it counts.)
_OWN_TABLE = re.compile(r"ctfix_\d+|ctfix_watch_\d+(?:_\d+_\d+)?")


class AlreadyThere(CtfixError):
    """A create found its object (or its name, its route slot) taken by somebody else.

    apply_plan drops that step from the record before rolling back, so the rollback
    never removes the object that was there.
    """


# -- dispatch per kind of step ------------------------------------------------------------


class _Operations(NamedTuple):
    """What can be done with one step's object, bound to its spec."""

    create: Callable[[], None]
    remove: Callable[[], bool]  # False: it was not there
    present: Callable[[], bool]
    #: why creating it would clash with what is in the kernel now (None: it would not)
    clash: Callable[[], str | None]


def _operations(spec: Spec) -> _Operations:
    """The registry: the backend functions for each kind of step (imported only when
    needed). Exhaustive: a spec kind without a case fails mypy here, and a spec of a
    kind this ctfix does not know (a newer state file, a bug) raises instead of
    reaching another kind's backend."""
    match spec:
        case RouteSpec() as route:
            from ctfix.platform.remedy import iproute

            return _Operations(
                partial(iproute.create_route, route),
                partial(iproute.remove_route, route),
                partial(iproute.route_present, route),
                partial(iproute.route_clash, route),
            )
        case RuleSpec() as rule:
            from ctfix.platform.remedy import iproute

            return _by_name(
                partial(iproute.create_rule, rule),
                partial(iproute.remove_rule, rule),
                partial(iproute.rule_present, rule),
            )
        case NftTableSpec() as table:
            from ctfix.platform.remedy import nftables

            return _by_name(
                partial(nftables.create_table, table),
                partial(nftables.remove_table, table),
                partial(nftables.table_present, table),
            )
        case IpsetSpec() as ipset:
            from ctfix.platform.remedy import legacy

            return _by_name(
                partial(legacy.create_ipset, ipset),
                partial(legacy.remove_ipset, ipset),
                partial(legacy.ipset_present, ipset),
            )
        case IptRuleSpec() as ipt_rule:
            from ctfix.platform.remedy import legacy

            return _by_name(
                partial(legacy.create_rule, ipt_rule),
                partial(legacy.remove_rule, ipt_rule),
                partial(legacy.rule_present, ipt_rule),
            )
        case ConntrackEntrySpec() as entry:
            from ctfix.platform.remedy import conntrack

            return _Operations(
                partial(conntrack.delete_entry, entry),
                partial(conntrack.cannot_undo, entry),
                partial(conntrack.entry_gone, entry),
                partial(conntrack.no_clash, entry),
            )
        case _:
            _unknown_kind(spec)


def _unknown_kind(spec: Never) -> NoReturn:
    """mypy proves this unreachable (every Spec has a case); at run time it is the
    refusal for anything else."""
    kind = getattr(spec, "kind", type(spec).__name__)
    raise CtfixError(
        f"a step of kind {kind!r} that this ctfix cannot make or remove",
        "is the state file from a newer ctfix? revert with that version",
    )


def _by_name(
    create: Callable[[], None], remove: Callable[[], bool], present: Callable[[], bool]
) -> _Operations:
    """For objects known by name alone: creating clashes when the name is taken."""

    def clash() -> str | None:
        return "it is already in the kernel" if present() else None

    return _Operations(create, remove, present, clash)


def create(spec: Spec) -> None:
    _operations(spec).create()


def remove(spec: Spec) -> bool:
    """Remove the object if it exists; False when it was not there."""
    return _operations(spec).remove()


def present(spec: Spec) -> bool:
    return _operations(spec).present()


def present_all(specs: Sequence[Spec]) -> list[bool]:
    """`present` of each spec, iptables-legacy rules read in one go (see
    `legacy.rules_found`)."""
    found = [False] * len(specs)
    rules = [(i, s) for i, s in enumerate(specs) if isinstance(s, IptRuleSpec)]
    if rules:
        from ctfix.platform.remedy import legacy

        for (index, _spec), answer in zip(
            rules, legacy.rules_found([s for _i, s in rules]), strict=True
        ):
            found[index] = answer
    for index, spec in enumerate(specs):
        if not isinstance(spec, IptRuleSpec):
            found[index] = present(spec)
    return found


def clash(spec: Spec) -> str | None:
    """Why the step cannot be made without touching something already there."""
    return _operations(spec).clash()


# -- backend choice -----------------------------------------------------------------------


def choose_backend(override: Backend | None) -> tuple[Backend, str]:
    """(backend, why) for snat-zone: the one the namespace already uses."""
    if override:
        return override, f"--backend {override}"
    nft_tables, nft_nat = _nft_usage()
    legacy_rules = legacy_nat = False
    try:
        legacy_in_use = iptables_legacy.in_use()
    except iptables_legacy.Unreadable:
        # Not root: the dry run goes on without them, and says so.
        return (
            "nftables",
            "iptables-legacy tables could not be read (root only); "
            + ("the namespace's rules are in nftables" if nft_tables else "assuming none"),
        )
    if legacy_in_use:
        from ctfix.platform.remedy import legacy

        legacy_rules = legacy.rules_present()
        legacy_nat = legacy_rules and legacy.nat_rules_present()
    if legacy_rules and not nft_tables:
        return "iptables-legacy", "only iptables-legacy tables hold rules in this namespace"
    if legacy_rules and nft_tables:
        if legacy_nat and not nft_nat:
            return (
                "iptables-legacy",
                "both nftables and iptables-legacy hold rules; the NAT rules are in "
                "iptables-legacy",
            )
        return (
            "nftables",
            "both nftables and iptables-legacy hold rules; "
            + ("the NAT rules are in nftables" if nft_nat else "preferring nftables"),
        )
    if nft_tables:
        return "nftables", "the namespace's rules are in nftables"
    return "nftables", "the namespace holds no netfilter rules"


def _nft_usage() -> tuple[bool, bool]:
    """(has tables other than ctfix's, has a nat chain other than ctfix's)."""
    from ctfix.platform import nft

    try:
        objects = nft.ruleset()
    except MissingFeatureError:
        return False, False
    tables = nat = False
    for obj in objects:
        table = obj.get("table")
        if table and not _OWN_TABLE.fullmatch(str(table.get("name", ""))):
            tables = True
        chain = obj.get("chain")
        if chain and not _OWN_TABLE.fullmatch(str(chain.get("table", ""))):
            nat = nat or chain.get("type") == "nat"
    return tables, nat


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
            here = present_all([r.step.spec for r in existing.steps])
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
                create(step.spec)
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
    taken = present_all([s.spec for s in plan.steps if not isinstance(s.spec, RouteSpec)])
    named = iter(taken)
    for step in plan.steps:
        why = clash(step.spec) if isinstance(step.spec, RouteSpec) else (
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
    for recorded in reversed(list(fix.steps)):
        try:
            if remove(recorded.step.spec):
                removed.append(recorded.step.creates)
            else:
                missing.append(recorded.step.creates)
        except CtfixError as err:
            failures.append(f"{recorded.step.summary}: {err.one_line()}")
            continue
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
    here = present_all([s.spec for s in plan.steps])
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
        here = present_all([r.step.spec for r in fix.steps])
        report.append(
            (fix, [(r.step, r.status, found) for r, found in zip(fix.steps, here, strict=True)])
        )
    return report
