"""The detector: the wrong-source rule, what must not be reported, bounds and expiry."""

from __future__ import annotations

import io
import json
import pathlib
import socket

from ctfix.core import decode
from ctfix.core.decode import DUMPED, IPS_SEEN_REPLY, NEW, UPDATE, CtEntry, CtEvent, CtTuple
from ctfix.core.detectors import Change
from ctfix.core.detectors.wrong_source import WrongSourceDetector, WrongSourceFinding

V4, V6 = socket.AF_INET, socket.AF_INET6
LOCAL = frozenset({"198.51.100.13", "192.0.2.1", "2001:db8:2::13", "2001:db8:1::1"})


def flow(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    *,
    reply_src: str | None = None,
    reply_sport: int | None = None,
    reply_dst: str | None = None,
    zone: int = 0,
    status: int = 0,
) -> CtEntry:
    family = V6 if ":" in src else V4
    orig = CtTuple(src, dst, sport, dport, 17, family)
    reply = CtTuple(reply_src or dst, reply_dst or src, reply_sport or dport, sport, 17, family)
    return CtEntry(orig, reply, status=status, zone=zone, timeout=30)


def new(entry: CtEntry) -> CtEvent:
    return CtEvent(NEW, entry)


def detector() -> WrongSourceDetector:
    return WrongSourceDetector(local_addresses=LOCAL)


def only(found: tuple[WrongSourceFinding, Change] | None) -> WrongSourceFinding:
    assert found is not None
    return found[0]


def test_reply_from_another_local_address_is_an_address_mismatch() -> None:
    d = detector()
    assert d.feed(new(flow("192.0.2.3", 33611, "198.51.100.13", 56789)), 100.0) is None
    found = d.feed(new(flow("192.0.2.1", 56789, "192.0.2.3", 33611)), 100.1)
    assert found is not None and found[1] is Change.NEW
    f = found[0]
    assert (f.client, f.service) == ("192.0.2.3:33611", "198.51.100.13:56789")
    assert (f.expected_source, f.actual_source) == ("198.51.100.13:56789", "192.0.2.1:56789")
    assert f.mismatch == "address" and f.local and not f.confirmed
    assert f.family == "ipv4" and f.client_network == "192.0.2.0/24"


def test_port_and_address_plus_port_mismatches() -> None:
    d = detector()
    d.feed(new(flow("192.0.2.3", 1000, "198.51.100.13", 69)), 1.0)
    assert (
        only(d.feed(new(flow("198.51.100.13", 40000, "192.0.2.3", 1000)), 1.1)).mismatch == "port"
    )
    d.feed(new(flow("192.0.2.3", 1001, "198.51.100.13", 69)), 1.0)
    f = only(d.feed(new(flow("192.0.2.1", 40000, "192.0.2.3", 1001)), 1.1))
    assert f.mismatch == "address+port"


def test_ipv6_pair_from_recorded_kernel_messages() -> None:
    records = json.loads(
        (pathlib.Path(__file__).parent / "fixtures" / "ctnetlink_messages.json").read_text()
    )
    d = detector()
    findings = []
    for record in records:
        if record["source"] == "event":
            event = decode.decode_event(bytes.fromhex(record["hex"]))
            assert event is not None
            if (found := d.feed(event, 5.0)) is not None:
                findings.append(found[0])
    assert [(f.family, f.expected_source, f.actual_source, f.mismatch) for f in findings] == [
        ("ipv4", "198.51.100.13:56789", "192.0.2.1:56789", "address"),
        ("ipv6", "[2001:db8:2::13]:5353", "[2001:db8:1::1]:5353", "address"),
    ]


def test_the_dnat_reply_tuple_is_the_expectation_not_the_original_destination() -> None:
    d = detector()
    # Client sent to 203.0.113.80:53, DNAT'd to the container 192.0.2.3:5353.
    d.feed(
        new(
            flow("198.51.100.1", 4000, "203.0.113.80", 53, reply_src="192.0.2.3", reply_sport=5353)
        ),
        1.0,
    )
    # The container answers from the right place: conntrack matches, no new entry.
    # A new entry from 192.0.2.3:5353 can only mean the DNAT'd service answered
    # outside the flow; but the expectation is 192.0.2.3:5353, so equal -> nothing.
    assert d.feed(new(flow("192.0.2.3", 5353, "198.51.100.1", 4000)), 1.1) is None
    f = only(d.feed(new(flow("192.0.2.9", 5353, "198.51.100.1", 4000)), 1.2))
    assert (f.service, f.expected_source) == ("203.0.113.80:53", "192.0.2.3:5353")


