"""`ctfix scan` output: one line per UDP service port, worst first, with its headline
reason; then explain's write-up of each port that is not ok. Text, markdown, JSON.

Know before changing: each port's details are explain's own renderer (text,
markdown) and its own JSON object (`services[]`), so scan can never say something
about a port that `ctfix explain PORT` would not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ctfix.core.model import Diagnosis, Reason, Verdict
from ctfix.core.scan import verdict_counts
from ctfix.core.unbound import UnboundSummary
from ctfix.render import explain
from ctfix.render import unbound as unbound_section
from ctfix.render.jsonout import envelope
from ctfix.render.stamp import markdown_document
from ctfix.render.style import Style
from ctfix.render.width import cut, fill

_WORDS = {"ok": "OK", "at-risk": "AT RISK", "broken": "BROKEN", "unknown": "UNKNOWN"}
_STYLE = {
    "ok": ("green",),
    "at-risk": ("yellow", "bold"),
    "broken": ("red", "bold"),
    "unknown": ("yellow", "bold"),
}
#: per verdict, the reason codes that say best why, in order of preference
_HEADLINE = {
    "broken": ("wrong-source-live", "wrong-source-seen", "stale-nat"),
    "at-risk": (
        "client-network-exposed",
        "policy-rule-wrong",
        "answered-through-fix",
        "nothing-answers",
    ),
    "unknown": ("not-tracked", "no-conntrack-evidence"),
    "ok": (
        # ok about wrong sources, yet requests went unanswered: that is the news
        "unanswered-no-socket",
        "unanswered-no-reply",
        "unanswered-stale-nat",
        "forwarded-to-backend",
        "observed-right-source",
        "fix-already-in-effect",
        "answers-from-destination",
        "one-way-service",
        "specific-bind",
        "snat-zone-in-place",
        "history-predates-fix",
        "only-matching-clients-seen",
    ),
}


def headline(d: Diagnosis) -> Reason | None:
    """The one reason that says best why the port has its verdict."""
    codes = ("nothing-answers",) if d.service_down else _HEADLINE[d.verdict]
    for code in codes:
        for reason in d.reasons:
            if reason.code == code:
                return reason
    return d.reasons[0] if d.reasons else None


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def processes_text(d: Diagnosis) -> str:
    names = []
    for lst in d.listeners:
        name = f"{lst.process or '?'}" + (f" ({lst.pid})" if lst.pid is not None else "")
        if name not in names:
            names.append(name)
    return ", ".join(names) or "-"


def verdict_word(d: Diagnosis) -> str:
    return "DOWN" if d.service_down else _WORDS[d.verdict]


def counts_text(counts: Mapping[Verdict, int]) -> str:
    """`2 broken, 1 at risk, 3 unknown`: the verdicts that have services, worst first."""
    return ", ".join(f"{n} {_WORDS[v].lower()}" for v, n in counts.items() if n)


def _summary(diagnoses: Sequence[Diagnosis], netns: str) -> str:
    if not diagnoses:
        return f"ctfix scan: no UDP service in namespace {netns}"
    plural = "s" if len(diagnoses) != 1 else ""
    return (
        f"ctfix scan: {len(diagnoses)} UDP service{plural} in namespace {netns}: "
        + counts_text(verdict_counts(diagnoses))
    )


def service_rows(
    diagnoses: Sequence[Diagnosis], s: Style, indent: str = "  ", width: int | None = None
) -> list[str]:
    """One aligned line per port: verdict, port, process, the headline reason; with a
    width (a terminal's), the reason is cut to fit (the write-ups say it in full)."""
    verdicts = [verdict_word(d) for d in diagnoses]
    ports = [str(d.port) for d in diagnoses]
    whos = [processes_text(d) for d in diagnoses]
    if not diagnoses:
        return []
    wide = [max(map(len, column)) for column in (verdicts, ports, whos)]
    rows = []
    for d, verdict, port, who in zip(diagnoses, verdicts, ports, whos, strict=True):
        why = headline(d)
        said = f"{why.code}: {_first_sentence(why.text)}" if why else ""
        look = ("red", "bold") if d.service_down else _STYLE[d.verdict]
        lead = f"{port.rjust(wide[1])}  {who.ljust(wide[2])}  "
        if width is not None:
            # the verdict's colours take no columns: measure without them
            said = cut(said, max(0, width - len(indent) - wide[0] - 2 - len(lead)))
        rows.append(f"{indent}{s(verdict.ljust(wide[0]), *look)}  {lead}{said}".rstrip())
    return rows


def write_ups(diagnoses: Sequence[Diagnosis], s: Style, width: int | None = None) -> list[str]:
    """explain's write-up of each port that is not ok, each after a rule, wrapped as
    `ctfix explain PORT` wraps it at `width`."""
    out: list[str] = []
    rule = "-" * min(72, width or 72)
    for d in diagnoses:
        if d.verdict == "ok" and not d.service_down:
            continue
        out += ["", rule, explain.render_text(d, s, width).rstrip("\n")]
    return out


def render_text(
    diagnoses: Sequence[Diagnosis],
    netns: str,
    style: Style | None = None,
    stamp: str | None = None,
    width: int | None = None,
    unbound: UnboundSummary | None = None,
) -> str:
    """The text report; `stamp` (ctfix.render.stamp) says when and where, under the
    summary; `width` (a terminal's): every line fits it (None: a pipe's layout);
    `unbound`: the requests to ports with nothing bound, last."""
    s = style or Style(False)
    out = [*heading_lines(_summary(diagnoses, netns), width)]
    out += [*heading_lines(stamp, width, "  ")] if stamp else []
    if diagnoses:
        out += ["", *service_rows(diagnoses, s, width=width), *write_ups(diagnoses, s, width)]
    out += unbound_section.text_lines([(None, unbound)])
    return "\n".join(out) + "\n"


def heading_lines(text: str, width: int | None, indent: str = "") -> list[str]:
    """A heading or summary line, filled at width (continuation indented 2 more)."""
    if width is None:
        return [indent + text]
    return fill(text, width, indent, indent + "  ").splitlines()


def markdown_cells(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown_why(d: Diagnosis) -> str:
    why = headline(d)
    return f"`{why.code}`: {_first_sentence(why.text)}" if why else ""


def markdown_write_ups(diagnoses: Sequence[Diagnosis]) -> list[str]:
    return [
        "\n" + explain.render_markdown(d).rstrip("\n")
        for d in diagnoses
        if d.verdict != "ok" or d.service_down
    ]


def render_markdown(
    diagnoses: Sequence[Diagnosis], netns: str, unbound: UnboundSummary | None = None
) -> str:
    """The markdown report, stamped with when and where it was made."""
    out = [f"# {_summary(diagnoses, netns).removeprefix('ctfix scan: ')}", ""]
    if diagnoses:
        out += ["| verdict | port | process | why |", "|---|---|---|---|"]
        for d in diagnoses:
            cells = [f"**{verdict_word(d)}**", str(d.port), processes_text(d), markdown_why(d)]
            out.append(markdown_cells(cells))
    out += markdown_write_ups(diagnoses)
    out += unbound_section.markdown_lines([(None, unbound)])
    return markdown_document("\n".join(out) + "\n")


def scan_document(
    diagnoses: Sequence[Diagnosis], netns: str, unbound: UnboundSummary | None = None
) -> dict[str, Any]:
    """`ctfix scan --json`: the envelope, counts, then explain's object per port, then
    the requests to ports with nothing bound."""
    return {
        **envelope(netns),
        "counts": verdict_counts(diagnoses),
        "services": [explain.to_json_obj(d) for d in diagnoses],
        **unbound_section.json_keys(unbound),
    }
