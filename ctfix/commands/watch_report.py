"""watch's reporting: from what a namespace's detectors found to lines, records and
metrics, through the filters (`--port`, `--client`, `--service`), with the client's
container named where it is known.

Not a command: each namespace watched (ctfix/commands/watch_ns.py) has one
`Reporter`; its detectors' feeds call it for every finding they made or changed.

Know before changing: a finding prints when it is new, or newly confirmed, and only
if the filters select it; with filters, the first event of a finding that selects it
prints it as new (the finding may have been made by a client the filters leave out:
ctfix.core.watch_filter says why findings, not events, are filtered). The client's
container is looked up when a finding is printed (once per address,
ctfix.platform.containers.ClientContainers), never per event.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

from ctfix.core.detectors import Change

if TYPE_CHECKING:
    from ctfix.core.detectors.stale_nat import StaleNatFinding
    from ctfix.core.detectors.unanswered import UnansweredFinding
    from ctfix.core.detectors.wrong_source import WrongSourceFinding
    from ctfix.core.model import ContainerRef
    from ctfix.core.watch_filter import Selection
    from ctfix.platform.metrics import NamespaceMetrics, WatchMetrics
    from ctfix.render.watch import WatchRenderer

    AnyFinding = WrongSourceFinding | StaleNatFinding | UnansweredFinding
    #: a detector's finding and what the event (or dump) changed about it
    Found = tuple[AnyFinding, Change]


class Reporter:
    """Shows one namespace's findings (see the module doc)."""

    def __init__(
        self,
        renderer: WatchRenderer,
        metrics: NamespaceMetrics | WatchMetrics | None,
        selection: Selection,
        containers: Callable[[str], ContainerRef | None] | None = None,
    ) -> None:
        self.renderer = renderer
        self.metrics = metrics
        self.selection = selection
        self.containers = containers
        #: told of every unanswered finding, shown or not (the ICMP tap follows them)
        self.on_unanswered: Callable[[UnansweredFinding], None] | None = None
        #: (key, existing) of the findings the filters selected so far (bounded by the
        #: detectors' own caps on findings)
        self.shown: set[Hashable] = set()
        #: live findings shown so far that are problems (the status line's count)
        self.live_findings = 0

    def __call__(self, found: Found | None) -> None:
        """Show a finding when it is new or newly confirmed; count every reply and
        every unanswered request in metrics. An unanswered finding prints when it
        first appears, unless it is a one-way service's (no problem: it is listed at
        exit only)."""
        if found is None:
            return
        finding, change = found
        if finding.kind == "unanswered" and self.on_unanswered is not None:
            self.on_unanswered(finding)
        selection = self.selection
        if not selection.empty:
            if not selection.selects(finding):
                return
            if (finding.key, finding.existing) not in self.shown:
                change = Change.NEW  # the first event that selects it: news for this watch
        if (finding.key, finding.existing) not in self.shown:
            self.shown.add((finding.key, finding.existing))
            if not finding.existing and is_problem(finding):
                self.live_findings += 1
        renderer = self.renderer
        metrics = self.metrics
        if finding.kind == "unanswered":
            if change == change.NEW and finding.problem:
                renderer.finding(finding, container=self.container_of(finding))
            # Each report is one more request counted (history is not news).
            if metrics is not None and not finding.existing:
                metrics.unanswered_request(finding)
            return
        if change:
            # CONFIRMED: the ICMP came before the reply's event; the finding is older.
            renderer.finding(
                finding, update=change != change.NEW, container=self.container_of(finding)
            )
        # Replies counted as they happen: history found at start-up is not a new reply
        # (a restart of watch must not look like a burst to an alert rule).
        if metrics is not None and finding.kind == "wrong-source" and not finding.existing:
            metrics.finding(finding)

    def confirmed(self, finding: WrongSourceFinding) -> None:
        """The client's ICMP port unreachable newly confirmed a finding."""
        selection = self.selection
        if selection.empty or (finding.key, finding.existing) in self.shown or (
            finding.existing and selection.selects(finding)
        ):
            self.renderer.finding(finding, update=True, container=self.container_of(finding))

    def existing(self, findings: Sequence[WrongSourceFinding | UnansweredFinding]) -> None:
        """The findings already in the table at start-up, once (those selected)."""
        chosen = [f for f in findings if self.selection.selects(f)]
        self.renderer.existing(chosen, self.container_of)

    def live(self, found: Sequence[AnyFinding]) -> tuple[list[AnyFinding], int]:
        """The live findings to list at exit, in the order they were first seen, and
        how many more the filters left out."""
        live = sorted((f for f in found if not f.existing), key=lambda f: f.first_seen or 0.0)
        if self.selection.empty:
            return live, 0
        shown = [f for f in live if (f.key, False) in self.shown]
        return shown, len(live) - len(shown)

    def container_of(self, finding: AnyFinding) -> ContainerRef | None:
        """The container of a finding's (latest) client, where known."""
        if self.containers is None or finding.kind == "stale-nat":
            return None
        return self.containers(finding.client)


def client_containers() -> Callable[[str], ContainerRef | None]:
    """The lookup of a client's container (ctfix.platform.containers.ClientContainers),
    loaded on its first use: the engines' clients cost ~5 MiB of memory, which a watch
    that finds nothing never needs."""
    lookup: Callable[[str], ContainerRef | None] | None = None

    def find(client: str) -> ContainerRef | None:
        nonlocal lookup
        if lookup is None:
            from ctfix.platform.containers import ClientContainers

            lookup = ClientContainers()
        return lookup(client)

    return find


def is_problem(finding: AnyFinding) -> bool:
    """Whether a finding is one to act on: all are, but a one-way service's unanswered
    requests (they never get a reply, by design)."""
    return finding.kind != "unanswered" or finding.problem


def exit_status(
    live: Sequence[AnyFinding],
    stopped_by_duration: bool,
) -> int:
    """Like grep: a timed watch tells a script whether it found something new (live
    findings only; a one-way service's unanswered flows are not a finding to act on)."""
    return 1 if stopped_by_duration and any(is_problem(f) for f in live) else 0