def test_a_reply_snatted_from_another_zone_to_the_right_source_is_not_reported() -> None:
    d = detector()
    d.feed(new(flow("192.0.2.3", 33611, "198.51.100.13", 56789)), 1.0)
    # snat-zone remedy: the reply is in zone 7 and leaves as 198.51.100.13:56789.
    fixed = flow("192.0.2.1", 56789, "192.0.2.3", 33611, reply_dst="198.51.100.13", zone=7)
    assert d.feed(new(fixed), 1.1) is None
    assert not d.findings


def test_replied_or_expired_requests_are_forgotten() -> None:
    d = detector()
    request = flow("192.0.2.3", 2000, "198.51.100.13", 53)
    d.feed(new(request), 1.0)
    d.feed(CtEvent(UPDATE, request._replace(status=IPS_SEEN_REPLY)), 1.1)
    assert d.feed(new(flow("192.0.2.1", 53, "192.0.2.3", 2000)), 1.2) is None
    d.feed(new(flow("192.0.2.3", 2001, "198.51.100.13", 53)), 10.0)
    d.expire(10.0 + 32)
    assert d.pending == 0
    assert d.feed(new(flow("192.0.2.1", 53, "192.0.2.3", 2001)), 10.0 + 33) is None


def test_the_clients_next_request_is_not_mistaken_for_a_reply() -> None:
    d = detector()
    d.feed(new(flow("2001:db8:1::3", 5000, "2001:db8:2::13", 5353)), 1.0)
    assert d.feed(new(flow("2001:db8:1::1", 5353, "2001:db8:1::3", 5000)), 1.1) is not None
    # The same client now asks the address that answered: an ordinary request.
    assert d.feed(new(flow("2001:db8:1::3", 5001, "2001:db8:1::1", 5353)), 1.2) is None
    assert len(d.findings) == 1


def test_multicast_queries_answered_by_unicast_are_not_reported() -> None:
    d = detector()
    d.feed(new(flow("192.0.2.1", 5353, "224.0.0.251", 5353)), 1.0)
    assert d.feed(new(flow("192.0.2.3", 5353, "192.0.2.1", 5353)), 1.1) is None


def test_findings_aggregate_per_service_source_and_client_network() -> None:
    d = detector()
    results = []
    for i, client in enumerate(["192.0.2.3", "192.0.2.4", "203.0.113.5"]):
        d.feed(new(flow(client, 3000 + i, "198.51.100.13", 53)), 1.0 + i)
        results.append(d.feed(new(flow("192.0.2.1", 53, client, 3000 + i)), 1.5 + i))
    assert [r[1] for r in results if r] == [Change.NEW, Change.COUNTED, Change.NEW]
    counts = {f.client_network: f.count for f in d.findings.values()}
    assert counts == {"192.0.2.0/24": 2, "203.0.113.0/24": 1}
    agg = d.findings[("198.51.100.13:53", "192.0.2.1:53", "192.0.2.0/24")]
    assert (agg.first_seen, agg.last_seen) == (1.5, 2.5)


def test_icmp_port_unreachable_confirms_whichever_comes_first() -> None:
    d = detector()
    d.feed(new(flow("192.0.2.3", 4000, "198.51.100.13", 53)), 1.0)
    d.feed(new(flow("192.0.2.1", 53, "192.0.2.3", 4000)), 1.1)
    confirmed = d.icmp_port_unreachable("192.0.2.1", 53, "192.0.2.3", 4000, 1.2)
    assert confirmed is not None and confirmed.confirmed
    assert d.icmp_port_unreachable("192.0.2.1", 53, "192.0.2.3", 4000, 1.3) is None
    # ICMP read before the conntrack event:
    d2 = detector()
    d2.feed(new(flow("192.0.2.3", 4001, "198.51.100.13", 53)), 1.0)
    assert d2.icmp_port_unreachable("192.0.2.1", 53, "192.0.2.3", 4001, 1.05) is None
    assert only(d2.feed(new(flow("192.0.2.1", 53, "192.0.2.3", 4001)), 1.1)).confirmed


