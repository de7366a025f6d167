"""watch --all-netns without a kernel: the memory each namespace may hold and the one
budget of pending flows they share, the client-container cache (never asked per
event), and metrics that drop a namespace's series when it goes."""

from __future__ import annotations

import socket
from typing import Any

from prometheus_client import generate_latest

from ctfix.commands.watch_all import MAX_NETNS, TOTAL_FLOWS, limits
from ctfix.core.decode import NEW, CtEntry, CtEvent, CtTuple
from ctfix.core.detectors.wrong_source import WrongSourceDetector, WrongSourceFinding
from ctfix.core.model import ContainerRef
from ctfix.platform.conntrack import DEFAULT_RCVBUF
from ctfix.platform.containers import ClientContainers
from ctfix.platform.metrics import WatchMetrics
from tests.unit.test_prometheus_rules import NoServer


def test_each_namespace_gets_a_share_and_the_host_its_full_buffer() -> None:
    few, many = limits(4, host=False, flows=1000), limits(MAX_NETNS, host=False, flows=1000)
    assert few.wrong_findings == 2500 and many.wrong_findings == 100  # the floor
    assert many.unanswered == {"max_findings": 64, "max_clients": 1024, "max_remembered": 1024}
    # Kernel buffers: the host keeps one namespace's 64 MiB, the others a share.
    assert limits(MAX_NETNS, host=True, flows=1).rcvbuf == DEFAULT_RCVBUF
    assert many.rcvbuf == 2 << 20
    assert limits(1, host=False, flows=1).rcvbuf == 16 << 20
    # Worst case over every namespace: what one namespace may hold, a few times over.
    assert MAX_NETNS * many.wrong_findings <= 3 * 10_000
    assert TOTAL_FLOWS == 2_000_000


def _request(sport: int) -> CtEvent:
    orig = CtTuple("192.0.2.3", "198.51.100.13", sport, 53, 17, socket.AF_INET)
    reply = CtTuple("198.51.100.13", "192.0.2.3", 53, sport, 17, socket.AF_INET)
    return CtEvent(NEW, CtEntry(orig, reply, 0, 0, None, 30, None))


def test_a_smaller_share_of_flows_is_enforced_at_once_oldest_first() -> None:
    d = WrongSourceDetector(local_addresses=frozenset({"198.51.100.13"}))
    for sport in range(1000, 1100):
        d.feed(_request(sport), 1.0)
    assert d.pending == 100
    d.limit_flows(30)
    assert d.pending == 30 and d.stats.evicted == 70
    d.feed(_request(2000), 2.0)
    assert d.pending == 30  # and it stays there
    d.limit_flows(1000)
    d.feed(_request(2001), 2.0)
    assert d.pending == 31


class FakeResolver:
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.forgotten = 0
        self.known: dict[str, ContainerRef] = {}

    def for_address(self, address: str) -> ContainerRef | None:
        self.asked.append(address)
        return self.known.get(address)

    def forget_addresses(self) -> None:
        self.forgotten += 1


def test_a_client_container_is_asked_once_per_address_and_a_miss_again_later() -> None:
    res = FakeResolver()
    clock = [100.0]
    web = ContainerRef(id="a" * 64, name="web", engine="docker")
    res.known["192.0.2.3"] = web
    lookup = ClientContainers(res, max_age=60.0, clock=lambda: clock[0])  # type: ignore[arg-type]  # the resolver's two methods
    for port in range(1000, 1100):
        assert lookup(f"192.0.2.3:{port}") == web
    assert lookup("192.0.2.9:53") is None
    assert lookup("[::ffff:192.0.2.9]:53") is None  # the same client, as a v6 socket sees it
    assert res.asked == ["192.0.2.3", "192.0.2.9"] and res.forgotten == 0
    clock[0] += 61.0  # a container may have come: asked again, its map rebuilt once
    res.known["192.0.2.9"] = web
    assert lookup("192.0.2.9:53") == web and res.forgotten == 1
    assert lookup("not an endpoint") is None


def _no_reading() -> Any:
    raise OSError("no conntrack statistics in a unit test")


def test_metrics_have_a_netns_label_per_namespace_and_forget_a_gone_one() -> None:
    metrics = WatchMetrics(NoServer())
    finding = WrongSourceFinding(
        family="ipv4", proto="udp", client="192.0.2.3:4000", service="198.51.100.13:53",
        expected_source="198.51.100.13:53", actual_source="192.0.2.1:53", mismatch="address",
        local=True, confirmed=False, count=1, first_seen=1.0, last_seen=1.0,
        client_network="192.0.2.0/24",
    )
    for name in ("host", "web", "ns-b0"):
        space = metrics.namespace(name)
        space.parent.conntrack._read = _no_reading
        space.update({"events": 5, "new_flows": 2, "lost": 0, "resyncs": 0}, 1, 0)
    metrics.namespace("web").finding(finding)
    text = generate_latest(metrics.registry).decode()
    assert text.count("ctfix_watch_events_total{") == 3
    assert 'ctfix_watch_wrong_source_replies_total{actual_source="192.0.2.1:53"' in text
    metrics.forget("web")
    text = generate_latest(metrics.registry).decode()
    assert text.count("ctfix_watch_events_total{") == 2 and 'netns="web"' not in text
