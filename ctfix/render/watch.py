"""`ctfix watch` output: one human line or one JSON line per finding, and a summary.

Know before changing: the JSON keys are a stable contract (users' scripts and alert
pipelines parse them): kind, family, proto, netns, client, service,
expected_source, actual_source, mismatch, local, confirmed, count, first_seen,
last_seen (added since: clients, client_network, existing, seen_before,
replies_from_other_port); and the summary's kind, events, new_flows, lost, resyncs,
findings (added since: existing, started, tracking, netns, netns_container, hidden;
`--all-netns` adds namespace-summary records and the overall summary's all_netns and
namespaces). Every finding record carries netns_container (the container that owns
the namespace, or null) and, on wrong-source and unanswered records, container (the
client's, where known). Add keys if needed; never rename or remove one. docs/json.md
describes each.

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
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ctfix.core.detectors.stale_nat import StaleNatFinding, stale_nat_text
from ctfix.core.detectors.unanswered import UnansweredFinding
from ctfix.core.detectors.unanswered_words import unanswered_text
from ctfix.core.detectors.wrong_source import WrongSourceFinding
from ctfix.core.detectors.wrong_source_words import wrong_source_text
from ctfix.core.model import ContainerRef
from ctfix.render.container import container_json, container_text
from ctfix.render.jsonout import utc_timestamp
from ctfix.render.stale_nat import stale_nat_record
from ctfix.render.style import Style, use_colour
from ctfix.render.width import fill, terminal_width

AnyFinding = WrongSourceFinding | StaleNatFinding | UnansweredFinding
#: the client's container of a finding, where the command knows it
ContainerOf = Callable[[AnyFinding], ContainerRef | None]


def _time(seconds: float | None) -> str | None:
    """utc_timestamp, or None: never "now" for a time nobody knows."""
    return None if seconds is None else utc_timestamp(seconds)


def finding_record(
    finding: WrongSourceFinding,
    netns: str,
    started: float | None = None,
    *,
    netns_container: ContainerRef | None = None,
    container: ContainerRef | None = None,
) -> dict[str, Any]:
    """One finding line; `started`: when the watch began (an existing finding's
    `seen_before`); `container`: the (latest) client's."""
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
        "netns_container": container_json(netns_container),
        "container": container_json(container),
    }


def stale_nat_watch_record(
    finding: StaleNatFinding, netns: str, netns_container: ContainerRef | None = None
) -> dict[str, Any]:
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
        "netns_container": container_json(netns_container),
    }


def unanswered_record(
    finding: UnansweredFinding,
    netns: str,
    *,
    netns_container: ContainerRef | None = None,
    container: ContainerRef | None = None,
) -> dict[str, Any]:
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
        "netns_container": container_json(netns_container),
        "container": container_json(container),
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
    netns: str | None = None,
    netns_container: ContainerRef | None = None,
    hidden: int = 0,
) -> dict[str, Any]:
    """`findings` counts live findings only (those the filters select); `existing`
    those found in the table at start-up; `tracking`: per family, whether conntrack
    tracked it (null: unknown); `unanswered`: requests counted unanswered, `uncounted`
    those a cap kept out; `hidden`: live findings the filters left out."""
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
        "netns": netns,
        "netns_container": container_json(netns_container),
        "hidden": hidden,
    }


def namespace_summary_record(summary: dict[str, Any], *, gone: bool) -> dict[str, Any]:
    """`--all-netns`: one namespace's summary (`gone`: it disappeared while watched)."""
    return {**summary, "kind": "namespace-summary", "gone": gone}


