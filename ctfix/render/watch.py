"""`ctfix watch` output: one human line or one JSON line per finding, and a summary.

Know before changing: the JSON keys are a stable contract (users' scripts and alert
pipelines parse them): kind, family, proto, netns, client, service,
expected_source, actual_source, mismatch, local, confirmed, count, first_seen,
last_seen (added since: clients, client_network, existing, seen_before,
replies_from_other_port); and the summary's kind, events, new_flows, lost, resyncs,
findings (added since: existing, started, tracking). Add keys if needed; never rename
or remove one. docs/json.md describes each.

History and news: an existing finding (in the table when watch started) prints once,
under its own heading, with the kernel's times or `before <start>`; it never counts
in `findings` nor in the exit status. first_seen/last_seen are null for an existing
finding whose age the kernel cannot tell: never a made-up time.
The words of a finding come from ctfix.core.detectors.wrong_source_words, which
explain uses too (unanswered requests': unanswered_words): change them there, for
both. Colour only on a TTY and never when NO_COLOR is set. Unanswered records (kind
"unanswered": family, proto, netns, service, reason, flows, clients, first_seen,
last_seen, one_way, existing, target, confirmed, program, rules, client) and the
summary's unanswered and unanswered_uncounted are keys too. Stale-nat findings (kind
"stale-nat") have their own keys (ctfix.render.stale_nat, docs/json.md) and words
(stale_nat_text).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO

from ctfix.core.detectors.stale_nat import StaleNatFinding, stale_nat_text
from ctfix.core.detectors.unanswered import UnansweredFinding
from ctfix.core.detectors.unanswered_words import unanswered_text
from ctfix.core.detectors.wrong_source import WrongSourceFinding
from ctfix.core.detectors.wrong_source_words import wrong_source_text
from ctfix.render.jsonout import utc_timestamp
from ctfix.render.stale_nat import stale_nat_record
from ctfix.render.style import Style, use_colour
from ctfix.render.width import fill, terminal_width

AnyFinding = WrongSourceFinding | StaleNatFinding | UnansweredFinding


def _time(seconds: float | None) -> str | None:
    """utc_timestamp, or None: never "now" for a time nobody knows."""
    return None if seconds is None else utc_timestamp(seconds)


def finding_record(
    finding: WrongSourceFinding, netns: str, started: float | None = None
) -> dict[str, Any]:
    """One finding line; `started`: when the watch began (an existing finding's
    `seen_before`)."""
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
        "first_seen": _time(finding.first_seen),
        "last_seen": _time(finding.last_seen),
        "clients": finding.clients,
        "client_network": finding.client_network,
        "existing": finding.existing,
        "seen_before": _time(started) if finding.existing else None,
        "replies_from_other_port": finding.replies_from_other_port,
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


def unanswered_record(finding: UnansweredFinding, netns: str) -> dict[str, Any]:
    return {
        "kind": "unanswered",
        "family": finding.family,
        "proto": finding.proto,
        "netns": netns,
        "service": finding.service,
        "reason": finding.reason,
        "flows": finding.flows,
        "clients": finding.clients,
        "first_seen": _time(finding.first_seen),
        "last_seen": _time(finding.last_seen),
        "one_way": finding.one_way,
        "existing": finding.existing,
        "target": finding.target,
        "confirmed": finding.confirmed,
        "program": finding.program,
        "rules": list(finding.rules),
        "client": finding.client,
    }


def summary_record(
    *,
    events: int,
    new_flows: int,
    lost: int,
    resyncs: int,
    findings: int,
    existing: int = 0,
    started: float | None = None,
    tracking: dict[str, bool | None] | None = None,
    unanswered: int = 0,
    uncounted: int = 0,
) -> dict[str, Any]:
    """`findings` counts live findings only; `existing` those found in the table at
    start-up; `tracking`: per family, whether conntrack tracked it (null: unknown);
    `unanswered`: requests counted unanswered, `uncounted` those a cap kept out."""
    return {
        "kind": "summary",
        "events": events,
        "new_flows": new_flows,
        "lost": lost,
        "resyncs": resyncs,
        "findings": findings,
        "existing": existing,
        "started": _time(started),
        "tracking": tracking if tracking is not None else {"ipv4": None, "ipv6": None},
        "unanswered": unanswered,
        "unanswered_uncounted": uncounted,
    }


class WatchRenderer:
    """Writes findings and the summary to a stream, as text or JSON lines."""

    def __init__(self, stream: TextIO, *, json_lines: bool, netns: str) -> None:
        self.stream = stream
        self.json = json_lines
        self.netns = netns
        self.style = Style(use_colour(stream) and not json_lines)
        #: when the watch began (time.time()); set by the command once subscribed
        self.started: float | None = None
        #: a terminal's width: finding lines are filled at it (a pipe: one line each)
        self.width = None if json_lines else terminal_width(stream)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def _record(self, finding: WrongSourceFinding) -> str:
        return json.dumps(finding_record(finding, self.netns, self.started))

    def finding(self, finding: AnyFinding, *, update: bool = False) -> None:
        if isinstance(finding, StaleNatFinding):
            self._stale(finding)
            return
        if isinstance(finding, UnansweredFinding):
            self._unanswered(finding)
            return
        if self.json:
            self._write(self._record(finding))
            return
        if finding.existing:
            self._write(self.aged_line(finding))
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
            self._fit(
                f"{utc_timestamp(finding.last_seen)} {self.style('STALE NAT', 'bold', 'red')} "
                f"{finding.proto}/{finding.family[-1]} {self._stale_text(finding)}{tags}"
            )
        )

    def _unanswered(self, finding: UnansweredFinding) -> None:
        if self.json:
            self._write(json.dumps(unanswered_record(finding, self.netns)))
        elif finding.existing:
            self._write(self.unanswered_aged(finding))
        else:
            self._write(self._fit(self.unanswered_line(finding)))

    def unanswered_line(self, finding: UnansweredFinding) -> str:
        head = self.style("unanswered".upper(), "bold", "yellow")
        return (
            f"{_time(finding.last_seen)} {head} {finding.proto}/{finding.family[-1]} "
            f"{finding.reason}: {unanswered_text(finding)}"
        )

    def unanswered_aged(self, finding: UnansweredFinding) -> str:
        """An unanswered finding's indented line: at exit, or (existing) at start-up."""
        one_way = ", one-way" if finding.one_way else ""
        if finding.existing:
            before = utc_timestamp(self.started) if self.started is not None else "start-up"
            when = f"in the table before {before}"
        else:
            when = f"{_time(finding.first_seen)} .. {_time(finding.last_seen)}"
        return self._fit(
            f"unanswered, {finding.reason}{one_way}: {unanswered_text(finding)}; {when}",
            indent="  ",
        )

    def existing(self, findings: Sequence[WrongSourceFinding | UnansweredFinding]) -> None:
        """The findings already in the table at start-up: once, under their own
        heading (text), or as records with "existing": true (JSON)."""
        if not findings:
            return
        if not self.json:
            before = utc_timestamp(self.started) if self.started is not None else "start-up"
            self._write(
                self.style(
                    f"Already in the conntrack table before {before} (history, not news; "
                    "not counted as findings):",
                    "bold",
                )
            )
        for finding in findings:
            self.finding(finding)

    def aged_line(self, finding: WrongSourceFinding) -> str:
        """A finding's indented line with its age: an existing one (its real age where
        the kernel says it), or a live one in the table at exit."""
        tags: tuple[str, ...] = ("local",) if finding.local else ()
        if finding.confirmed:
            tags += ("confirmed",)
        return self._fit(f"{self._text(finding, tags)}; {self._age(finding)}", indent="  ")

    def _age(self, finding: WrongSourceFinding) -> str:
        """When: seen live, or (existing) the kernel's entry times, or only "before"."""
        origin = " (conntrack timestamps)" if finding.existing else ""
        first, last = _time(finding.first_seen), _time(finding.last_seen)
        if first is not None and last is not None:
            return f"{first} .. {last}{origin}"
        if last is not None:
            return f"latest {last}{origin}"
        if self.started is not None:
            return f"before {utc_timestamp(self.started)}"
        return "before the watch began"

    def _text(self, finding: WrongSourceFinding, tags: tuple[str, ...]) -> str:
        shown = self.style(finding.actual_source, "bold", "red")
        return wrong_source_text(finding, tags=tags, actual_source=shown)

    def finding_line(self, finding: WrongSourceFinding, *, update: bool = False) -> str:
        tags: tuple[str, ...] = ("local",) if finding.local else ()
        if finding.confirmed:
            tags += (self.style("confirmed", "bold"),)
        head = "confirmed" if update else "wrong source"
        return (
            f"{_time(finding.last_seen) or '-'} {self.style(head.upper(), 'bold', 'red')} "
            f"{finding.proto}/{finding.family[-1]} {self._text(finding, tags)}"
        )

    def final(self, findings: Sequence[AnyFinding]) -> None:
        """At exit: every live finding with its final counts (JSON), or a short table.
        Existing findings were printed once at start-up (or when confirmed)."""
        live = [finding for finding in findings if not finding.existing]
        if self.json:
            for finding in live:
                if isinstance(finding, StaleNatFinding):
                    self._write(json.dumps(stale_nat_watch_record(finding, self.netns)))
                elif isinstance(finding, UnansweredFinding):
                    self._write(json.dumps(unanswered_record(finding, self.netns)))
                else:
                    self._write(self._record(finding))
            return
        for finding in live:
            if isinstance(finding, UnansweredFinding):
                self._write(self.unanswered_aged(finding))
            elif isinstance(finding, StaleNatFinding):
                self._write(
                    self._fit(
                        f"stale NAT: {self._stale_text(finding)}; "
                        f"{utc_timestamp(finding.first_seen)} .. "
                        f"{utc_timestamp(finding.last_seen)}",
                        indent="  ",
                    )
                )
            else:
                self._write(self.aged_line(finding))

    def summary(self, record: dict[str, Any]) -> None:
        if self.json:
            self._write(json.dumps(record))
            return
        counts = [
            _plural(record["events"], "event"),
            _plural(record["new_flows"], "new UDP flow"),
            f"{record['lost']} lost",
            _plural(record["resyncs"], "resync"),
            _plural(record.get("unanswered", 0), "unanswered request"),
            _plural(record["findings"], "finding"),
        ]
        if record.get("existing"):
            counts.append(f"{record['existing']} existing (before the watch, not counted)")
        tracking = record.get("tracking") or {}
        blind = [_FAMILY_WORDS[f] for f, on in tracking.items() if on is False]
        if blind:
            counts.append(f"blind to {' and '.join(blind)} (not tracked)")
        self._write(f"summary: {', '.join(counts)}")


_FAMILY_WORDS = {"ipv4": "IPv4", "ipv6": "IPv6"}


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
