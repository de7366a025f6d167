"""`ctfix check` output: the one line node-problem-detector shows as the condition's
message, and the JSON document.

Know before changing: node-problem-detector trims the plugin's stdout and cuts it
at `max_output_length` BYTES (80 by default), so the line is at most MAX_LINE bytes
of ASCII-safe text; what says most comes first (the service, its namespace, the
addresses), and a long namespace name is shortened in its middle before anything
else is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ctfix.core.addr import parse_endpoint
from ctfix.core.check import CheckResult, Problem
from ctfix.core.health import FILL_PROBLEM
from ctfix.render.container import container_json
from ctfix.render.jsonout import envelope

#: "one line under 80 characters": node-problem-detector keeps 80 bytes by default
MAX_LINE = 79
#: a namespace's name is never shortened below this many characters
MIN_LABEL = 12


def _address(endpoint: str) -> str:
    try:
        return parse_endpoint(endpoint)[0]
    except ValueError:
        return endpoint


def _problem_text(problem: Problem, label: str, brief: bool = False) -> str:
    """The problem in words; `brief` leaves out what is least needed (an at-risk
    problem's client network), so that "(+N more)" can stay on the line."""
    d, health = problem.diagnosis, problem.health
    if health is not None:
        size = f"{health.entries}/{health.max_entries}"
        fill = f"{health.fill:.0f}%" if health.fill is not None else "?"
        return f"conntrack table {fill} full in {label} ({size})"
    assert d is not None  # a problem is a service's or the table's
    head = f"UDP {d.port} in {label}"
    if problem.kind == "wrong-source":
        if d.evidence.wrong_source:
            wrong = d.evidence.wrong_source[0]
            if wrong.mismatch == "address":
                pair = f"{_address(wrong.expected_source)} -> {_address(wrong.actual_source)}"
            else:
                pair = f"{wrong.expected_source} -> {wrong.actual_source}"
            return f"{head}: wrong source {pair}"
        return f"{head}: broken, replies from the wrong source"
    if problem.kind == "service-down":
        return f"{head}: nothing answers ({d.evidence.unanswered} unanswered)"
    for cn in d.clients:
        other = [a for a in cn.addressed if a != cn.predicted_source]
        if not cn.ok and other and cn.predicted_source:
            pair = f"{head}: at risk, {other[0]} -> {cn.predicted_source}"
            return pair if brief else f"{pair} for {cn.network}"
    return f"{head}: at risk"


def _fits(text: str, limit: int) -> bool:
    return len(text.encode()) <= limit


def _shorten(label: str, room: int) -> str:
    """`kube-system/coredns-5d78c9869d-abcde` -> `kube-sy...-abcde` within room chars."""
    room = max(room, MIN_LABEL)
    if len(label) <= room:
        return label
    head = (room - 3 + 1) // 2
    tail = room - 3 - head
    return f"{label[:head]}...{label[len(label) - tail :]}" if tail else label[:head] + "..."


def fit(
    make: Callable[[str], str],
    label: str,
    more: str = "",
    limit: int = MAX_LINE,
    brief: Callable[[str], str] | None = None,
) -> str:
    """The line `make(label) + more`, within `limit` bytes: shorten the label in its
    middle (not below MIN_LABEL), then say it `brief`ly (when given), then drop `more`
    (shortening again), then cut (never inside a character). "(+N more)" says this is
    not the only problem: it goes last."""
    makes = [make] if brief is None else [make, brief]
    for suffix in (more, ""):
        for each in makes:
            whole = each(label) + suffix
            if _fits(whole, limit):
                return whole
            overflow = len(whole.encode()) - limit
            short = each(_shorten(label, len(label) - overflow)) + suffix
            if _fits(short, limit):
                return short
    return _cut(makes[-1](_shorten(label, MIN_LABEL)), limit)


def line(result: CheckResult, single: str | None = None) -> str:
    """The one line: the worst problem, else why it is unknown, else what was checked.
    `single`: the namespace's label when only one was checked."""
    worst = result.worst
    if worst is not None:
        others = len(result.problems) - 1
        more = f" (+{others} more)" if others else ""
        return fit(
            lambda label: _problem_text(worst, label),
            worst.netns,
            more,
            brief=lambda label: _problem_text(worst, label, brief=True),
        )
    if result.unchecked:
        first = result.unchecked[0]
        others = len(result.unchecked) - 1
        more = f" (+{others} more)" if others else ""
        return fit(lambda label: f"unknown: {label} not checked: {first.why}", first.netns, more)
    where = single or f"{result.namespaces} namespaces"
    services = f"{result.services} UDP service{'' if result.services == 1 else 's'}"
    table = (
        f", conntrack {result.fill:.0f}% full" + (" at most" if single is None else "")
        if result.fill is not None
        else f", conntrack below {FILL_PROBLEM:.0f}% full"
    )
    return fit(lambda label: f"OK: {services} in {label}{table}", where)


def error_line(message: str) -> str:
    """The line for an error: node-problem-detector's Unknown, with ctfix's reason
    (its start: what went wrong comes before where and what to do)."""
    text = f"unknown: {message}"
    return text if _fits(text, MAX_LINE) else _cut(text, MAX_LINE)


def _cut(text: str, limit: int) -> str:
    return text.encode()[: limit - 3].decode(errors="ignore") + "..."


def _problem_json(problem: Problem) -> dict[str, Any]:
    d, health = problem.diagnosis, problem.health
    reasons = d.reasons if d else health.reasons if health else ()
    return {
        "kind": problem.kind,
        "netns": problem.netns,
        "port": d.port if d else None,
        "netns_container": container_json(d.netns_container) if d else None,
        "codes": [r.code for r in reasons],
        "fill": health.fill if health else None,
    }


def check_document(result: CheckResult, message: str, netns: str | None) -> dict[str, Any]:
    """`ctfix check --json`: the envelope, the status and line, every problem."""
    return {
        **envelope(netns),
        "status": result.status,
        "message": message,
        "namespaces": result.namespaces,
        "services": result.services,
        "fill": result.fill,
        "problems": [_problem_json(p) for p in result.problems],
        "unchecked": [{"netns": u.netns, "why": u.why} for u in result.unchecked],
    }