def all_summary_record(
    namespaces: Sequence[dict[str, Any]], *, unwatched: int, failed: int, started: float | None
) -> dict[str, Any]:
    """`--all-netns`: the overall summary, totals of the namespaces' summaries."""
    total = summary_record(
        events=sum(n["events"] for n in namespaces),
        new_flows=sum(n["new_flows"] for n in namespaces),
        lost=sum(n["lost"] for n in namespaces),
        resyncs=sum(n["resyncs"] for n in namespaces),
        findings=sum(n["findings"] for n in namespaces),
        existing=sum(n["existing"] for n in namespaces),
        started=started,
        unanswered=sum(n["unanswered"] for n in namespaces),
        uncounted=sum(n["unanswered_uncounted"] for n in namespaces),
        hidden=sum(n["hidden"] for n in namespaces),
    )
    # One value per family: whether every namespace tracked it (null: not all known).
    tracking: dict[str, bool | None] = {}
    for family in ("ipv4", "ipv6"):
        seen = [n["tracking"].get(family) for n in namespaces]
        tracking[family] = None if None in seen or not seen else all(seen)
    total["tracking"] = tracking
    total["all_netns"] = True
    total["namespaces"] = {
        "watched": len(namespaces),
        "gone": sum(1 for n in namespaces if n.get("gone")),
        "unwatched": unwatched,
        "failed": failed,
    }
    return total


