"""`ctfix scan --all-netns` output: every namespace's services, worst first overall.

Text groups the services by namespace (the namespace with the worst service first),
markdown is one table with a namespace column, JSON is scan's document with every
service (each carrying its `netns` and `netns_container`, as explain's object does)
and a `namespaces` index. Each port's details are explain's own renderer and JSON
object, as in ctfix.render.scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ctfix.core.netns_scan import NamespaceScan, all_services, counts, worst_first
from ctfix.render import explain
from ctfix.render import unbound as unbound_section
from ctfix.render.container import container_json, container_text
from ctfix.render.jsonout import envelope
from ctfix.render.scan import (
    counts_text,
    heading_lines,
    markdown_cells,
    markdown_why,
    markdown_write_ups,
    processes_text,
    service_rows,
    verdict_word,
    write_ups,
)
from ctfix.render.stamp import markdown_document
from ctfix.render.style import Style

#: namespaces without a service are named one by one up to this many
LIST_QUIET = 20


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary(scans: Sequence[NamespaceScan]) -> str:
    services = sum(len(scan.diagnoses) for scan in scans)
    said = counts_text(counts(scans))
    return (
        f"{_plural(len(scans), 'network namespace')}, {_plural(services, 'UDP service')}"
        + (": " + said if said else "")
    )


def namespace_heading(scan: NamespaceScan) -> str:
    """`namespace web: container web (docker), --netns container:web`"""
    what = {
        "host": "the host's",
        "container": container_text(scan.container) if scan.container else "a container's",
        "ip-netns": "ip netns",
        "mount": "bind mount",
        "process": "a process's",
        "chosen": "the one asked for",
    }[scan.kind]
    if scan.container is not None and scan.container.engine:
        what += f" ({scan.container.engine})"
    hint = f", --netns {scan.spec}" if scan.spec != scan.netns else ""
    return f"namespace {scan.netns}: {what}{hint}"


def _skipped_lines(scans: Sequence[NamespaceScan]) -> list[str]:
    return [
        f"skipped {scan.netns}: {scan.skipped}"
        for scan in scans
        if scan.skipped is not None and not scan.diagnoses
    ]


def _quiet(scans: Sequence[NamespaceScan], width: int | None) -> list[str]:
    quiet = [scan.netns for scan in scans if not scan.diagnoses and scan.skipped is None]
    if not quiet:
        return []
    head = f"no UDP service in {_plural(len(quiet), 'namespace')}"
    if len(quiet) > LIST_QUIET:
        return [head + " (--json lists them)"]
    said = head + ": " + ", ".join(quiet)
    return heading_lines(said, width)


def render_text(
    scans: Sequence[NamespaceScan],
    style: Style | None = None,
    stamp: str | None = None,
    width: int | None = None,
) -> str:
    """Grouped by namespace; `width` (a terminal's): every line fits it (None: one
    line each, for a pipe)."""
    s = style or Style(False)
    ordered = worst_first(scans)
    out = heading_lines(f"ctfix scan --all-netns: {summary(ordered)}", width)
    out += heading_lines(stamp, width, "  ") if stamp else []
    for scan in ordered:
        if scan.diagnoses:
            heading = [s(line, "bold") for line in heading_lines(namespace_heading(scan), width)]
            out += ["", *heading, *service_rows(scan.diagnoses, s, width=width)]
    skipped = [line for said in _skipped_lines(ordered) for line in heading_lines(said, width)]
    tail = _quiet(ordered, width) + skipped
    if tail:
        out += ["", *tail]
    out += write_ups([d for _scan, d in all_services(ordered)], s, width)
    out += unbound_section.text_lines([(scan.netns, scan.unbound) for scan in ordered])
    return "\n".join(out) + "\n"


def render_markdown(scans: Sequence[NamespaceScan]) -> str:
    ordered = worst_first(scans)
    out = [f"# Every network namespace: {summary(ordered)}", ""]
    services = all_services(ordered)
    if services:
        out += ["| verdict | namespace | port | process | why |", "|---|---|---|---|---|"]
        for scan, d in services:
            cells = [f"**{verdict_word(d)}**", f"`{scan.netns}`", str(d.port)]
            out.append(markdown_cells([*cells, processes_text(d), markdown_why(d)]))
    quiet = [scan.netns for scan in ordered if not scan.diagnoses and scan.skipped is None]
    if quiet:
        out += ["", f"No UDP service in: {', '.join(f'`{n}`' for n in quiet)}."]
    skipped = _skipped_lines(ordered)
    if skipped:
        out += ["", *(f"- {line}" for line in skipped)]
    out += markdown_write_ups([d for _scan, d in services])
    out += unbound_section.markdown_lines([(scan.netns, scan.unbound) for scan in ordered])
    return markdown_document("\n".join(out) + "\n")


def namespace_json(scan: NamespaceScan) -> dict[str, Any]:
    return {
        "netns": scan.netns,
        "spec": scan.spec,
        "kind": scan.kind,
        "id": scan.id,
        "container": container_json(scan.container),
        "counts": counts([scan]),
        "skipped": scan.skipped,
        "gone": scan.gone,
        **unbound_section.json_keys(scan.unbound),
    }


def scan_document(scans: Sequence[NamespaceScan]) -> dict[str, Any]:
    """`ctfix scan --all-netns --json`: scan's document over every namespace."""
    ordered = worst_first(scans)
    return {
        **envelope(),
        "all_netns": True,
        "counts": counts(ordered),
        "namespaces": [namespace_json(scan) for scan in ordered],
        "services": [explain.to_json_obj(d) for _scan, d in all_services(ordered)],
    }
