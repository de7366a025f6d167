"""scan's pure parts: which sockets are services, each port's flows cut from one
dump exactly as explain's filtered dumps give them, worst-first order, the output."""

from __future__ import annotations

import io
import json
import socket

from ctfix.core.decode import CtEntry, CtTuple
from ctfix.core.model import Diagnosis, Listener, Reason, Verdict
from ctfix.core.scan import flows_for_port, index_flows, service_ports, worst_first
from ctfix.render.jsonout import document
from ctfix.render.scan import headline, render_text, scan_document

EPHEMERAL = (32768, 60999)


def udp(src: str, sport: int, dst: str, dport: int, *, rsrc: str = "", rsport: int = 0) -> CtEntry:
    orig = CtTuple(src, dst, sport, dport, 17, socket.AF_INET)
    reply = CtTuple(rsrc or dst, src, rsport or dport, sport, 17, socket.AF_INET)
    return CtEntry(orig, reply, timeout=30)


def test_services_are_unconnected_sockets_and_connected_ones_outside_the_ephemeral_range() -> None:
    sockets = [
        Listener("0.0.0.0", 53, "ipv4", "listening"),
        Listener("::", 53, "ipv6", "listening"),
        Listener("192.0.2.1", 5000, "ipv4", "connected", peer="192.0.2.3:4000"),  # netcat
        Listener("192.0.2.1", 40000, "ipv4", "connected", peer="192.0.2.3:53"),  # a client
        Listener("0.0.0.0", 45000, "ipv4", "listening"),  # unconnected: serves its port
    ]
    assert service_ports(sockets, EPHEMERAL) == [53, 5000, 45000]


def test_a_port_gets_the_entries_explain_would_dump_in_the_same_order() -> None:
    """explain asks the kernel for orig dport = P, then reply sport = P (DNAT'd from
    another port), then orig sport = P (answered from another port); the cut keeps
    each group's dump order and leaves other ports' entries out."""
    request = udp("192.0.2.3", 40000, "198.51.100.13", 53)
    dnat = udp("198.51.100.1", 40001, "198.51.100.13", 9053, rsrc="192.0.2.1", rsport=53)
    reply = udp("192.0.2.1", 53, "192.0.2.3", 40000)
    noise = udp("203.0.113.9", 1234, "198.51.100.13", 8080)
    forwarded = udp("192.0.2.1", 9053, "192.0.2.3", 1)
    dump = [reply, noise, dnat, request, forwarded]
    index = index_flows(dump, [53, 8080])
    assert flows_for_port(index, 53) == [request, dnat, reply]
    assert flows_for_port(index, 8080) == [noise]
    assert flows_for_port(index, 9053) == [forwarded]  # a forward target: orig sport


def diagnosis(port: int, verdict: Verdict, *codes: str) -> Diagnosis:
    reasons = tuple(Reason(code, f"{code} said. More.") for code in codes)
    return Diagnosis(port, "h", verdict, reasons)


def test_worst_first_and_the_headline_says_why() -> None:
    ok = diagnosis(53, "ok", "specific-bind")
    risk = diagnosis(5000, "at-risk", "wildcard-socket", "client-network-exposed")
    broken = diagnosis(6000, "broken", "wildcard-socket", "wrong-source-seen")
    ordered = worst_first([ok, risk, broken])
    assert [d.port for d in ordered] == [6000, 5000, 53]
    assert [h.code for h in map(headline, ordered) if h] == [
        "wrong-source-seen", "client-network-exposed", "specific-bind"
    ]
    text = render_text(ordered, "h")
    assert text.splitlines()[0].endswith(": 1 broken, 1 at risk, 1 ok")
    assert "wrong-source-seen: wrong-source-seen said." in text


def test_json_is_the_envelope_then_explains_object_per_port() -> None:
    ordered = worst_first([diagnosis(53, "ok", "specific-bind")])
    data = json.loads(document(scan_document(ordered, "h"), io.StringIO()))
    assert list(data)[:5] == ["schema", "generated", "host", "ctfix", "netns"]
    assert data["counts"] == {"broken": 0, "at-risk": 0, "unknown": 0, "ok": 1}
    [service] = data["services"]
    assert service["port"] == 53 and service["reasons"][0]["code"] == "specific-bind"


def test_a_dump_read_for_some_ports_keeps_exactly_their_entries() -> None:
    """scan reads the whole table once but builds only the entries that touch its
    ports (orig sport, orig dport or reply sport), deciding on the bytes."""
    import pathlib

    from ctfix.core import decode

    fixtures = pathlib.Path(__file__).parent / "fixtures" / "ctnetlink_messages.json"
    dumps = [r for r in json.loads(fixtures.read_text()) if r["source"] == "dump"]
    kept_some = False
    for record in dumps:
        raw = bytes.fromhex(record["hex"])
        every = [e.entry for e in decode.decode(raw).events]
        for entry in every:
            wanted = frozenset({entry.reply.sport})
            kept = [e.entry for e in decode.decode(raw, ports=wanted).events]
            assert kept == [
                e for e in every
                if wanted & {e.orig.sport, e.orig.dport, e.reply.sport}
            ]
            kept_some = kept_some or len(kept) < len(every)
        assert decode.decode(raw, ports=frozenset({1})).events == []
    assert kept_some or not dumps
