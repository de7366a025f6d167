"""The unanswered detector: which ended flows count, the four reasons, one-way
services, dumps counted once, and the caps."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import pytest

from ctfix.core.decode import DESTROY, IPS_SEEN_REPLY, NEW, UPDATE, CtEntry, CtEvent, CtTuple
from ctfix.core.detectors import Change, Detector, feeds_by_kind
from ctfix.core.detectors.unanswered import (
    Binding,
    Holder,
    ListenerSockets,
    UnansweredDetector,
    UnansweredFinding,
    dropping_rules,
)
from ctfix.core.detectors.unanswered_words import unanswered_text
from ctfix.core.detectors.wrong_source import WrongSourceDetector, WrongSourceFinding
from ctfix.core.diagnosis import diagnose
from ctfix.core.model import Listener, NetfilterBackend
from ctfix.core.snapshot import LocalAddress, NetfilterRule, Snapshot
from ctfix.platform.rules_files import load
from ctfix.render.explain import to_json_obj
from tests.unit.test_wrong_source import LOCAL
from tests.unit.test_wrong_source import flow as wrong_source_flow

KB = load(builtin=True)


def flow(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    *,
    reply_src: str | None = None,
    reply_sport: int | None = None,
    status: int = 0,
    timeout: int | None = None,
    ct_id: int | None = None,
) -> CtEntry:
    """test_wrong_source's entry, with the time left and the id dumps carry (no timeout:
    an entry of unknown age, taken as old)."""
    entry = wrong_source_flow(
        src, sport, dst, dport, reply_src=reply_src, reply_sport=reply_sport, status=status
    )
    return entry._replace(timeout=timeout, id=ct_id)


def ended(entry: CtEntry) -> CtEvent:
    return CtEvent(DESTROY, entry)


class FakeSockets:
    """Sockets by port, each with its holder."""

    def __init__(self, *bound: tuple[Binding, Holder | None]) -> None:
        self.bound = bound

    def on_port(self, port: int) -> Sequence[Binding]:
        return [b for b, _h in self.bound if b.port == port]

    def holder(self, binding: Binding) -> Holder | None:
        return next(h for b, h in self.bound if b == binding)


def wildcard(
    port: int, process: str = "myserver", *, started: float | None = None
) -> tuple[Binding, Holder]:
    binding = Binding("ipv4", "0.0.0.0", port, None, None, port)
    return binding, Holder(process, (process,), None, started)


def detector(*bound: tuple[Binding, Holder | None], **hooks: object) -> UnansweredDetector:
    return UnansweredDetector(
        sockets=FakeSockets(*bound),
        kb=KB,
        local_addresses=LOCAL,
        **hooks,  # type: ignore[arg-type]  # test hooks are duck-typed
    )


def only(found: tuple[UnansweredFinding, Change] | None) -> UnansweredFinding:
    assert found is not None
    return found[0]


def test_nothing_bound_is_no_socket_and_a_silent_socket_is_no_reply() -> None:
    d = detector(wildcard(7000))
    down = only(d.feed(ended(flow("192.0.2.3", 40000, "198.51.100.13", 7001)), 10.0))
    silent = only(d.feed(ended(flow("192.0.2.3", 40001, "198.51.100.13", 7000)), 10.0))
    assert (down.kind, down.service, down.reason) == (
        "unanswered", "198.51.100.13:7001", "no-socket"
    )
    assert (silent.service, silent.reason, silent.program) == (
        "198.51.100.13:7000", "no-reply", "myserver"
    )
    assert down.problem and silent.problem and not down.existing


def test_counts_per_service_and_reason_with_distinct_clients() -> None:
    d = detector()
    results = [
        d.feed(ended(flow(client, port, "198.51.100.13", 53)), 10.0 + i)
        for i, (client, port) in enumerate(
            [("192.0.2.3", 40000), ("192.0.2.3", 40001), ("192.0.2.4", 40000)]
        )
    ]
    assert [r[1] for r in results if r] == [Change.NEW, Change.COUNTED, Change.COUNTED]
    [finding] = d.found
    assert (finding.flows, finding.clients, finding.client) == (3, 2, "192.0.2.4:40000")
    assert (finding.first_seen, finding.last_seen) == (10.0, 12.0)


def test_what_is_not_an_unanswered_request() -> None:
    d = detector()
    replied = flow("192.0.2.3", 40000, "198.51.100.13", 53, status=IPS_SEEN_REPLY)
    own_client = flow("192.0.2.1", 40000, "203.0.113.9", 53)  # the host's own query
    forwarded = flow("203.0.113.5", 40000, "203.0.113.9", 53)  # routed through, no NAT
    multicast = flow("192.0.2.3", 5353, "224.0.0.251", 5353)
    for entry in (replied, own_client, forwarded, multicast):
        assert d.feed(ended(entry), 1.0) is None
    for kind in (NEW, UPDATE):
        assert d.feed(CtEvent(kind, flow("192.0.2.3", 40000, "198.51.100.13", 53)), 1.0) is None
    assert not d.found and d.stats.flows == 0


def test_a_wrong_source_reply_makes_the_unanswered_flow_wrong_source() -> None:
    wrong = WrongSourceDetector(local_addresses=LOCAL)
    d = detector(wildcard(56789), wrong=wrong)
    request = flow("192.0.2.3", 33611, "198.51.100.13", 56789)
    wrong.feed(CtEvent(NEW, request), 1.0)
    assert wrong.feed(CtEvent(NEW, flow("192.0.2.1", 56789, "192.0.2.3", 33611)), 1.1)
    # Another client of the same service got nothing at all: the server never answered it.
    other = flow("192.0.2.4", 33611, "198.51.100.13", 56789)
    assert only(d.feed(ended(request), 31.0)).reason == "wrong-source"
    assert only(d.feed(ended(other), 31.0)).reason == "no-reply"


def test_a_stale_nat_target_comes_first() -> None:
    class Stale:
        def was_stale(self, entry: CtEntry) -> bool:
            return entry.reply.src == "203.0.113.50"

    d = detector(stale=Stale())
    entry = flow("192.0.2.3", 40000, "198.51.100.200", 53, reply_src="203.0.113.50")
    found = only(d.feed(ended(entry), 1.0))
    assert (found.reason, found.target) == ("stale-nat", "203.0.113.50:53")
    # QA F10: ctfix knows the rules no longer name the old target, not whether it
    # serves (often another host), nor whether one-way senders expected a reply.
    text = unanswered_text(found)
    assert "no longer name" in text and "no longer serves" not in text
    assert "got no reply" not in text


def test_a_dnat_to_another_host_that_never_answered_is_no_reply_with_its_target() -> None:
    d = detector()
    entry = flow("192.0.2.3", 40000, "198.51.100.200", 53, reply_src="203.0.113.50")
    found = only(d.feed(ended(entry), 1.0))
    assert (found.service, found.reason, found.target) == (
        "198.51.100.200:53",
        "no-reply",
        "203.0.113.50:53",
    )


def test_the_hosts_icmp_port_unreachable_confirms_no_socket_whatever_is_bound_now() -> None:
    d = detector(wildcard(7000))
    d.icmp_sent("192.0.2.3", 40000, "198.51.100.13", 7000, 1.0)
    found = only(d.feed(ended(flow("192.0.2.3", 40000, "198.51.100.13", 7000)), 31.0))
    assert (found.reason, found.confirmed) == ("no-socket", True)
    later = only(d.feed(ended(flow("192.0.2.3", 40001, "198.51.100.13", 7000)), 32.0))
    assert later.reason == "no-reply"  # no ICMP for that one: the socket was there


def test_a_socket_whose_process_started_after_the_request_did_not_take_it() -> None:
    d = detector(wildcard(7000, started=20.0))  # udp_timeout 30: the request came at 10
    found = only(d.feed(ended(flow("192.0.2.3", 40000, "198.51.100.13", 7000)), 40.0))
    assert found.reason == "no-socket"
    again = only(d.feed(ended(flow("192.0.2.3", 40001, "198.51.100.13", 7000)), 60.0))
    assert again.reason == "no-reply"  # request at 30, process up since 20
    # Started a second after the request: within whole-second clocks, not "after".
    close = detector(wildcard(7000, started=31.0))
    near = only(close.feed(ended(flow("192.0.2.3", 40002, "198.51.100.13", 7000)), 60.0))
    assert near.reason == "no-reply"


V4_SERVICE = ("192.0.2.3", "198.51.100.13")
V6_SERVICE = ("2001:db8:1::3", "2001:db8:2::13")


@pytest.mark.parametrize(
    ("binding", "ends", "takes"),
    [
        (Binding("ipv4", "192.0.2.1", 53, None, None, 1), V4_SERVICE, False),
        (Binding("ipv4", "198.51.100.13", 53, None, None, 1), V4_SERVICE, True),
        # netcat after its first client: connected to another peer
        (Binding("ipv4", "198.51.100.13", 53, "192.0.2.9:1000", None, 1), V4_SERVICE, False),
        (Binding("ipv4", "198.51.100.13", 53, "192.0.2.3:40000", None, 1), V4_SERVICE, True),
        (Binding("ipv6", "::", 53, None, False, 1), V4_SERVICE, True),
        (Binding("ipv6", "::", 53, None, True, 1), V4_SERVICE, False),
        (Binding("ipv6", "::ffff:198.51.100.13", 53, None, False, 1), V4_SERVICE, True),
        (Binding("ipv6", "::", 53, None, True, 1), V6_SERVICE, True),
        (Binding("ipv4", "0.0.0.0", 53, None, None, 1), V6_SERVICE, False),
    ],
)
def test_which_socket_takes_the_datagram(
    binding: Binding, ends: tuple[str, str], takes: bool
) -> None:
    d = detector((binding, Holder("srv", (), None)))
    found = only(d.feed(ended(flow(ends[0], 40000, ends[1], 53)), 1.0))
    assert found.reason == ("no-reply" if takes else "no-socket")


def test_a_one_way_service_is_counted_apart_and_is_no_problem() -> None:
    d = detector(wildcard(514, "rsyslogd"))
    found = only(d.feed(ended(flow("192.0.2.3", 40000, "198.51.100.13", 514)), 1.0))
    assert (found.reason, found.one_way, found.problem) == ("no-reply", True, False)
    assert d.stats.one_way == 1


def test_one_way_is_known_by_the_program_never_by_the_port() -> None:
    d = detector(wildcard(514, "nc"))
    found = only(d.feed(ended(flow("192.0.2.3", 40000, "198.51.100.13", 514)), 1.0))
    assert (found.reason, found.one_way, found.problem) == ("no-reply", False, True)
    # Nothing bound on the syslog port: the server is down, and that is a problem.
    down = only(detector().feed(ended(flow("192.0.2.3", 40000, "198.51.100.13", 514)), 1.0))
    assert (down.reason, down.one_way, down.problem) == ("no-socket", False, True)


def test_a_dump_counts_each_unreplied_request_once() -> None:
    d = detector(remember=True)
    old = flow("192.0.2.3", 40000, "198.51.100.13", 53, timeout=20, ct_id=7)
    [(finding, change)] = d.examine([old, old], 100.0, complete=True)
    assert (finding.flows, finding.existing, change) == (1, True, Change.NEW)
    # A resync's dump repeating the entry adds nothing, nor does its DESTROY.
    assert d.examine([old], 101.0) == []
    assert d.feed(ended(old), 128.0) is None
    # After the start-up dump, dumps find news; a request ending while watching is news
    # too, in a finding of its own (the start-up's stays history).
    d.dumps_are_history = False
    later = flow("192.0.2.3", 40001, "198.51.100.13", 53, timeout=30, ct_id=8)
    again = only(d.feed(ended(later), 130.0))
    assert (again.flows, again.existing, again.service) == (1, False, finding.service)
    assert sorted(f.existing for f in d.found) == [False, True]


def test_watch_leaves_dumped_entries_it_cannot_remember_to_their_destroy() -> None:
    d = detector(remember=True)
    no_id = flow("192.0.2.3", 40000, "198.51.100.13", 53, timeout=10)
    assert d.examine([no_id], 100.0) == []
    assert only(d.feed(ended(no_id), 110.0)).flows == 1


def test_caps_bound_memory_and_count_what_they_keep_out() -> None:
    d = UnansweredDetector(local_addresses=LOCAL, max_findings=2, max_clients=3)
    for port in (1, 2, 3):
        for client in range(3):
            d.feed(ended(flow(f"192.0.2.{10 + client}", 40000, "198.51.100.13", port)), 1.0)
    assert len(d.findings) == 2
    assert d.stats.uncounted_flows == 3  # port 3's flows
    assert d.stats.uncounted_clients == 3  # the second service's clients
    assert sum(f.flows for f in d.found) == 6 == d.stats.flows


def test_feeds_by_kind_keeps_new_events_on_the_wrong_source_feed_alone() -> None:
    wrong = WrongSourceDetector(local_addresses=LOCAL)
    unanswered = UnansweredDetector(local_addresses=LOCAL)
    detectors: list[Detector[WrongSourceFinding | UnansweredFinding]] = [wrong, unanswered]
    reported: list[tuple[WrongSourceFinding | UnansweredFinding, Change]] = []
    feeds = feeds_by_kind(detectors, reported.append)
    assert feeds[NEW] == wrong.feed and feeds[UPDATE] == wrong.feed
    assert feeds[DESTROY](ended(flow("192.0.2.3", 40000, "198.51.100.13", 53)), 1.0) is None
    assert [type(found[0]) for found in reported] == [UnansweredFinding]


def test_rules_that_can_leave_an_entry_unreplied_while_a_socket_is_bound() -> None:
    def rule(chain: str, hook: str | None, actions: set[str], *, sport: bool = False,
             dport: bool = False, table: str = "filter",
             backend: NetfilterBackend = "nftables") -> NetfilterRule:
        text = f"{' '.join(sorted(actions))} {'sport' if sport else 'dport'}"
        return NetfilterRule(backend, "inet", table, chain, text, frozenset(actions),
                             matches_sport=sport, matches_dport=dport, hook=hook)

    rules = [
        rule("out", "output", {"drop"}, sport=True, table="t"),  # priority unknown: can
        rule("OUTPUT", "output", {"drop"}, sport=True, table="raw", backend="iptables-legacy"),
        rule("OUTPUT", "output", {"notrack"}, sport=True, table="raw", backend="iptables-legacy"),
        # Measured not to: a reply dropped in filter output has marked its entry replied,
        # a request dropped on input leaves no entry at all.
        rule("OUTPUT", "output", {"drop"}, sport=True, backend="iptables-legacy"),
        rule("input", "input", {"drop"}, dport=True),
        rule("out", "output", {"accept"}, sport=True, table="t"),
    ]
    assert dropping_rules(rules, 53) == (
        "nftables inet t out: drop sport",
        "iptables-legacy raw OUTPUT: drop sport",
        "iptables-legacy raw OUTPUT: notrack sport",
    )


def test_a_request_the_snat_zone_remedy_answered_is_not_unanswered() -> None:
    """snat-zone puts the reply in another conntrack zone: the request's own entry ends
    unreplied although the client got its answer from the right source."""
    wrong = WrongSourceDetector(local_addresses=LOCAL)
    d = detector(wildcard(53), wrong=wrong)
    request = flow("192.0.2.3", 40000, "198.51.100.13", 53)
    wrong.feed(CtEvent(NEW, request), 1.0)
    zoned = CtEntry(
        CtTuple("192.0.2.1", "192.0.2.3", 53, 40000, 17, socket.AF_INET),
        CtTuple("192.0.2.3", "198.51.100.13", 40000, 53, 17, socket.AF_INET),  # after SNAT
        zone=7,
    )
    assert wrong.feed(CtEvent(NEW, zoned), 1.1) is None  # the right source: no finding
    assert d.feed(ended(request), 31.0) is None
    assert not d.found


def test_explains_listeners_are_sockets_too() -> None:
    listeners = [
        Listener("0.0.0.0", 514, "ipv4", "listening", pid=1, process="rsyslogd",
                 cmdline=("rsyslogd", "-n")),
        Listener("192.0.2.1", 53, "ipv4", "listening", pid=2, process="dnsmasq"),
    ]
    d = UnansweredDetector(sockets=ListenerSockets(listeners), kb=KB, local_addresses=LOCAL)
    syslog = only(d.feed(ended(flow("192.0.2.3", 40000, "198.51.100.13", 514)), 1.0))
    dns = only(d.feed(ended(flow("192.0.2.3", 40000, "198.51.100.13", 53)), 1.0))
    assert (syslog.reason, syslog.one_way) == ("no-reply", True)
    assert dns.reason == "no-socket"  # bound to the bridge address only


# -- explain: the same classification over a snapshot -----------------------------------


def _snapshot(port: int, *listeners: Listener, **kw: object) -> Snapshot:
    addresses = (
        LocalAddress("br0", "192.0.2.1", 24, "ipv4"),
        LocalAddress("eth0", "198.51.100.13", 24, "ipv4"),
    )
    return Snapshot(port=port, netns="test", listeners=listeners, addresses=addresses,
                    **kw)  # type: ignore[arg-type]  # the fields each test sets


def test_explain_classifies_the_ports_unreplied_entries_and_those_that_ended_live() -> None:
    silent = Listener("198.51.100.13", 7000, "ipv4", "listening", pid=9, process="silent")
    in_table = flow("192.0.2.3", 40000, "198.51.100.13", 7000, timeout=10)
    just_sent = flow("192.0.2.3", 40001, "198.51.100.13", 7000, timeout=30)  # counted too
    to_bridge = flow("192.0.2.3", 40002, "192.0.2.1", 7000, timeout=10)  # not bound there
    ended_live = flow("192.0.2.4", 40000, "198.51.100.13", 7000)
    drop = NetfilterRule("nftables", "inet", "t", "out", "udp sport 7000 drop",
                         frozenset({"drop"}), matches_sport=True, hook="output")
    d = diagnose(
        _snapshot(7000, silent, flows=(in_table, just_sent, to_bridge),
                  ended_unreplied=(ended_live,), netfilter=(drop,), listened_seconds=3.0),
        KB,
    )
    by_service = {(u.service, u.reason): u for u in d.unanswered}
    assert set(by_service) == {("198.51.100.13:7000", "no-reply"), ("192.0.2.1:7000", "no-socket")}
    silent_one = by_service[("198.51.100.13:7000", "no-reply")]
    assert (silent_one.flows, silent_one.clients, silent_one.program) == (3, 2, "silent")
    assert silent_one.rules == ("nftables inet t out: udp sport 7000 drop",)
    codes = [r.code for r in d.reasons]
    assert codes.count("unanswered-no-reply") == 1 and codes.count("unanswered-no-socket") == 1
    [record] = [u for u in to_json_obj(d)["unanswered"] if u["reason"] == "no-reply"]
    assert record["flows"] == 3 and record["rules"] == list(silent_one.rules)
    assert d.verdict == "ok"  # about wrong sources only


def test_explain_calls_a_one_way_service_informational() -> None:
    syslog = Listener("0.0.0.0", 514, "ipv4", "listening", pid=9, process="rsyslogd")
    d = diagnose(_snapshot(514, syslog, flows=(flow("192.0.2.3", 40000, "198.51.100.13", 514),)),
                 KB)
    assert [u.one_way for u in d.unanswered] == [True]
    assert "unanswered-one-way" in [r.code for r in d.reasons]
    assert not {"unanswered-no-reply", "unanswered-no-socket"} & {r.code for r in d.reasons}


def test_explain_leaves_requests_dnatd_to_another_local_port_to_that_port() -> None:
    natted = flow("192.0.2.3", 40000, "198.51.100.13", 8053, reply_src="192.0.2.1",
                  reply_sport=53)
    assert diagnose(_snapshot(8053, flows=(natted,)), KB).unanswered == ()
    [here] = diagnose(_snapshot(53, flows=(natted,)), KB).unanswered
    assert (here.service, here.target, here.reason) == (
        "198.51.100.13:8053", "192.0.2.1:53", "no-socket"
    )


def test_a_timed_watch_exits_1_for_problems_and_not_for_one_way_flows() -> None:
    from ctfix.commands.watch import exit_status

    d = detector(wildcard(514, "rsyslogd"))
    syslog = only(d.feed(ended(flow("192.0.2.3", 40000, "198.51.100.13", 514)), 1.0))
    down = only(d.feed(ended(flow("192.0.2.3", 40000, "198.51.100.13", 7001)), 1.0))
    assert exit_status([syslog], stopped_by_duration=True) == 0
    assert exit_status([syslog, down], stopped_by_duration=True) == 1
    assert exit_status([syslog, down], stopped_by_duration=False) == 0  # Ctrl-C, SIGTERM


def test_a_request_answered_through_the_fix_is_answered_when_both_ended_during_listen() -> None:
    """QA F8: the request's zone-0 entry stays unreplied, the reply lives in ctfix's
    zone; during --listen both can end (the reply's DESTROY is an unreplied entry of
    another port): the request was answered, not `no-reply`."""
    server = Listener("0.0.0.0", 7000, "ipv4", "listening", pid=9, process="python3")
    request = flow("192.0.2.3", 40000, "198.51.100.13", 7000)
    zoned = CtEntry(
        CtTuple("192.0.2.1", "192.0.2.3", 7000, 40000, 17, socket.AF_INET),
        CtTuple("192.0.2.3", "198.51.100.13", 40000, 7000, 17, socket.AF_INET),  # SNAT'd
        zone=51185,
    )
    d = diagnose(
        _snapshot(7000, server, ended_unreplied=(request, zoned), listened_seconds=3.0), KB
    )
    assert d.unanswered == () and d.evidence.unanswered == 0
