"""scan's summary of requests to ports with nothing bound (ctfix.core.unbound): what is
counted, the cap, the decoder that lets them through a dump read for a few ports, and
the section in scan's output."""

from __future__ import annotations

import json
import pathlib
import socket
import struct

from ctfix.core import decode
from ctfix.core.decode import IPS_SEEN_REPLY, CtEntry, CtTuple
from ctfix.core.unbound import LIMIT, UnboundTally
from ctfix.platform.rules_files import load
from ctfix.render.scan import render_markdown, render_text, scan_document

KB = load(builtin=True)
HOST, OTHER = "198.51.100.13", "192.0.2.1"
LOCAL = {HOST, OTHER, "127.0.0.1", "2001:db8:2::13"}


def udp(
    src: str, sport: int, dst: str, dport: int, *, replied: bool = False, rsrc: str = ""
) -> CtEntry:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    orig = CtTuple(src, dst, sport, dport, 17, family)
    reply = CtTuple(rsrc or dst, src, dport, sport, 17, family)
    return CtEntry(orig, reply, IPS_SEEN_REPLY if replied else 0, timeout=30)


def tally(
    entries: list[CtEntry], bound: tuple[int, ...] = (), listed: tuple[int, ...] = ()
) -> UnboundTally:
    found = UnboundTally()
    found.begin(LOCAL, bound, listed)
    assert list(found.tee(entries, frozenset(listed))) == [
        e for e in entries if e.orig.dport in listed or e.orig.sport in listed
    ]
    return found


def test_each_address_and_port_counts_its_unreplied_requests_and_client_hosts() -> None:
    entries = [
        udp("203.0.113.1", 40000, HOST, 7001),
        udp("203.0.113.1", 40001, HOST, 7001),  # the same host again: one client
        udp("203.0.113.2", 40000, HOST, 7001),
        udp("203.0.113.3", 40000, OTHER, 7001),  # another address: a service of its own
        udp("2001:db8:9::1", 40000, "2001:db8:2::13", 7001),
    ]
    summary = tally(entries).summary(KB)
    assert [(u.family, u.service, u.flows, u.clients) for u in summary.services] == [
        ("ipv4", f"{HOST}:7001", 3, 2),
        ("ipv4", f"{OTHER}:7001", 1, 1),
        ("ipv6", "[2001:db8:2::13]:7001", 1, 1),
    ]
    assert (summary.more, summary.error) == (0, None)


def test_what_is_not_a_request_to_a_port_with_nothing_bound_is_left_out() -> None:
    entries = [
        udp("203.0.113.1", 40000, HOST, 53),  # a socket is bound to 53
        udp("203.0.113.1", 40000, HOST, 5000),  # scan lists 5000 (a DNAT forwards it)
        udp("203.0.113.1", 40000, HOST, 7002, replied=True),  # it was answered
        udp("203.0.113.1", 40000, HOST, 7003, rsrc="192.0.2.9"),  # DNAT'd elsewhere
        udp(HOST, 40000, "203.0.113.1", 7004),  # this host's own flow out
        udp("203.0.113.1", 40000, "203.0.113.200", 7005),  # forwarded through
        udp("127.0.0.1", 40000, "127.0.0.1", 7006),  # from this host
        udp("203.0.113.1", 40000, HOST, 514),  # syslog: one-way, expected
        udp("203.0.113.1", 40000, HOST, 7007),  # the one that counts
    ]
    summary = tally(entries, bound=(53,), listed=(5000,)).summary(KB)
    assert [u.service for u in summary.services] == [f"{HOST}:7007"]
    # Without the knowledge base, port 514 is a port like any other.
    assert [u.service for u in tally(entries, (53,), (5000,)).summary(None).services] == [
        f"{HOST}:514",
        f"{HOST}:7007",
    ]


def test_at_most_the_limit_is_listed_worst_first_and_the_rest_counted() -> None:
    entries = [
        udp(f"203.0.113.{client}", 40000 + n, HOST, 8000 + port)
        for port in range(LIMIT + 3)
        for n in range(port + 1)  # port 8000+i gets i+1 requests
        for client in (1 + n % 2,)
    ]
    summary = tally(entries).summary(KB)
    assert len(summary.services) == LIMIT and summary.more == 3
    assert [u.flows for u in summary.services] == list(range(LIMIT + 3, 3, -1))
    assert summary.services[0].service == f"{HOST}:{8000 + LIMIT + 2}"
    assert summary.services[0].clients == 2
    assert summary.services[-1].flows == 4
    small = tally(entries).summary(KB, limit=2)
    assert (len(small.services), small.more) == (2, LIMIT + 1)


def test_a_dump_that_failed_says_so_instead_of_counting() -> None:
    found = tally([udp("203.0.113.1", 40000, HOST, 7001)])
    found.error = "reading the conntrack table: permission denied"
    summary = found.summary(KB)
    assert summary.services == () and summary.error == found.error


