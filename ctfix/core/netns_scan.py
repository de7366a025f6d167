"""Many namespaces at once (`scan --all-netns`, `check`): each namespace's services as
`ctfix scan` judges them, and the order the namespaces are told in. Pure.

Know before changing: a namespace is only as bad as its worst service (or its
conntrack table, for check); a namespace that could not be scanned says why
(`skipped`), and one that vanished while ctfix looked (`gone`) is not an error:
containers come and go.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from ctfix.core.health import Health
from ctfix.core.model import ContainerRef, Diagnosis, Verdict
from ctfix.core.scan import severity, verdict_counts
from ctfix.core.unbound import UnboundSummary

#: how a namespace was found, and so what its label is: pid 1's (`host`), a
#: container's (its name, or namespace/pod), an `ip netns` name, another bind mount
#: (its path), or only a process (`pid:PID`); `chosen`: the one namespace a command
#: was given (--netns, or its own), not looked for
NamespaceKind = Literal["host", "container", "ip-netns", "mount", "process", "chosen"]

#: severity of a namespace with nothing wrong or nothing to say
QUIET = 4


@dataclass(frozen=True, slots=True)
class NamespaceScan:
    """One namespace's part of a many-namespace scan."""

    netns: str  # the label output uses
    spec: str  # what `--netns` takes to look at it again
    kind: NamespaceKind
    id: int  # stable for the namespace's life (its nsfs id / netns cookie)
    container: ContainerRef | None = None
    diagnoses: tuple[Diagnosis, ...] = ()  # worst first
    health: Health | None = None  # conntrack's own health (check only)
    #: why the namespace was not scanned; None: it was
    skipped: str | None = None
    gone: bool = False  # skipped because it no longer exists: not an error
    health_error: str | None = None  # why its conntrack health was not read (check)
    #: requests to its ports with nothing bound (scan only; information, never a verdict)
    unbound: UnboundSummary | None = None

    @property
    def severity(self) -> int:
        """Its worst service's (0 broken, 1 at-risk or down, 2 unknown, 3 ok), QUIET
        without any."""
        return min((severity(d) for d in self.diagnoses), default=QUIET)

    @property
    def unreadable(self) -> bool:
        """It exists (or did) and ctfix could not see into it: an unknown."""
        return self.skipped is not None and not self.gone


def worst_first(scans: Iterable[NamespaceScan]) -> list[NamespaceScan]:
    """Namespaces with a broken service first, then at-risk, ok, none; the given
    order (host, containers, `ip netns` ones, ...) within each."""
    return sorted(scans, key=lambda scan: scan.severity)


def all_services(scans: Sequence[NamespaceScan]) -> list[tuple[NamespaceScan, Diagnosis]]:
    """Every service of every namespace, worst first overall (namespaces' order within)."""
    pairs = [(scan, d) for scan in worst_first(scans) for d in scan.diagnoses]
    return sorted(pairs, key=lambda pair: severity(pair[1]))


def counts(scans: Sequence[NamespaceScan]) -> dict[Verdict, int]:
    """Services per verdict over every namespace, unknown ones too (scan's `counts`)."""
    return verdict_counts(d for scan in scans for d in scan.diagnoses)