class WatchRenderer:
    """Writes one namespace's findings and its summary to a stream, as text or JSON
    lines. `tagged` (`--all-netns`): text lines name the namespace. `before_write`
    runs before every line (the status line is erased there)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        json_lines: bool,
        netns: str,
        netns_container: ContainerRef | None = None,
        tagged: bool = False,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        self.stream = stream
        self.json = json_lines
        self.netns = netns
        self.netns_container = netns_container
        self.tagged = tagged
        self.before_write = before_write
        self.style = Style(use_colour(stream) and not json_lines)
        #: when the watch began (time.time()); set by the command once subscribed
        self.started: float | None = None
        #: a terminal's width: finding lines are filled at it (a pipe: one line each)
        self.width = None if json_lines else terminal_width(stream)

    def _write(self, line: str) -> None:
        if self.before_write is not None:
            self.before_write()
        self.stream.write(line + "\n")
        self.stream.flush()

    def _tag(self) -> str:
        return f"[{self.netns}] " if self.tagged else ""

    def record(self, finding: AnyFinding, container: ContainerRef | None = None) -> dict[str, Any]:
        """A finding's JSON record."""
        where = self.netns_container
        if isinstance(finding, StaleNatFinding):
            return stale_nat_watch_record(finding, self.netns, where)
        if isinstance(finding, UnansweredFinding):
            return unanswered_record(
                finding, self.netns, netns_container=where, container=container
            )
        return finding_record(
            finding, self.netns, self.started, netns_container=where, container=container
        )

    def finding(
        self, finding: AnyFinding, *, update: bool = False, container: ContainerRef | None = None
    ) -> None:
        """A new (or, `update`, newly confirmed) finding; `container`: its client's."""
        if self.json:
            self._write(json.dumps(self.record(finding, container)))
        elif isinstance(finding, StaleNatFinding):
            self._stale(finding)
        elif isinstance(finding, UnansweredFinding):
            if finding.existing:
                self._write(self.unanswered_aged(finding, container))
            else:
                self._write(self._fit(self.unanswered_line(finding, container)))
        elif finding.existing:
            self._write(self.aged_line(finding, container))
        else:
            self._write(self._fit(self.finding_line(finding, update=update, container=container)))

    def _fit(self, line: str, indent: str = "") -> str:
        indent += self._tag() if indent else ""
        return fill(line, self.width, indent, "    ") if self.width else indent + line

    def _stale_text(self, finding: StaleNatFinding) -> str:
        return stale_nat_text(finding, lambda text: self.style(text, "bold", "red"))

    def _stale(self, finding: StaleNatFinding) -> None:
        tags = " (already there at start)" if finding.existing else ""
        self._write(
            self._fit(
                f"{utc_timestamp(finding.last_seen)} {self._tag()}"
                f"{self.style('STALE NAT', 'bold', 'red')} "
                f"{finding.proto}/{finding.family[-1]} {self._stale_text(finding)}{tags}"
            )
        )

    def unanswered_line(
        self, finding: UnansweredFinding, container: ContainerRef | None = None
    ) -> str:
        head = self.style("unanswered".upper(), "bold", "yellow")
        return (
            f"{_time(finding.last_seen)} {self._tag()}{head} "
            f"{finding.proto}/{finding.family[-1]} "
            f"{finding.reason}: {_client_in(unanswered_text(finding), container)}"
        )

    def unanswered_aged(
        self, finding: UnansweredFinding, container: ContainerRef | None = None
    ) -> str:
        """An unanswered finding's indented line: at exit, or (existing) at start-up."""
        one_way = ", one-way" if finding.one_way else ""
        if finding.existing:
            before = utc_timestamp(self.started) if self.started is not None else "start-up"
            when = f"in the table before {before}"
        else:
            when = f"{_time(finding.first_seen)} .. {_time(finding.last_seen)}"
        text = _client_in(unanswered_text(finding), container)
        return self._fit(f"unanswered, {finding.reason}{one_way}: {text}; {when}", indent="  ")

    def existing(
        self,
        findings: Sequence[WrongSourceFinding | UnansweredFinding],
        container_of: ContainerOf | None = None,
    ) -> None:
        """The findings already in the table at start-up: once, under their own
        heading (text), or as records with "existing": true (JSON)."""
        if not findings:
            return
        if not self.json:
            before = utc_timestamp(self.started) if self.started is not None else "start-up"
            where = f" of {self.netns}" if self.tagged else ""
            heading = self._fit(
                f"Already in the conntrack table{where} before {before} (history, not "
                "news; not counted as findings):"
            )
            self._write(self.style(heading, "bold"))
        for finding in findings:
            self.finding(finding, container=container_of(finding) if container_of else None)

    def aged_line(
        self, finding: WrongSourceFinding, container: ContainerRef | None = None
    ) -> str:
        """A finding's indented line with its age: an existing one (its real age where
        the kernel says it), or a live one in the table at exit."""
        tags: tuple[str, ...] = ("local",) if finding.local else ()
        if finding.confirmed:
            tags += ("confirmed",)
        text = _client_in(self._text(finding, tags), container)
        return self._fit(f"{text}; {self._age(finding)}", indent="  ")

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

    def finding_line(
        self,
        finding: WrongSourceFinding,
        *,
        update: bool = False,
        container: ContainerRef | None = None,
    ) -> str:
        tags: tuple[str, ...] = ("local",) if finding.local else ()
        if finding.confirmed:
            tags += (self.style("confirmed", "bold"),)
        head = "confirmed" if update else "wrong source"
        return (
            f"{_time(finding.last_seen) or '-'} {self._tag()}"
            f"{self.style(head.upper(), 'bold', 'red')} "
            f"{finding.proto}/{finding.family[-1]} "
            f"{_client_in(self._text(finding, tags), container)}"
        )

    def final(
        self, findings: Sequence[AnyFinding], container_of: ContainerOf | None = None
    ) -> None:
        """At exit: every live finding with its final counts (JSON), or a short table.
        Existing findings were printed once at start-up (or when confirmed)."""
        live = [finding for finding in findings if not finding.existing]
        for finding in live:
            container = container_of(finding) if container_of else None
            if self.json:
                self._write(json.dumps(self.record(finding, container)))
            elif isinstance(finding, UnansweredFinding):
                self._write(self.unanswered_aged(finding, container))
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
                self._write(self.aged_line(finding, container))

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
        if record.get("hidden"):
            counts.append(f"{record['hidden']} left out by the filters")
        tracking = record.get("tracking") or {}
        blind = [_FAMILY_WORDS[f] for f, on in tracking.items() if on is False]
        if blind:
            every = " in some namespaces" if record.get("all_netns") else ""
            counts.append(f"blind to {' and '.join(blind)}{every} (not tracked)")
        head = "summary"
        if record.get("kind") == "namespace-summary":
            head = f"summary of {record['netns']}{' (gone)' if record.get('gone') else ''}"
        elif record.get("all_netns"):
            spaces = record["namespaces"]
            head = f"summary of {_plural(spaces['watched'], 'namespace')}"
            more = [f"{spaces[k]} {k}" for k in ("gone", "unwatched", "failed") if spaces[k]]
            head += f" ({', '.join(more)})" if more else ""
        self._write(self._fit(f"{head}: {', '.join(counts)}"))


_FAMILY_WORDS = {"ipv4": "IPv4", "ipv6": "IPv6"}


def _client_in(text: str, container: ContainerRef | None) -> str:
    """A finding's words, with the container of its (latest) client when known."""
    return f"{text} ({container_text(container)})" if container is not None else text


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
