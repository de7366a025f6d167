"""`ctfix check`: one verdict for a node, as node-problem-detector's custom plugins
give it (ok, problem, unknown), and the problems worst first. Pure.

What counts as a problem: every service `ctfix scan` would not call ok (broken,
at risk, or nothing answering), and a conntrack table at least 85% full
(ctfix.core.health, one reading). Unknown: nothing wrong was found, but a namespace
(or its conntrack statistics) could not be read, so ctfix cannot say all is well.

Know before changing: the order of PROBLEM_KINDS is the order problems are told in
(the first is the one line node-problem-detector shows): a full table loses every
new flow of the namespace, a wrong source loses every reply of one service.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from ctfix.core.health import Health
from ctfix.core.model import Diagnosis
from ctfix.core.netns_scan import NamespaceScan, worst_first

CheckStatus = Literal["ok", "problem", "unknown"]
ProblemKind = Literal[
    "conntrack-table-full",
    "wrong-source",
    "conntrack-table-nearly-full",
    "service-down",
    "at-risk",
]
PROBLEM_KINDS: tuple[ProblemKind, ...] = get_args(ProblemKind)


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    netns: str
    diagnosis: Diagnosis | None = None  # a service's problem
    health: Health | None = None  # the conntrack table's


@dataclass(frozen=True, slots=True)
class Unchecked:
    netns: str
    why: str


@dataclass(frozen=True, slots=True)
class CheckResult:
    status: CheckStatus
    problems: tuple[Problem, ...]  # worst first
    unchecked: tuple[Unchecked, ...]
    namespaces: int  # namespaces looked at (those gone meanwhile left out)
    services: int
    fill: float | None  # the fullest conntrack table seen, percent; None: not known

    @property
    def worst(self) -> Problem | None:
        return self.problems[0] if self.problems else None


def service_problem(d: Diagnosis) -> ProblemKind | None:
    """What is wrong with a service, as scan's verdict and exit status say it."""
    if d.verdict == "broken":
        return "wrong-source"
    if d.service_down:
        return "service-down"
    if d.verdict == "at-risk":
        return "at-risk"
    return None


def table_problem(health: Health) -> ProblemKind | None:
    if "table-full" in health.codes:
        return "conntrack-table-full"
    if "table-nearly-full" in health.codes:
        return "conntrack-table-nearly-full"
    return None


def judge(scans: Sequence[NamespaceScan], *, at_risk: bool = True) -> CheckResult:
    """The node's verdict from every namespace's scan (and conntrack health).
    `at_risk=False`: a service at risk (a prediction: no failure seen) is no problem."""
    problems: list[Problem] = []
    unchecked: list[Unchecked] = []
    fills: list[float] = []
    for scan in worst_first(scans):
        if scan.unreadable:
            unchecked.append(Unchecked(scan.netns, scan.skipped or "not read"))
        if scan.health_error is not None:
            unchecked.append(Unchecked(scan.netns, f"conntrack health: {scan.health_error}"))
        if scan.health is not None:
            if scan.health.fill is not None:
                fills.append(scan.health.fill)
            table = table_problem(scan.health)
            if table is not None:
                problems.append(Problem(table, scan.netns, health=scan.health))
        for d in scan.diagnoses:
            if d.verdict == "unknown":
                # Blind (conntrack does not track a family the port serves): not a
                # problem seen, not a clean bill either.
                unchecked.append(Unchecked(scan.netns, f"UDP {d.port}: conntrack not tracking"))
            kind = service_problem(d)
            if kind is not None and (at_risk or kind != "at-risk"):
                problems.append(Problem(kind, scan.netns, diagnosis=d))
    # Stable: within a kind, the namespaces' and services' own worst-first order.
    problems.sort(key=lambda p: PROBLEM_KINDS.index(p.kind))
    status: CheckStatus = "problem" if problems else "unknown" if unchecked else "ok"
    return CheckResult(
        status=status,
        problems=tuple(problems),
        unchecked=tuple(unchecked),
        namespaces=sum(1 for scan in scans if not scan.gone),
        services=sum(len(scan.diagnoses) for scan in scans),
        fill=max(fills, default=None),
    )