def _set_seen_reply(raw: bytes, entry: CtEntry) -> bytes:
    """The message with this entry's CTA_STATUS changed to say it saw a reply."""
    header = struct.pack("=HH", 8, decode.CTA_STATUS)
    old = header + struct.pack(">I", entry.status)
    new = header + struct.pack(">I", entry.status | IPS_SEEN_REPLY)
    assert old in raw
    return raw.replace(old, new, 1)


def _raw(raw: bytes) -> tuple[list[CtEntry], list[tuple[int, bytes, bytes, int]]]:
    """What a dump read for port 1 alone builds, and what it hands the unreplied sink."""
    handed: list[tuple[int, bytes, bytes, int]] = []

    def sink(family: int, src: bytes, dst: bytes, dport: int) -> None:
        handed.append((family, src, dst, dport))

    built = [e.entry for e in decode.decode(raw, ports=frozenset({1}), unreplied=sink).events]
    return built, handed


def _key(entry: CtEntry) -> tuple[int, bytes, bytes, int]:
    orig = entry.orig
    return (
        orig.family,
        socket.inet_pton(orig.family, orig.src),
        socket.inet_pton(orig.family, orig.dst),
        orig.dport,
    )


def test_a_dump_read_for_some_ports_hands_its_unreplied_entries_to_the_count() -> None:
    """scan's one dump builds the entries that touch its ports; the others that never
    saw a reply go to the count as raw values, decided on the bytes: no entry built."""
    fixtures = pathlib.Path(__file__).parent / "fixtures" / "ctnetlink_messages.json"
    dumps = [r for r in json.loads(fixtures.read_text()) if r["source"] == "dump"]
    checked = False
    for record in dumps:
        raw = bytes.fromhex(record["hex"])
        every = [e.entry for e in decode.decode(raw).events]
        if not every:
            continue
        assert not any(e.seen_reply for e in every)
        assert _raw(raw) == ([], [_key(e) for e in every])
        answered = _set_seen_reply(raw, every[0])
        again = [e.entry for e in decode.decode(answered).events]
        assert again[0].seen_reply and again[1:] == every[1:]
        assert _raw(answered) == ([], [_key(e) for e in every[1:]])
        checked = True
    assert checked


def test_the_raw_count_and_the_built_count_agree() -> None:
    entries = [
        udp("203.0.113.1", 40000, HOST, 7001),
        udp("203.0.113.2", 40000, HOST, 7001),
        udp("2001:db8:9::1", 40000, "2001:db8:2::13", 7002),
        udp("203.0.113.1", 40000, HOST, 53),  # bound
    ]
    raw = UnboundTally()
    raw.begin(LOCAL, (53,), ())
    for entry in entries:
        raw.count_raw(*_key(entry))
    assert raw.summary(KB) == tally(entries, bound=(53,)).summary(KB)


def test_scan_shows_the_section_in_each_format_without_changing_its_counts() -> None:
    entries = [udp("203.0.113.1", 40000 + n, HOST, 9000 + n % 12) for n in range(30)]
    summary = tally(entries).summary(KB)
    document = scan_document([], "lab", summary)
    assert document["counts"] == {"broken": 0, "at-risk": 0, "unknown": 0, "ok": 0}
    assert document["services"] == []
    assert len(document["unbound"]) == LIMIT and document["unbound_more"] == 2
    assert document["unbound"][0] == {
        "service": f"{HOST}:9000", "family": "ipv4", "flows": 3, "clients": 1
    }
    assert document["unbound_error"] is None
    text = render_text([], "lab", unbound=summary)
    assert f"{HOST}:9000" in text and "and 2 more" in text
    assert f"| `{HOST}:9000` | ipv4 | 3 | 1 |" in render_markdown([], "lab", summary)
    # Nothing counted: nothing said in text, empty keys in JSON.
    empty = tally([]).summary(KB)
    assert render_text([], "lab", unbound=empty) == render_text([], "lab")
    assert scan_document([], "lab", empty)["unbound"] == []


def test_scan_all_netns_gives_each_namespace_its_own_section_and_keys() -> None:
    from ctfix.core.netns_scan import NamespaceScan
    from ctfix.render import scan_all

    busy = tally([udp("203.0.113.1", 40000, HOST, 7001)]).summary(KB)
    scans = [
        NamespaceScan("web", "container:web", "container", 7, unbound=busy),
        NamespaceScan("host", "/proc/1/ns/net", "host", 1, unbound=tally([]).summary(KB)),
    ]
    document = scan_all.scan_document(scans)
    keys = {n["netns"]: (n["unbound"], n["unbound_more"]) for n in document["namespaces"]}
    assert keys == {
        "web": ([{"service": f"{HOST}:7001", "family": "ipv4", "flows": 1, "clients": 1}], 0),
        "host": ([], 0),
    }
    assert document["counts"] == {"broken": 0, "at-risk": 0, "unknown": 0, "ok": 0}
    text = scan_all.render_text(scans)
    assert "namespace web:" in text and f"{HOST}:7001" in text and "namespace host:" not in text
    assert f"| `web` | `{HOST}:7001` | ipv4 | 1 | 1 |" in scan_all.render_markdown(scans)
