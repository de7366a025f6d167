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
import os
from typing import Any, TextIO

from ctfix.core.detect import Finding


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


def use_colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class WatchRenderer:
    """Writes findings and the summary to a stream, as text or JSON lines."""

    def __init__(self, stream: TextIO, *, json_lines: bool, netns: str) -> None:
        self.stream = stream
        self.json = json_lines
        self.netns = netns
        self.colour = use_colour(stream) and not json_lines

    def _c(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

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
            tags.append(self._c("confirmed", "1"))
        head = "confirmed" if update else "wrong source"
        return (
            f"{timestamp(finding.last_seen)} {self._c(head.upper(), '1;31')} "
            f"{finding.proto}/{finding.family[-1]} {finding.service}: "
            f"client {finding.client} expected the reply from "
            f"{self._c(finding.expected_source, '32')}, it came from "
            f"{self._c(finding.actual_source, '1;31')} ({', '.join(tags)}) "
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
