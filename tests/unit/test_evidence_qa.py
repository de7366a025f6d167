"""QA round 4 (issues 8, 12) in pure code: hand-built snapshots, no kernel."""

from __future__ import annotations

from ctfix.core import scan
from ctfix.core.decode import CtEntry
from ctfix.core.diagnosis import diagnose
from ctfix.core.plan import make_plan
from ctfix.render.explain import render_text, to_json_obj
from tests.unit.test_diagnose import (
    BRIDGE,
    CLIENT,
    NC,
    PORT,
    UPLINK,
    reply_from,
    request,
    snapshot,
    udp,
)

LOCAL = {BRIDGE, UPLINK}


def test_a_server_gone_after_a_wrong_source_reply_is_broken_and_says_it_is_gone() -> None:
    """F14: the headline of a broken port with nothing bound any more does not say
    "(no wrong-source replies)"."""
    flows = (request(UPLINK), reply_from(BRIDGE))
    d = diagnose(snapshot(flows=flows))
    assert (d.verdict, d.service_down) == ("broken", True)
    headline = render_text(d).splitlines()[0]
    assert "no wrong-source replies" not in headline
    assert to_json_obj(d)["evidence"]["unanswered"] == 1


def test_scan_looks_for_gone_servers_among_the_hosts_unreplied_flows() -> None:
    """F14: a wrong-source reply's port is a candidate; the host's own client flows
    (an ephemeral source port), the fix's zoned replies and known ports are not."""
    wrong = reply_from(BRIDGE)  # 192.0.2.1:PORT -> client, unreplied
    client = CtEntry(udp(UPLINK, "203.0.113.9", 40000, 53), udp("203.0.113.9", UPLINK, 53, 40000))
    zoned = CtEntry(udp(BRIDGE, CLIENT, 6200, 5), udp(CLIENT, UPLINK, 5, 6200), zone=51185)
    low = CtEntry(udp(BRIDGE, CLIENT, 6100, 7), udp(CLIENT, BRIDGE, 7, 6100))
    flows = [wrong, client, zoned, low]
    assert scan.gone_server_ports(flows, [], LOCAL, (32768, 60999)) == [6100]
    assert scan.gone_server_ports(flows, [], LOCAL, (40000, 50000)) == [6100, PORT]
    assert scan.gone_server_ports(flows, [6100], LOCAL, (40000, 50000)) == [PORT]
    assert scan.answered_wrongly([request(UPLINK), wrong], LOCAL)
    assert not scan.answered_wrongly([request(BRIDGE), wrong], LOCAL)


def test_replies_rewritten_in_ctfix_zones_are_the_fixs_and_leave_something_to_fix() -> None:
    """F4: after a revert, the zone entry of a reply the fix rewrote is no evidence of
    the server choosing its source: at risk, and policy-route still has a network to
    route (it refused with "nothing to route" when the fix's answer counted)."""
    zoned = CtEntry(udp(BRIDGE, CLIENT, PORT, 5), udp(CLIENT, UPLINK, 5, PORT), zone=51185)
    d = diagnose(snapshot(NC, flows=(request(UPLINK, cport=5), zoned)))
    codes = [r.code for r in d.reasons]
    assert "answered-through-fix" in codes and "observed-right-source" not in codes
    assert d.verdict == "at-risk"
    assert (d.evidence.healthy, d.evidence.through_fix, d.evidence.unanswered) == (1, 1, 0)
    plan = make_plan(d, "policy-route", force=True)
    assert plan.steps
