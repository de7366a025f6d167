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
    """A prometheus-client collector of the latest conntrack statistics reading."""

    def __init__(self, netns: str, read: Callable[[], Sample] = _read) -> None:
        self.netns = netns
        self._read = read
        self.latest: Sample | None = None
        self._next = 0.0

    def refresh(self, now: float | None = None) -> None:
        """Read the statistics when the last reading is older than REFRESH_SECONDS.
        A failed reading keeps the previous one (watch must not die of it)."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return
        self._next = now + REFRESH_SECONDS
        with contextlib.suppress(CtfixError, OSError):
            self.latest = self._read()

    def _families(self, sample: Sample | None) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["netns"]
        gauges = (
            ("entries", "Conntrack entries in the namespace", "entries"),
            ("max", "The conntrack table's limit, nf_conntrack_max (host-wide)", "max_entries"),
        )
        for name, doc, attribute in gauges:
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            value = None if sample is None else getattr(sample, attribute)
            if value is not None:
                gauge.add_metric([self.netns], value)
            yield gauge
        for name in COUNTERS:
            total = None if sample is None else sample.total(name)
            if sample is not None and total is None:
                continue  # this kernel does not report it
            doc = f"Conntrack statistic {name}, summed over CPUs: {MEANINGS[name]}"
            counter = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            if total is not None:
                counter.add_metric([self.netns], total)
            yield counter

    def describe(self) -> Iterator[Any]:
        return self._families(None)

    def collect(self) -> Iterator[Any]:
        return self._families(self.latest)
