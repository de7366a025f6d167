"""`ctfix watch` output: one human line or one JSON line per finding, and a summary.

Know before changing: the JSON keys are a stable contract (users' scripts and alert
pipelines parse them): kind, family, proto, netns, client, service,
expected_source, actual_source, mismatch, local, confirmed, count, first_seen,
last_seen; and the summary's kind, events, new_flows, lost, resyncs, findings.
Add keys if needed; never rename or remove one. Colour only on a TTY and never
when NO_COLOR is set.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, TextIO

from ctfix.core.detect import Finding
from ctfix.render.style import Style, use_colour


def timestamp(seconds: float) -> str:
    """UTC, ISO 8601 with milliseconds: `2025-05-01T12:00:00.123Z`."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def finding_record(finding: Finding, netns: str) -> dict[str, Any]:
    return {
        "kind": "wrong-source-reply",
        "family": finding.family,
        "proto": finding.proto,
        "netns": netns,
        "client": finding.client,
        "service": finding.service,
        "expected_source": finding.expected_source,
        "actual_source": finding.actual_source,
        "mismatch": finding.mismatch,
        "local": finding.local,
        "confirmed": finding.confirmed,
        "count": finding.count,
        "first_seen": timestamp(finding.first_seen),
        "last_seen": timestamp(finding.last_seen),
    }


def summary_record(
    *, events: int, new_flows: int, lost: int, resyncs: int, findings: int
) -> dict[str, Any]:
    return {
        "kind": "summary",
        "events": events,
        "new_flows": new_flows,
        "lost": lost,
        "resyncs": resyncs,
        "findings": findings,
    }


class WatchRenderer:
    """Writes findings and the summary to a stream, as text or JSON lines."""

    def __init__(self, stream: TextIO, *, json_lines: bool, netns: str) -> None:
        self.stream = stream
        self.json = json_lines
        self.netns = netns
        self.style = Style(use_colour(stream) and not json_lines)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def finding(self, finding: Finding, *, update: bool = False) -> None:
        if self.json:
            self._write(json.dumps(finding_record(finding, self.netns)))
            return
        self._write(self.finding_line(finding, update=update))

    def finding_line(self, finding: Finding, *, update: bool = False) -> str:
        tags = [f"mismatch {finding.mismatch}"]
        if finding.local:
            tags.append("local")
        if finding.confirmed:
            tags.append(self.style("confirmed", "bold"))
        head = "confirmed" if update else "wrong source"
        return (
            f"{timestamp(finding.last_seen)} {self.style(head.upper(), 'bold', 'red')} "
            f"{finding.proto}/{finding.family[-1]} {finding.service}: "
            f"client {finding.client} expected the reply from "
            f"{self.style(finding.expected_source, 'green')}, it came from "
            f"{self.style(finding.actual_source, 'bold', 'red')} ({', '.join(tags)}) "
            f"x{finding.count}"
        )

    def final(self, findings: list[Finding]) -> None:
        """At exit: every finding with its final counts (JSON), or a short table."""
        if self.json:
            for finding in findings:
                self._write(json.dumps(finding_record(finding, self.netns)))
            return
        for finding in findings:
            self._write(
                f"  {finding.service} <- {finding.actual_source} "
                f"(expected {finding.expected_source}) clients {finding.client_network}: "
                f"{finding.count} reply(ies), {timestamp(finding.first_seen)} .. "
                f"{timestamp(finding.last_seen)}" + (", confirmed" if finding.confirmed else "")
            )

    def summary(self, record: dict[str, Any]) -> None:
        if self.json:
            self._write(json.dumps(record))
            return
        self._write(
            f"summary: {record['events']} events, {record['new_flows']} new UDP flows, "
            f"{record['lost']} lost, {record['resyncs']} resyncs, "
            f"{record['findings']} finding(s)"
        )
