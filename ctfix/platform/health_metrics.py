"""Conntrack's own health as Prometheus metrics, for `ctfix watch --metrics`.

`ctfix_conntrack_entries` and `ctfix_conntrack_max` (gauges: the namespace's entries
and nf_conntrack_max, host-wide) and `ctfix_conntrack_<counter>_total` (counters,
summed over CPUs) for each counter of `ctfix.core.health.COUNTERS` the kernel
reports, with the watcher's `netns` label. The alert rules in
deploy/prometheus/ctfix-watch-rules.yaml (group ctfix-conntrack-health) query them.

Know before changing: `refresh()` reads the statistics (two netlink requests, at most
every REFRESH_SECONDS) and is called from the watch loop's once-a-second tick, in the
watched namespace; a scrape only reads the last reading, because prometheus-client
serves from its own thread, which may live in another namespace and must not open
netlink sockets. The values are the kernel's own totals: when one goes down (a
per-CPU u32 wrapped), Prometheus treats it as a counter reset, as it should.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from ctfix.core.health import COUNTERS, MEANINGS, Sample
from ctfix.errors import CtfixError

REFRESH_SECONDS = 2.0
PREFIX = "ctfix_conntrack_"


def _read() -> Sample:
    from ctfix.platform import ctstats

    return ctstats.sample()


class ConntrackHealthCollector:
    """A prometheus-client collector of the latest conntrack statistics reading of
    each watched namespace (one `netns` label value each)."""

    def __init__(self, netns: str | None, read: Callable[[], Sample] = _read) -> None:
        self.netns = netns
        self._read = read
        #: the latest reading per namespace label; a namespace is listed once added
        self.readings: dict[str, Sample | None] = {}
        self._next: dict[str, float] = {}
        if netns is not None:
            self.add(netns)

    def add(self, netns: str) -> None:
        self.readings.setdefault(netns, None)
        self._next.setdefault(netns, 0.0)

    def forget(self, netns: str) -> None:
        """A namespace no longer watched: its series go."""
        self.readings.pop(netns, None)
        self._next.pop(netns, None)

    @property
    def latest(self) -> Sample | None:
        """The first namespace's latest reading (one watched namespace)."""
        return self.readings.get(self.netns) if self.netns is not None else None

    def refresh(self, now: float | None = None, netns: str | None = None) -> None:
        """Read the statistics of `netns` (default: the first) when its last reading
        is older than REFRESH_SECONDS; call it inside that namespace. A failed reading
        keeps the previous one (watch must not die of it)."""
        label = self.netns if netns is None else netns
        if label is None or label not in self._next:
            return
        now = time.monotonic() if now is None else now
        if now < self._next[label]:
            return
        self._next[label] = now + REFRESH_SECONDS
        with contextlib.suppress(CtfixError, OSError):
            self.readings[label] = self._read()

    def _families(self, readings: dict[str, Sample | None]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["netns"]
        taken = [(netns, sample) for netns, sample in readings.items() if sample is not None]
        gauges = (
            ("entries", "Conntrack entries in the namespace", "entries"),
            ("max", "The conntrack table's limit, nf_conntrack_max (host-wide)", "max_entries"),
        )
        for name, doc, attribute in gauges:
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            for netns, sample in taken:
                value = getattr(sample, attribute)
                if value is not None:
                    gauge.add_metric([netns], value)
            yield gauge
        for name in COUNTERS:
            totals = [(netns, sample.total(name)) for netns, sample in taken]
            if taken and all(total is None for _netns, total in totals):
                continue  # this kernel does not report it
            doc = f"Conntrack statistic {name}, summed over CPUs: {MEANINGS[name]}"
            counter = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            for netns, total in totals:
                if total is not None:
                    counter.add_metric([netns], total)
            yield counter

    def describe(self) -> Iterator[Any]:
        return self._families({})

    def collect(self) -> Iterator[Any]:
        # A copy: the watch loop adds and forgets namespaces while a scrape runs.
        return self._families(dict(self.readings))
