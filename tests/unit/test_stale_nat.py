"""The stale-nat detector, its decode helpers, the flush-stale plan and explain's verdict,
on hand-built entries and rules (no kernel)."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest

from ctfix.core import ctnetlink, decode
from ctfix.core.ctrequest import tuple_attrs
from ctfix.core.decode import IPS_ASSURED, IPS_DST_NAT, IPS_SRC_NAT, CtEntry, CtTuple, CtUsage
from ctfix.core.detectors import Change, Detector, one_feed
from ctfix.core.detectors.stale_nat import StaleNatDetector, judge
from ctfix.core.detectors.wrong_source import WrongSourceDetector
from ctfix.core.diagnosis import diagnose
from ctfix.core.model import Diagnosis
from ctfix.core.nat import Evaluator, NatRuleset
from ctfix.core.nat.nft_json import nat_chains
from ctfix.core.plan import make_plan, plan_to_dict, step_from_dict, step_to_dict
from ctfix.core.snapshot import LocalAddress, Snapshot
from ctfix.errors import CtfixError

SERVICE = "198.51.100.13"
A, B, C = "198.51.100.21", "198.51.100.22", "198.51.100.30"
CONFIRMED = 1 << 3


def _rules(port_targets: dict[int, str]) -> NatRuleset:
    """`ip daddr SERVICE udp dport P dnat to T` for each port."""
    objects: list[dict[str, object]] = [
        {"chain": {"family": "ip", "table": "svc", "name": "pre", "type": "nat",
                   "hook": "prerouting", "prio": -100, "policy": "accept"}},
    ]
    for handle, (port, target) in enumerate(port_targets.items(), 2):
        objects.append({"rule": {"family": "ip", "table": "svc", "chain": "pre",
                                 "handle": handle, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": SERVICE}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                       "right": port}},
            {"dnat": {"addr": target}}]}})
    return NatRuleset(tuple(nat_chains(objects, {("ip", "svc", "pre", 2): "rule text"})))


def _entry(client: str, sport: int, dport: int, target: str | None, *, id: int = 1,
           timeout: int = 29, status: int = CONFIRMED) -> CtEntry:
    """A client's entry to SERVICE:dport, DNAT'd to target (None: not NAT'd), its
    reply masqueraded to the service address as the lab does."""
    orig = CtTuple(client, SERVICE, sport, dport, 17, socket.AF_INET)
    if target is None:
        reply = CtTuple(SERVICE, client, dport, sport, 17, socket.AF_INET)
    else:
        reply = CtTuple(target, SERVICE, dport, sport, 17, socket.AF_INET)
        status |= IPS_DST_NAT | IPS_SRC_NAT
    return CtEntry(orig, reply, status=status, timeout=timeout, id=id)


def _evaluator(ports: dict[int, str]) -> Evaluator:
    return Evaluator(_rules(ports), [SERVICE, "192.0.2.1"])


def test_an_entry_still_sent_to_the_old_target_is_stale() -> None:
    stale = _entry("192.0.2.3", 40514, 5140, A, id=7, timeout=28)
    result = judge([stale], _evaluator({5140: B}), now=1000.0,
                   usage={7: CtUsage(start=int(700e9), orig_packets=3000)})
    [one] = result.stale
    assert (one.service, one.target, one.current, one.why) == (
        "198.51.100.13:5140", "198.51.100.21:5140", ("198.51.100.22:5140",), "rule-changed")
    assert one.client == "192.0.2.3:40514" and one.entry is stale
    assert (one.age, one.idle, one.packets) == (300.0, 2.0, 3000)
    assert one.rules == ("rule text",)


def test_no_false_positive_for_the_same_target_or_an_unchanged_port() -> None:
    entries = [
        _entry("192.0.2.3", 40514, 5140, B),  # goes where the rule says
        _entry("192.0.2.4", 40514, 5141, C),  # another forwarded port, its rule unchanged
        _entry("192.0.2.5", 40514, 9999, None),  # a port nothing forwards, never NAT'd
    ]
    result = judge(entries, _evaluator({5140: B, 5141: C}), now=0.0)
    assert result.stale == ()
    assert result.judged == 2  # the unforwarded, un-NAT'd entry is not even asked about


def test_no_longer_forwarded_and_never_natted() -> None:
    ev = _evaluator({5142: B})
    removed = _entry("192.0.2.3", 40514, 5140, A)  # its rule is gone
    before = _entry("192.0.2.3", 40515, 5142, None)  # made before the DNAT existed
    result = judge([removed, before], ev, now=0.0)
    assert {(s.service, s.target, s.why, s.current) for s in result.stale} == {
        ("198.51.100.13:5140", "198.51.100.21:5140", "no-longer-forwarded", ()),
        ("198.51.100.13:5142", "198.51.100.13:5142", "never-natted", ("198.51.100.22:5142",)),
    }


def test_a_rewritten_reply_without_the_dnat_status_is_not_netfilters_to_judge() -> None:
    ipvs = _entry("192.0.2.3", 40514, 5140, A)._replace(status=CONFIRMED)
    assert judge([ipvs], _evaluator({5140: B}), now=0.0).stale == ()


def test_rules_it_cannot_follow_mean_not_judged() -> None:
    broken = Evaluator(NatRuleset((), ("iptables-legacy ipv4: cannot read",)), [SERVICE])
    result = judge([_entry("192.0.2.3", 40514, 5140, A)], broken, now=0.0)
    assert result.stale == ()
    assert [u.why for u in result.undecided] == ["iptables-legacy ipv4: cannot read"]


def test_idle_from_the_timeout_of_an_assured_entry() -> None:
    assured = _entry("192.0.2.3", 40514, 5140, A, timeout=100, status=CONFIRMED | IPS_ASSURED)
    [one] = judge([assured], _evaluator({5140: B}), now=0.0, stream_timeout=120).stale
    assert one.idle == 20.0


def test_findings_count_clients_and_come_back_after_a_flush() -> None:
    detector = StaleNatDetector()
    detector.set_rules(_rules({5140: B}), [SERVICE])
    entries = [_entry("192.0.2.3", 40514, 5140, A, id=1), _entry("192.0.2.4", 40514, 5140, A, id=2),
               _entry("192.0.2.4", 40515, 5140, A, id=3)]
    [(finding, change)] = detector.check(entries, 10.0)
    assert change == Change.NEW and not finding.existing
    assert (finding.key, finding.clients, finding.entries) == (
        ("198.51.100.13:5140", "198.51.100.21:5140"), 3, 3)
    [(again, change)] = detector.check(entries[:1], 11.0, ports={5140})
    assert change == Change.COUNTED and again.clients == 1 and again.first_seen == 10.0
    assert detector.check([], 12.0, ports={5140}) == []  # flushed: not active any more
    assert detector.active == []
    [(back, change)] = detector.check(entries[:1], 13.0, ports={5140})
    assert change == Change.NEW
    assert list(detector.found) == [back]


def test_a_check_of_other_ports_keeps_a_finding_active() -> None:
    detector = StaleNatDetector()
    detector.set_rules(_rules({5140: B, 5141: C}), [SERVICE])
    detector.check([_entry("192.0.2.3", 40514, 5140, A)], 1.0)
    detector.check([], 2.0, ports={5141})
    assert [f.service for f in detector.active] == ["198.51.100.13:5140"]


def test_examine_marks_existing_and_feed_costs_nothing_in_watch() -> None:
    detector = StaleNatDetector()
    detector.set_rules(_rules({5140: B}), [SERVICE])
    [(finding, _)] = detector.examine([_entry("192.0.2.3", 40514, 5140, A)], 1.0, complete=True)
    assert finding.existing
    wrong = WrongSourceDetector()
    detectors: list[Detector[Any]] = [wrong, detector]
    assert one_feed(detectors, lambda found: None) == wrong.feed


# -- decode: usage, and the delete request ---------------------------------------------


def _nla(kind: int, payload: bytes) -> bytes:
    return decode.nla(kind, payload)


def _dumped(entry: CtEntry, *extra: bytes) -> bytes:
    """A dump's message for the entry (as the kernel sends it), with extra attributes."""
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    body += tuple_attrs(decode.CTA_TUPLE_ORIG, entry.orig)
    body += tuple_attrs(decode.CTA_TUPLE_REPLY, entry.reply)
    body += _nla(decode.CTA_ID, struct.pack(">I", entry.id or 0)) + b"".join(extra)
    return struct.pack("=IHHII", 16 + len(body), decode.MSG_CT_NEW, decode.NLM_F_MULTI, 1, 0) + body


def _read_tuple(nest: bytes) -> CtTuple | None:
    """The tuple a CTA_TUPLE_* nest's payload names, as the decoder reads it (in a
    message that gives it as both tuples)."""
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    body += _nla(decode.CTA_TUPLE_ORIG | decode.NLA_F_NESTED, nest)
    body += _nla(decode.CTA_TUPLE_REPLY | decode.NLA_F_NESTED, nest)
    header = struct.pack("=IHHII", 16 + len(body), decode.MSG_CT_NEW, decode.NLM_F_MULTI, 1, 0)
    entry = decode.decode_entry(header + body)
    return None if entry is None else entry.orig


def test_usage_is_read_only_when_asked() -> None:
    entry = _entry("192.0.2.3", 40514, 5140, A, id=99)
    message = _dumped(
        entry,
        _nla(decode.CTA_TIMESTAMP | decode.NLA_F_NESTED, _nla(1, struct.pack(">Q", 123456789))),
        _nla(decode.CTA_COUNTERS_ORIG | decode.NLA_F_NESTED,
             _nla(1, struct.pack(">Q", 42)) + _nla(2, struct.pack(">Q", 1234))),
    )
    plain = decode.decode(message)
    assert plain.usage is None and plain.events[0].entry.id == 99
    asked = decode.decode(message, usage=True)
    assert asked.events == plain.events
    assert asked.usage == [CtUsage(123456789, 42, 1234, None, None)]
    assert decode.decode(_dumped(entry), usage=True).usage == [CtUsage()]


def test_a_delete_request_always_names_the_tuple_and_the_id() -> None:
    entry = _entry("192.0.2.3", 40514, 5140, A, id=4242)._replace(zone=7)
    request = decode.delete_request(entry, seq=5)
    length, msg_type, flags, seq, _pid = struct.unpack_from("=IHHII", request)
    assert (length, msg_type, seq) == (len(request), decode.MSG_CT_DELETE, 5)
    assert flags & decode.NLM_F_ACK
    attrs = {kind: (start, end) for kind, start, end in ctnetlink.attrs(request, 20, length)}
    assert _read_tuple(request[slice(*attrs[decode.CTA_TUPLE_ORIG])]) == entry.orig
    assert request[slice(*attrs[decode.CTA_ID])] == struct.pack(">I", 4242)
    assert request[slice(*attrs[decode.CTA_ZONE])][:2] == struct.pack(">H", 7)
    # The read before the delete: the same tuple, no id (whatever entry holds it now).
    get = decode.get_request(entry, seq=4)
    assert struct.unpack_from("=IHH", get)[1] == (decode.NFNL_SUBSYS_CTNETLINK << 8) | 1
    kinds = {kind for kind, _s, _e in ctnetlink.attrs(get, 20, len(get))}
    assert decode.CTA_TUPLE_ORIG in kinds and decode.CTA_ID not in kinds
    # Without a known id, it still names the tuple (never a flush).
    bare = decode.delete_request(entry._replace(id=None))
    kinds = {kind for kind, _s, _e in ctnetlink.attrs(bare, 20, len(bare))}
    assert decode.CTA_TUPLE_ORIG in kinds and decode.CTA_ID not in kinds


# -- the plan --------------------------------------------------------------------------


def _diagnosis_with(entries: list[CtEntry]) -> Diagnosis:
    stale = judge(entries, _evaluator({5140: B}), now=0.0).stale
    return Diagnosis(5140, "lab", "broken", (), stale_entries=stale)


def test_flush_stale_lists_exactly_the_stale_entries() -> None:
    entries = [_entry("192.0.2.3", 40514, 5140, A, id=11),
               _entry("192.0.2.4", 40514, 5140, B, id=12)]
    plan = make_plan(_diagnosis_with(entries), "flush-stale")
    assert plan.reversible is False and plan.backend == "ctnetlink"
    [step] = plan.steps
    spec = step.spec
    assert (spec.kind, spec.src, spec.sport, spec.reply_src, spec.id) == (  # type: ignore[union-attr]
        "conntrack-entry", "192.0.2.3", 40514, A, 11)
    assert spec.current == ("198.51.100.22:5140",)  # type: ignore[union-attr]
    assert step.undo == () and "--reply-src 198.51.100.21" in step.commands[0]
    assert step_from_dict(step_to_dict(step)) == step
    assert plan_to_dict(plan)["reversible"] is False


def test_flush_stale_refuses_a_port_without_stale_entries() -> None:
    with pytest.raises(CtfixError, match="no stale NAT entries"):
        make_plan(_diagnosis_with([_entry("192.0.2.4", 40514, 5140, B)]), "flush-stale",
                  force=True)


# -- explain -------------------------------------------------------------------------------


def _snapshot(entries: list[CtEntry], rules: NatRuleset) -> Snapshot:
    return Snapshot(
        port=5140,
        netns="lab",
        addresses=(LocalAddress("eth0", SERVICE, 24, "ipv4"),),
        flows=tuple(entries),
        nat_rules=rules,
        taken_at=100.0,
    )


def test_explain_says_broken_with_the_old_and_current_targets() -> None:
    diagnosis = diagnose(_snapshot([_entry("192.0.2.3", 40514, 5140, A)], _rules({5140: B})))
    assert diagnosis.verdict == "broken"
    assert "stale-nat" in [r.code for r in diagnosis.reasons]
    [finding] = diagnosis.stale_nat
    assert (finding.stale_target, finding.current_targets) == (
        "198.51.100.21:5140", ("198.51.100.22:5140",))
    assert diagnosis.fixes[0].method == "flush-stale"
    # The same entry, the rule unchanged: nothing stale.
    fine = diagnose(_snapshot([_entry("192.0.2.3", 40514, 5140, A)], _rules({5140: A})))
    assert fine.stale_nat == () and "stale-nat" not in [r.code for r in fine.reasons]


def test_explain_says_when_it_could_not_judge() -> None:
    unreadable = NatRuleset((), ("nftables: libnftables is not installed",))
    diagnosis = diagnose(_snapshot([_entry("192.0.2.3", 40514, 5140, A)], unreadable))
    codes = [r.code for r in diagnosis.reasons]
    assert "stale-nat-not-judged" in codes and "stale-nat" not in codes
    assert diagnosis.stale_entries == ()


def test_a_fixed_port_sender_is_not_a_wrong_source_reply_to_itself() -> None:
    """syslog from port 5140 to 5140, masqueraded to the service's own address: its
    entry's reply goes to SERVICE:5140, the address and port it sends to. Neither that
    entry (in a dump) nor the client's next one (after a flush) is a reply."""
    pinned = _entry("192.0.2.3", 5140, 5140, A, id=1)
    again = _entry("192.0.2.3", 5140, 5140, B, id=2)
    detector = WrongSourceDetector(local_addresses=frozenset({SERVICE, "192.0.2.1"}))
    assert detector.examine([pinned], now=0.0) == []
    assert detector.feed(decode.CtEvent(decode.NEW, again), 1.0) is None
    assert detector.findings == {}


def test_a_port_forwarded_to_a_backend_elsewhere_is_not_an_outage() -> None:
    """No socket on 5140 is right when the rules send its clients elsewhere: not
    `nothing-answers`, even while the pinned sender's requests go unanswered."""
    diagnosis = diagnose(_snapshot([_entry("192.0.2.3", 40514, 5140, A)], _rules({5140: B})))
    codes = [r.code for r in diagnosis.reasons]
    assert "forwarded-to-backend" in codes and "nothing-answers" not in codes
    assert diagnosis.service_down is False


def test_never_natted_behind_an_interface_match_rests_on_the_route_to_the_client() -> None:
    """Docker's rule: `iifname != "docker0" udp dport 5140 dnat to B`. Conntrack does
    not record the input interface: only the route to the client can stand in for it,
    and only for an entry that was never DNAT'd."""
    objects: list[dict[str, object]] = [
        {"chain": {"family": "ip", "table": "nat", "name": "pre", "type": "nat",
                   "hook": "prerouting", "prio": -100, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "nat", "chain": "pre", "handle": 2, "expr": [
            {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                       "right": 5140}},
            {"dnat": {"addr": B}}]}},
    ]
    ev = Evaluator(NatRuleset(tuple(nat_chains(objects))), [SERVICE])
    before = _entry("192.0.2.3", 40514, 5140, None)
    assert judge([before], ev, now=0.0).stale == ()  # not knowing: both ways
    [one] = judge([before], ev, now=0.0, interface_of=lambda client: "eth0").stale
    assert (one.why, one.arrival, one.current) == ("never-natted", "eth0", (f"{B}:5140",))
    assert judge([before], ev, now=0.0, interface_of=lambda client: "docker0").stale == ()
    # A DNAT'd entry is never judged by a guessed interface.
    moved = _entry("192.0.2.3", 40515, 5140, A)
    assert judge([moved], ev, now=0.0, interface_of=lambda client: "docker0").stale[0].why == (
        "rule-changed")
