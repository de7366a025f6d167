"""`ctfix health` output: a report for people (text) and a schema-2 JSON document.

Know before changing: the JSON keys are a contract listed in docs/json.md, section
"health" (entries, max, buckets, fill, one key per counter under its kernel name,
per_cpu, interval, increase, rates, verdict, reasons); add keys, never rename or
remove one. Counters the kernel does not report are null, never 0.
"""

from __future__ import annotations

import textwrap
from typing import Any

from ctfix.core.health import COUNTERS, PROBLEM_COUNTERS, RISING_CODES, Health
from ctfix.render.jsonout import envelope
from ctfix.render.style import Style

_WIDTH = 88


def to_json_obj(health: Health, netns: str) -> dict[str, Any]:
    """The schema-2 document of one assessment."""
    doc = envelope(netns)
    doc.update(
        {
            "entries": health.entries,
            "max": health.max_entries,
            "buckets": health.buckets,
            "fill": None if health.fill is None else round(health.fill, 3),
        }
    )
    doc.update({c.name: c.total for c in health.counters})
    doc["per_cpu"] = [
        {"cpu": cpu.cpu, **{name: cpu.get(name) for name in COUNTERS}} for cpu in health.cpus
    ]
    two = health.interval is not None
    doc["interval"] = round(health.interval, 3) if health.interval is not None else None
    doc["increase"] = {c.name: c.increase for c in health.counters} if two else None
    doc["rates"] = (
        {c.name: None if c.rate is None else round(c.rate, 4) for c in health.counters}
        if two
        else None
    )
    doc["verdict"] = health.verdict
    doc["reasons"] = [{"code": r.code, "text": r.text} for r in health.reasons]
    return doc


def _number(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _where(netns: str) -> str:
    return "this namespace" if netns == "current" else f"namespace {netns}"


def render_text(health: Health, netns: str, style: Style, when: str | None = None) -> str:
    """The report: headline, table, counters, what moved means, verdict and reasons."""
    problem = health.verdict == "problem"
    word = style("PROBLEM", "red", "bold") if problem else style("HEALTHY", "green", "bold")
    span = "" if health.interval is None else f", over {health.interval:.1f} s"
    stamp = f"{when}  " if when else ""
    lines = [f"{stamp}conntrack health in {_where(netns)}{span}: {word}"]
    fill = "no limit" if health.fill is None else f"{health.fill:.1f}% full"
    buckets = "" if health.buckets is None else f", {_number(health.buckets)} hash buckets"
    lines.append(
        f"  table  {_number(health.entries)} of {_number(health.max_entries)} entries "
        f"({fill}){buckets}"
    )
    lines.append("         (the limit and the buckets are host-wide; entries are this namespace's)")
    cpus = f"summed over {len(health.cpus)} CPU{'s' if len(health.cpus) != 1 else ''}"
    lines.append("")
    rows: list[tuple[str, ...]]
    if health.interval is None:
        lines.append(f"Counters (totals since conntrack started in the namespace, {cpus})")
        rows = [("counter", "total")]
        rows += [(c.name, _number(c.total)) for c in health.counters]
    else:
        lines.append(f"Counters ({cpus})")
        rows = [("counter", "total", "rise", "per second")]
        rows += [
            (
                c.name,
                _number(c.total),
                _number(c.increase),
                "-" if c.rate is None else f"{c.rate:.3g}",
            )
            for c in health.counters
        ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)
        ]
        text = "  ".join(cells)
        if index == 0:
            text = style(text, "bold")
        elif row[0] in PROBLEM_COUNTERS and _moved(health, row[0]):
            text = style(text, "red")
        lines.append("  " + text)
    # A counter whose rise a reason tells is explained there, not twice.
    told = {name for name, code in RISING_CODES.items() if code in health.codes}
    moved = [c for c in health.counters if _moved(health, c.name) and c.name not in told]
    if moved:
        lines.append("")
        verb = "rose" if health.interval is not None else "are not 0"
        lines.append(f"What the counters that {verb} mean")
        for counter in moved:
            lines += _wrapped(f"{counter.name}: {counter.meaning}", "  ", "    ")
    lines.append("")
    lines.append(f"Verdict: {health.verdict}")
    for reason in health.reasons:
        lines += _wrapped(f"[{reason.code}] {reason.text}", "  ", "    ")
    return "\n".join(lines) + "\n"


def _moved(health: Health, name: str) -> bool:
    counter = health.counter(name)
    return counter.rising if health.interval is not None else bool(counter.total)


def _wrapped(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent=first, subsequent_indent=rest) or [first]
