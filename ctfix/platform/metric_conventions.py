"""What every ctfix metrics endpoint follows, by Prometheus conventions:
`ctfix_build_info{version, python} 1`, and label sets that cannot grow without end.

Bounded labels (the README's table lists every metric and label): a per-finding
metric keeps at most SERIES_LIMIT distinct label sets per process, the first ones
seen (a counter's series cannot move once scraped, so "top" means first), and counts
every later one in a single series whose labels all say OTHER. Prometheus then holds
at most SERIES_LIMIT + 1 series of it per watched namespace, whatever the traffic.
A metric may keep labels of a small fixed set of values (an unanswered request's
`reason` and `one_way`) as they are in that series (`fold`: the labels that become
OTHER), so that alerts can still tell them apart: one OTHER series per value then.

Know before changing: the limit and OTHER are documented in README.md (Metrics) and
tested; the alert rules in deploy/prometheus/ aggregate by these labels, so an
OTHER series fires an alert too (with `service="other"`).
"""

from __future__ import annotations

import platform
from typing import Any

from ctfix import __version__

#: distinct label sets a per-finding metric keeps per process; the rest are OTHER
SERIES_LIMIT = 100
OTHER = "other"


class LabelCap:
    """Admits the first `limit` label sets; every later new one becomes OTHER in the
    labels at the positions `fold` (None: all of them)."""

    def __init__(self, limit: int = SERIES_LIMIT, fold: tuple[int, ...] | None = None) -> None:
        self.limit = limit
        self.fold = fold
        self._kept: set[tuple[str, ...]] = set()
        self.folded = 0  # label values counted under OTHER so far

    def admit(self, values: tuple[str, ...]) -> tuple[str, ...]:
        if values in self._kept:
            return values
        if len(self._kept) < self.limit:
            self._kept.add(values)
            return values
        self.folded += 1
        fold = self.fold
        return tuple(
            OTHER if fold is None or index in fold else value
            for index, value in enumerate(values)
        )


def register_build_info(registry: Any) -> None:
    """`ctfix_build_info{version="0.2.0", python="3.11.2"} 1` in `registry`."""
    import prometheus_client as prom

    prom.Gauge(
        "ctfix_build_info",
        "ctfix's version and the Python running it (always 1)",
        ["version", "python"],
        registry=registry,
    ).labels(version=__version__, python=platform.python_version()).set(1)