def test_an_icmp_read_before_the_reply_of_a_known_finding_prints_a_confirmed_line() -> None:
    """The second client's ICMP is read before its reply's event (another batch, or a
    resync dump): the finding exists already, and still the user must see it turn
    confirmed, once."""
    from ctfix.commands.watch_report import Reporter
    from ctfix.core.watch_filter import Selection
    from ctfix.render.watch import WatchRenderer

    out = io.StringIO()
    renderer = WatchRenderer(out, json_lines=False, netns="lab")
    report = Reporter(renderer, None, Selection())
    d = detector()
    d.feed(new(flow("192.0.2.3", 4000, "198.51.100.13", 53)), 1.0)
    report(d.feed(new(flow("192.0.2.1", 53, "192.0.2.3", 4000)), 1.1))
    d.feed(new(flow("192.0.2.4", 4001, "198.51.100.13", 53)), 2.0)
    assert d.icmp_port_unreachable("192.0.2.1", 53, "192.0.2.4", 4001, 2.05) is None
    second = d.feed(new(flow("192.0.2.1", 53, "192.0.2.4", 4001)), 2.1)
    assert second is not None and second[1] is Change.CONFIRMED
    report(second)
    # A third reply to an already confirmed finding only counts.
    d.feed(new(flow("192.0.2.5", 4002, "198.51.100.13", 53)), 3.0)
    d.icmp_port_unreachable("192.0.2.1", 53, "192.0.2.5", 4002, 3.05)
    third = d.feed(new(flow("192.0.2.1", 53, "192.0.2.5", 4002)), 3.1)
    assert third is not None and third[1] is Change.COUNTED
    report(third)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert " WRONG SOURCE " in lines[0] and "confirmed" not in lines[0]
    assert " CONFIRMED " in lines[1] and "(address mismatch, local, confirmed)" in lines[1]
    assert "2 replies to 2 client ports in 192.0.2.0/24, latest 192.0.2.4:4001" in lines[1]


def test_multicast_is_never_a_request_even_without_local_addresses() -> None:
    d = WrongSourceDetector()  # no local addresses: only the multicast rule keeps these out
    d.feed(new(flow("2001:db8:1::3", 5353, "ff02::fb", 5353)), 1.0)
    assert d.feed(new(flow("2001:db8:1::1", 5353, "2001:db8:1::3", 5353)), 1.1) is None
    d.feed(new(flow("192.0.2.3", 5353, "224.0.0.251", 5353)), 1.0)
    assert d.feed(new(flow("192.0.2.1", 5353, "192.0.2.3", 5353)), 1.1) is None
    # while unicast requests still are
    d.feed(new(flow("2001:db8:1::3", 4000, "2001:db8:2::13", 53)), 2.0)
    assert only(d.feed(new(flow("2001:db8:1::1", 53, "2001:db8:1::3", 4000)), 2.1))
    d.feed(new(flow("192.0.2.3", 4000, "198.51.100.13", 53)), 2.0)
    assert only(d.feed(new(flow("192.0.2.1", 53, "192.0.2.3", 4000)), 2.1))


def test_a_resync_dump_finds_pairs_once() -> None:
    d = detector()
    entries = [
        flow("192.0.2.3", 4000, "198.51.100.13", 53),
        flow("192.0.2.1", 53, "192.0.2.3", 4000),
        flow("192.0.2.3", 4001, "198.51.100.13", 53, status=IPS_SEEN_REPLY),
    ]
    first = d.resync(entries, 1.0)
    assert [(f.actual_source, new_) for f, new_ in first] == [("192.0.2.1:53", Change.NEW)]
    assert d.resync(entries, 2.0) == []
    # A bare dump is history: what was in the table, not what happened since.
    assert first[0][0].existing and d.history[first[0][0].key].count == 1
    assert d.feed(CtEvent(DUMPED, entries[1]), 2.5) is None


def test_memory_is_bounded_under_a_flood_of_unrelated_flows() -> None:
    d = WrongSourceDetector(max_flows=1000)
    for i in range(5000):
        d.feed(new(flow(f"203.0.113.{i % 250}", 1024 + i, "198.51.100.13", 53)), 1.0)
    assert d.pending == 1000
    assert d.stats.evicted == 4000 and d.stats.new_flows == 5000


# -- what is a request (QA P2.3): the server's own flows never are -----------------------
# Entries as `conntrack -L` showed them in the lab (host namespace), after
# `socat UDP4-RECVFROM:5000,fork EXEC:cat` answered clients of both addresses and
# `ctfix fix 5000 --method snat-zone --apply` was in place.
SNAT_ZONE_TABLE = [
    flow("192.0.2.3", 38683, "192.0.2.1", 5000, status=IPS_SEEN_REPLY),
    flow("192.0.2.1", 5000, "192.0.2.3", 50078, reply_dst="198.51.100.13", zone=51185),
    flow("192.0.2.3", 50106, "192.0.2.1", 5000, status=IPS_SEEN_REPLY),
    flow("192.0.2.3", 50078, "198.51.100.13", 5000),
    flow("192.0.2.1", 5000, "192.0.2.3", 51298, reply_dst="198.51.100.13", zone=51185),
    flow("192.0.2.3", 51298, "198.51.100.13", 5000),
]


