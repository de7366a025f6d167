"""Prometheus exposition for `ctfix watch --metrics HOST:PORT` (prometheus-client).

Know before changing: metric names and labels are what the alert rules in
deploy/prometheus/ctfix-watch-rules.yaml query; rename them together. Counters are
advanced by deltas of the watcher's own totals, once a second, from the watch loop
(the HTTP server runs in prometheus-client's thread and only reads).
"""

from __future__ import annotations

from typing import Any

from ctfix.core.detectors.wrong_source import WrongSourceFinding
from ctfix.errors import CtfixError


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port); CtfixError when malformed."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CtfixError(f"bad --metrics {text!r}", "use HOST:PORT, e.g. --metrics localhost:9464")
    return host, int(port)


class WatchMetrics:
    """The watcher's counters and gauges, served over HTTP."""

    def __init__(self, listen: str, netns: str) -> None:
        import prometheus_client as prom

        host, port = parse_listen(listen)
        self.registry = prom.CollectorRegistry()
        labels = {"netns": netns}
        self._totals: dict[str, float] = {}

        def counter(name: str, doc: str) -> Any:
            return prom.Counter(name, doc, ["netns"], registry=self.registry).labels(**labels)

        self.counters = {
            "events": counter("ctfix_watch_events", "UDP conntrack events processed"),
            "new_flows": counter("ctfix_watch_new_flows", "New UDP flows seen"),
            "lost": counter("ctfix_watch_lost_events", "Conntrack events the kernel dropped"),
            "resyncs": counter("ctfix_watch_resyncs", "Resynchronisations from a dump"),
        }
        self.pending = prom.Gauge(
            "ctfix_watch_pending_flows",
            "Unreplied UDP flows tracked",
            ["netns"],
            registry=self.registry,
        ).labels(**labels)
        self.findings = prom.Gauge(
            "ctfix_watch_findings",
            "Distinct wrong-source findings",
            ["netns"],
            registry=self.registry,
        ).labels(**labels)
        self.wrong = prom.Counter(
            "ctfix_watch_wrong_source_replies",
            "Wrong-source UDP replies, per service, actual source and client network",
            ["netns", "service", "actual_source", "expected_source", "client_network", "mismatch"],
            registry=self.registry,
        )
        self._netns = netns
        from ctfix.platform.health_metrics import ConntrackHealthCollector

        # ctfix_conntrack_*: conntrack's own statistics, read by update() below.
        self.conntrack = ConntrackHealthCollector(netns)
        self.registry.register(self.conntrack)
        try:
            self.server, self.thread = prom.start_http_server(
                port, addr=host, registry=self.registry
            )
        except OSError as err:
            raise CtfixError(f"cannot serve metrics on {listen}: {err.strerror or err}") from None

    def update(self, totals: dict[str, int], pending: int, findings: int) -> None:
        for name, value in totals.items():
            metric = self.counters.get(name)
            if metric is None:
                continue
            delta = value - self._totals.get(name, 0)
            if delta > 0:
                metric.inc(delta)
            self._totals[name] = value
        self.pending.set(pending)
        self.findings.set(findings)
        self.conntrack.refresh()

    def finding(self, finding: WrongSourceFinding) -> None:
        self.wrong.labels(
            netns=self._netns,
            service=finding.service,
            actual_source=finding.actual_source,
            expected_source=finding.expected_source,
            client_network=finding.client_network,
            mismatch=finding.mismatch,
        ).inc()

    def close(self) -> None:
        self.server.shutdown()
        # shutdown() only stops serving; the listening socket stays bound until this.
        self.server.server_close()
        self.thread.join(timeout=1.0)
