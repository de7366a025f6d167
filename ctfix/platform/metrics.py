"""Prometheus exposition for `ctfix watch --metrics HOST:PORT` (prometheus-client).

Know before changing: metric names and labels are what the alert rules in
deploy/prometheus/ctfix-watch-rules.yaml query; rename them together. Labels that
grow with what is found go through ctfix.platform.metric_conventions.LabelCap (at
most SERIES_LIMIT label sets, then `other`), as README.md's metrics table says. Counters are
advanced by deltas of the watcher's own totals, once a second, from the watch loop
(the HTTP server runs in prometheus-client's thread and only reads).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from typing import Any

from ctfix.core.detectors.wrong_source import WrongSourceFinding
from ctfix.errors import CtfixError

#: seconds a connection may stay silent before the server closes it
IDLE_TIMEOUT = 5.0
#: connections served at once; more get `503` at once (a scraper needs one)
MAX_CONNECTIONS = 8


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port); CtfixError when malformed."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CtfixError(f"bad --metrics {text!r}", "use HOST:PORT, e.g. --metrics localhost:9464")
    return host, int(port)


class MetricsListener:
    """The metrics' HTTP server, bound where it is made: `ctfix watch` makes it before
    it enters --netns, so that it listens where ctfix was started (the host), not in
    the watched namespace. Each connection gets IDLE_TIMEOUT seconds of silence at
    most, and at most MAX_CONNECTIONS are served at once."""

    def __init__(self, listen: str) -> None:
        host, port = parse_listen(listen)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise CtfixError(f"bad --metrics {listen!r}: {err.strerror or err}") from None
        self.loopback = all(_is_loopback(str(info[4][0])) for info in infos)
        family, _type, _proto, _name, address = infos[0]
        try:
            self.server = _server(family, address)
        except OSError as err:
            raise CtfixError(f"cannot serve metrics on {listen}: {err.strerror or err}") from None
        self.thread: threading.Thread | None = None

    def serve(self, app: Any) -> None:
        self.server.set_app(app)
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="ctfix-metrics", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(timeout=1.0)
        # shutdown() only stops serving; the listening socket stays bound until this.
        self.server.server_close()


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _server(family: int, address: Any) -> Any:
    """A threading WSGI server for `family`, bound to `address`, not yet serving."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Handler(WSGIRequestHandler):
        timeout = IDLE_TIMEOUT  # StreamRequestHandler puts it on the socket

        def handle(self) -> None:
            try:
                super().handle()
            except OSError:  # the client went silent (timeout) or away
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            del format, args  # scrapes are not news

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = family

        def __init__(self) -> None:
            self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
            super().__init__(address[:2] if family == socket.AF_INET else address, Handler)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    request.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            del request, client_address  # a client's fault is no traceback on stderr

    return Server()


class WatchMetrics:
    """The watcher's counters and gauges, served over HTTP: one `netns` label value per
    watched namespace (`namespace(label)`; a namespace no longer watched is
    `forget`-ten, its series removed). With one namespace (`netns` given) `update` and
    `finding` are that namespace's."""

    def __init__(self, listen: str | MetricsListener, netns: str | None = None) -> None:
        import prometheus_client as prom

        self.listener = listen if isinstance(listen, MetricsListener) else MetricsListener(listen)
        self.registry = prom.CollectorRegistry()

        def counter(name: str, doc: str) -> Any:
            return prom.Counter(name, doc, ["netns"], registry=self.registry)

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
        )
        self.findings = prom.Gauge(
            "ctfix_watch_findings",
            "Distinct wrong-source findings",
            ["netns"],
            registry=self.registry,
        )
        self.wrong = prom.Counter(
            "ctfix_watch_wrong_source_replies",
            "Wrong-source UDP replies, per service, actual source and client network",
            ["netns", "service", "actual_source", "expected_source", "client_network", "mismatch"],
            registry=self.registry,
        )
        from ctfix.platform.metric_conventions import LabelCap, register_build_info

        register_build_info(self.registry)
        # service x sources x client network grows with what is found: bounded, over
        # all namespaces together (README: metrics).
        self._wrong_labels = LabelCap()
        from ctfix.platform.health_metrics import ConntrackHealthCollector

        # ctfix_conntrack_*: conntrack's own statistics, read by update() below.
        self.conntrack = ConntrackHealthCollector(netns)
        self.registry.register(self.conntrack)
        self._namespaces: dict[str, NamespaceMetrics] = {}
        self.default = self.namespace(netns) if netns is not None else None
        self.listener.serve(prom.make_wsgi_app(self.registry))

    def namespace(self, netns: str) -> NamespaceMetrics:
        """The series of one watched namespace (made on first use)."""
        found = self._namespaces.get(netns)
        if found is None:
            found = self._namespaces[netns] = NamespaceMetrics(self, netns)
            self.conntrack.add(netns)
        return found

    def forget(self, netns: str) -> None:
        """A namespace is no longer watched: remove its series (so that the `netns`
        label has one value per namespace watched now, not per one ever seen)."""
        found = self._namespaces.pop(netns, None)
        if found is None:
            return
        for metric in (*self.counters.values(), self.pending, self.findings):
            with contextlib.suppress(KeyError):
                metric.remove(netns)
        for labels in found.wrong_labels:
            with contextlib.suppress(KeyError):
                self.wrong.remove(netns, *labels)
        self.conntrack.forget(netns)

    def update(self, totals: dict[str, int], pending: int, findings: int) -> None:
        assert self.default is not None, "WatchMetrics(netns=None): use namespace(label)"
        self.default.update(totals, pending, findings)

    def finding(self, finding: WrongSourceFinding) -> None:
        assert self.default is not None, "WatchMetrics(netns=None): use namespace(label)"
        self.default.finding(finding)

    def close(self) -> None:
        self.listener.close()


class NamespaceMetrics:
    """One namespace's series: advanced by deltas of its watcher's totals."""

    def __init__(self, parent: WatchMetrics, netns: str) -> None:
        self.parent = parent
        self.netns = netns
        self._totals: dict[str, float] = {}
        self.counters = {name: c.labels(netns) for name, c in parent.counters.items()}
        self.pending = parent.pending.labels(netns)
        self.findings = parent.findings.labels(netns)
        #: the wrong-source label sets this namespace used (removed with it)
        self.wrong_labels: set[tuple[str, ...]] = set()

    def update(self, totals: dict[str, int], pending: int, findings: int) -> None:
        """Once a second, in the watched namespace (the conntrack reading is its)."""
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
        self.parent.conntrack.refresh(netns=self.netns)

    def finding(self, finding: WrongSourceFinding) -> None:
        labels = self.parent._wrong_labels.admit(
            (
                finding.service,
                finding.actual_source,
                finding.expected_source,
                finding.client_network,
                finding.mismatch,
            )
        )
        self.wrong_labels.add(labels)
        self.parent.wrong.labels(self.netns, *labels).inc()
