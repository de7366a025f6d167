"""`ctfix watch` output: one human line or one JSON line per finding, and a summary.

Know before changing: the JSON keys are a stable contract (users' scripts and alert
pipelines parse them): kind, family, proto, netns, client, service,
expected_source, actual_source, mismatch, local, confirmed, count, first_seen,
last_seen (added since: clients, client_network); and the summary's kind, events,
new_flows, lost, resyncs, findings. Add keys if needed; never rename or remove one.
The words of a finding come from ctfix.core.detectors.wrong_source_words, which
explain uses too: change them there, for both. Colour only on a TTY and never when
NO_COLOR is set. Stale-nat findings (kind "stale-nat") have their own keys
(ctfix.render.stale_nat, docs/json.md) and words (stale_nat_text).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO

from ctfix.core.detectors.stale_nat import StaleNatFinding, stale_nat_text
from ctfix.core.detectors.wrong_source import WrongSourceFinding
from ctfix.core.detectors.wrong_source_words import wrong_source_text
from ctfix.render.jsonout import utc_timestamp
from ctfix.render.stale_nat import stale_nat_record
from ctfix.render.style import Style, use_colour
from ctfix.render.width import fill, terminal_width

AnyFinding = WrongSourceFinding | StaleNatFinding


def finding_record(finding: WrongSourceFinding, netns: str) -> dict[str, Any]:
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
        "first_seen": utc_timestamp(finding.first_seen),
        "last_seen": utc_timestamp(finding.last_seen),
        "clients": finding.clients,
        "client_network": finding.client_network,
    }


def stale_nat_watch_record(finding: StaleNatFinding, netns: str) -> dict[str, Any]:
    """watch's line for a stale-nat finding: the issue's keys first, then the rest."""
    record = stale_nat_record(finding)
    head = {key: record.pop(key) for key in ("kind", "family", "proto")}
    return {
        **head,
        "netns": netns,
        "service": record.pop("service"),
        "stale_target": record.pop("stale_target"),
        "current_targets": record.pop("current_targets"),
        "clients": record.pop("clients"),
        "entries": record.pop("entries"),
        "first_seen": utc_timestamp(finding.first_seen),
        "last_seen": utc_timestamp(finding.last_seen),
        "existing": finding.existing,
        **record,
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
        #: a terminal's width: finding lines are filled at it (a pipe: one line each)
        self.width = None if json_lines else terminal_width(stream)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def finding(self, finding: AnyFinding, *, update: bool = False) -> None:
        if isinstance(finding, StaleNatFinding):
            self._stale(finding)
            return
        if self.json:
            self._write(json.dumps(finding_record(finding, self.netns)))
            return
        self._write(self._fit(self.finding_line(finding, update=update)))

    def _fit(self, line: str, indent: str = "") -> str:
        return fill(line, self.width, indent, "    ") if self.width else indent + line

    def _stale_text(self, finding: StaleNatFinding) -> str:
        return stale_nat_text(finding, lambda text: self.style(text, "bold", "red"))

    def _stale(self, finding: StaleNatFinding) -> None:
        if self.json:
            self._write(json.dumps(stale_nat_watch_record(finding, self.netns)))
            return
        tags = " (already there at start)" if finding.existing else ""
        self._write(
            f"{utc_timestamp(finding.last_seen)} {self.style('STALE NAT', 'bold', 'red')} "
            f"{finding.proto}/{finding.family[-1]} {self._stale_text(finding)}{tags}"
        )

    def _text(self, finding: WrongSourceFinding, tags: tuple[str, ...]) -> str:
        shown = self.style(finding.actual_source, "bold", "red")
        return wrong_source_text(finding, tags=tags, actual_source=shown)

    def finding_line(self, finding: WrongSourceFinding, *, update: bool = False) -> str:
        tags: tuple[str, ...] = ("local",) if finding.local else ()
        if finding.confirmed:
            tags += (self.style("confirmed", "bold"),)
        head = "confirmed" if update else "wrong source"
        return (
            f"{utc_timestamp(finding.last_seen)} {self.style(head.upper(), 'bold', 'red')} "
            f"{finding.proto}/{finding.family[-1]} {self._text(finding, tags)}"
        )

    def final(self, findings: Sequence[AnyFinding]) -> None:
        """At exit: every finding with its final counts (JSON), or a short table."""
        if self.json:
            for finding in findings:
                if isinstance(finding, StaleNatFinding):
                    self._write(json.dumps(stale_nat_watch_record(finding, self.netns)))
                else:
                    self._write(json.dumps(finding_record(finding, self.netns)))
            return
        for finding in findings:
            if isinstance(finding, StaleNatFinding):
                self._write(
                    f"  stale NAT: {self._stale_text(finding)}; "
                    f"{utc_timestamp(finding.first_seen)} .. {utc_timestamp(finding.last_seen)}"
                )
                continue
            tags: tuple[str, ...] = ("local",) if finding.local else ()
            if finding.confirmed:
                tags += ("confirmed",)
            self._write(
                self._fit(
                    f"{self._text(finding, tags)}; {utc_timestamp(finding.first_seen)} .. "
                    f"{utc_timestamp(finding.last_seen)}",
                    indent="  ",
                )
            )

    def summary(self, record: dict[str, Any]) -> None:
        if self.json:
            self._write(json.dumps(record))
            return
        counts = [
            _plural(record["events"], "event"),
            _plural(record["new_flows"], "new UDP flow"),
            f"{record['lost']} lost",
            _plural(record["resyncs"], "resync"),
            _plural(record["findings"], "finding"),
        ]
        self._write(f"summary: {', '.join(counts)}")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