def test_a_working_snat_zone_fix_reads_clean_whatever_the_dump_order() -> None:
    for shift in range(len(SNAT_ZONE_TABLE)):
        table = SNAT_ZONE_TABLE[shift:] + SNAT_ZONE_TABLE[:shift]
        for entries in (table, table[::-1]):
            d = WrongSourceDetector(local_addresses=LOCAL, track_answers=True)
            assert d.resync(entries, 1.0, complete=True) == []
            assert not d.findings
            # Both clients of the uplink address got their (zoned, rewritten) reply.
            assert d.answered == {("192.0.2.3", 50078): False, ("192.0.2.3", 51298): False}


def test_the_servers_own_wrong_source_flow_is_not_taken_for_a_request() -> None:
    # nc connect()ed to its first client keeps sending to it from the bridge address;
    # the client's request entry is gone. Then another client asks the bridge address.
    d = detector()
    d.feed(new(flow("192.0.2.1", 5001, "192.0.2.3", 45191)), 1.0)
    assert d.feed(new(flow("192.0.2.3", 57437, "192.0.2.1", 5001)), 1.1) is None
    assert not d.findings  # not "client 192.0.2.1:5001 ... (port mismatch)"
    # ...and that request is still pending: a wrong-source reply to it is reported.
    f = only(d.feed(new(flow("198.51.100.13", 5001, "192.0.2.3", 57437)), 1.2))
    assert (f.client, f.service, f.actual_source) == (
        "192.0.2.3:57437",
        "192.0.2.1:5001",
        "198.51.100.13:5001",
    )


def test_a_start_up_dump_pairs_no_server_flow_with_a_later_client() -> None:
    # What watch's first dump and explain saw for port 5001 (QA): a wrong-source reply
    # still in the table, the request it answered, and later clients of both addresses.
    entries = [
        flow("192.0.2.1", 5001, "192.0.2.3", 45191),
        flow("192.0.2.3", 57437, "192.0.2.1", 5001),
        flow("192.0.2.3", 45191, "198.51.100.13", 5001),
        flow("192.0.2.3", 40227, "192.0.2.1", 5001),
    ]
    for order in (entries, entries[::-1]):
        d = detector()
        found = d.resync(order, 1.0, complete=True)
        assert [(f.client, f.actual_source, f.mismatch) for f, _ in found] == [
            ("192.0.2.3:45191", "192.0.2.1:5001", "address")
        ]


def test_a_remote_client_of_a_dnat_to_a_non_local_address_is_still_a_request() -> None:
    # kube-proxy style: the service address is no address of the namespace.
    d = detector()
    vip = flow("192.0.2.3", 4000, "203.0.113.10", 53, reply_src="203.0.113.20")
    d.feed(new(vip), 1.0)
    f = only(d.feed(new(flow("203.0.113.21", 53, "192.0.2.3", 4000)), 1.1))
    assert (f.service, f.expected_source, f.local) == (
        "203.0.113.10:53",
        "203.0.113.20:53",
        False,
    )


def test_the_namespaces_own_clients_and_unnatted_forwarding_are_not_requests() -> None:
    d = detector()
    d.feed(new(flow("198.51.100.13", 6000, "203.0.113.53", 53)), 1.0)  # a local resolver
    d.feed(new(flow("192.0.2.3", 6001, "203.0.113.53", 53)), 1.0)  # routed through
    assert d.pending == 0
    # Without the addresses, every unreplied entry is a candidate (the pure rule).
    bare = WrongSourceDetector()
    bare.feed(new(flow("192.0.2.3", 6001, "203.0.113.53", 53)), 1.0)
    assert bare.pending == 1


# -- counts (QA P2.5) ---------------------------------------------------------------------


def test_two_clients_are_counted_as_two_and_one_client_twice_as_one() -> None:
    d = detector()
    for cport in (57589, 49785):
        d.feed(new(flow("192.0.2.3", cport, "198.51.100.13", 5000)), 1.0)
        d.feed(new(flow("192.0.2.1", 5000, "192.0.2.3", cport)), 1.1)
    [f] = d.findings.values()
    assert (f.count, f.clients, f.client) == (2, 2, "192.0.2.3:49785")
    d2 = detector()
    for ct_id in (1, 2):  # the same client port, its first entry expired in between
        d2.feed(new(flow("192.0.2.3", 57589, "198.51.100.13", 5000)), float(ct_id))
        reply = flow("192.0.2.1", 5000, "192.0.2.3", 57589)._replace(id=ct_id)
        d2.feed(new(reply), ct_id + 0.1)
    [g] = d2.findings.values()
    assert (g.count, g.clients) == (2, 1)
