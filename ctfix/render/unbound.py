"""scan's section "Requests to ports with nothing bound" (ctfix.core.unbound): text,
markdown and JSON keys, for one namespace or many (`--all-netns`).

Know before changing: it is information, not a verdict; the words say what was counted
(unreplied requests in the conntrack table, client hosts) and nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ctfix.core.unbound import UnboundService, UnboundSummary

TITLE = "Requests to ports with nothing bound"
_WHAT = "unreplied, in the conntrack table; not services, no verdict"


def _counted(u: UnboundService) -> str:
    return (
        f"{u.flows} request{'' if u.flows == 1 else 's'} from "
        f"{u.clients} client host{'' if u.clients == 1 else 's'}"
    )


def _more(summary: UnboundSummary) -> str:
    return f"and {summary.more} more address:port{'' if summary.more == 1 else ' pairs'}"


def _said(
    named: Sequence[tuple[str | None, UnboundSummary | None]],
) -> list[tuple[str | None, UnboundSummary]]:
    """The namespaces with something to say (a count, or why there is none)."""
    return [(n, s) for n, s in named if s is not None and (s.services or s.error)]


def text_lines(named: Sequence[tuple[str | None, UnboundSummary | None]]) -> list[str]:
    """The section (empty when nothing was counted): per namespace (its label, None for
    the one namespace of a plain scan) one line per service, worst first."""
    said = _said(named)
    if not said:
        return []
    out = ["", f"{TITLE} ({_WHAT}):"]
    for netns, summary in said:
        indent = "  "
        if netns is not None:
            out.append(f"  namespace {netns}:")
            indent = "    "
        if summary.error is not None:
            out.append(f"{indent}not counted: {summary.error}")
            continue
        wide = max(len(u.service) for u in summary.services)
        out += [f"{indent}{u.service.ljust(wide)}  {_counted(u)}" for u in summary.services]
        if summary.more:
            out.append(f"{indent}{_more(summary)}")
    return out


def markdown_lines(named: Sequence[tuple[str | None, UnboundSummary | None]]) -> list[str]:
    """The section as a table (a namespace column when many were scanned)."""
    said = _said(named)
    if not said:
        return []
    many = any(netns is not None for netns, _s in said)
    head = ["namespace"] if many else []
    out = [
        "",
        f"## {TITLE}",
        "",
        "Unreplied requests in the conntrack table: information, not services, no verdict.",
        "",
        "| " + " | ".join([*head, "service", "family", "requests", "client hosts"]) + " |",
        "|" + "---|" * (len(head) + 4),
    ]
    notes = []
    for netns, summary in said:
        where = [f"`{netns}`"] if many else []
        if summary.error is not None:
            notes.append(f"- {f'`{netns}`: ' if many else ''}not counted: {summary.error}")
            continue
        for u in summary.services:
            cells = [*where, f"`{u.service}`", u.family, str(u.flows), str(u.clients)]
            out.append("| " + " | ".join(cells) + " |")
        if summary.more:
            notes.append(f"- {f'`{netns}`: ' if many else ''}{_more(summary)}")
    return out + (["", *notes] if notes else [])


def json_keys(summary: UnboundSummary | None) -> dict[str, Any]:
    """`unbound`, `unbound_more`, `unbound_error` (docs/json.md)."""
    if summary is None:
        summary = UnboundSummary()
    return {
        "unbound": [
            {"service": u.service, "family": u.family, "flows": u.flows, "clients": u.clients}
            for u in summary.services
        ],
        "unbound_more": summary.more,
        "unbound_error": summary.error,
    }
