"""diagnose() on hand-built snapshots: the verdicts, the client networks, the rules."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from ctfix.core import rules as kb_rules
from ctfix.core.decode import IPS_SEEN_REPLY, CtEntry, CtTuple
from ctfix.core.diagnosis import (
    PROBLEM_DNAT_REPLY,
    PROBLEM_NOTRACK,
    PROBLEM_SNAT_REPLY,
    PROBLEM_ZONE_ALONE,
    diagnose,
    probe_destinations,
)
from ctfix.core.model import Diagnosis, Listener, NetfilterBackend
from ctfix.core.snapshot import LocalAddress, NetfilterRule, PolicyRule, RouteChoice, Snapshot
from ctfix.platform import rules_files as rules
from ctfix.render.explain import render_text, to_json_obj

PORT = 56789
BRIDGE, UPLINK, CLIENT = "192.0.2.1", "198.51.100.13", "192.0.2.3"
ADDRESSES = (
    LocalAddress("lo", "127.0.0.1", 8, "ipv4", "host"),
    LocalAddress("br0", BRIDGE, 24, "ipv4"),
    LocalAddress("eth0", UPLINK, 24, "ipv4"),
    LocalAddress("br0", "fe80::1", 64, "ipv6", "link"),
)
NC = Listener(
    "0.0.0.0", PORT, "ipv4", "listening", pid=42, process="nc", cmdline=("nc", "-ul", "56789")
)


def udp(src: str, dst: str, sport: int, dport: int) -> CtTuple:
    return CtTuple(src, dst, sport, dport, 17, socket.AF_INET)


def request(
    addressed: str, client: str = CLIENT, cport: int = 40000, replied: bool = False
) -> CtEntry:
    return CtEntry(
        udp(client, addressed, cport, PORT),
        udp(addressed, client, PORT, cport),
        status=IPS_SEEN_REPLY if replied else 0,
    )


def reply_from(source: str, client: str = CLIENT, cport: int = 40000) -> CtEntry:
    """The entry a wildcard server's wrong-source reply creates."""
    return CtEntry(udp(source, client, PORT, cport), udp(client, source, cport, PORT))


def snapshot(*listeners: Listener, flows: tuple[CtEntry, ...] = (), **kw: object) -> Snapshot:
    probes = probe_destinations(PORT, ADDRESSES, flows)

    # The kernel's choice in the lab: the address on the interface toward the client.
    def source(dest: str) -> str:
        return BRIDGE if dest.startswith("192.0.2.") else UPLINK

    choices = tuple(
        RouteChoice(d, source(d), "br0" if source(d) == BRIDGE else "eth0", 254)
        for d in probes.values()
    )
    base = Snapshot(
        port=PORT,
        netns="test",
        listeners=listeners,
        addresses=ADDRESSES,
        route_choices=choices,
        flows=flows,
        probes=probes,
    )
    # Tests pass any Snapshot field by name; replace() checks the names at run time.
    return replace(base, **kw)  # type: ignore[arg-type]


def codes(d: Diagnosis) -> list[str]:
    """The reason codes, in order: what tests (and scripts) branch on."""
    return [r.code for r in d.reasons]


def said(d: Diagnosis, code: str) -> str:
    """The text of the one reason with this code (it must be there, once)."""
    [text] = [r.text for r in d.reasons if r.code == code]
    return text


def network(diagnosis_clients: object, cidr: str) -> object:
    # Any iterable of ClientNetwork (a tuple, a list) serves; typed loosely for tests.
    return next(cn for cn in diagnosis_clients if cn.network == cidr)  # type: ignore[attr-defined]


def test_wildcard_without_traffic_is_at_risk_for_each_connected_network() -> None:
    d = diagnose(snapshot(NC))
    assert d.verdict == "at-risk"
    nets = {cn.network: cn for cn in d.clients}
    assert set(nets) == {"192.0.2.0/24", "198.51.100.0/24"}  # not loopback, not fe80::
    bridge_net = nets["192.0.2.0/24"]
    assert bridge_net.predicted_source == BRIDGE and not bridge_net.ok and not bridge_net.seen
    assert set(bridge_net.addressed) == {BRIDGE, UPLINK}
    assert bridge_net.interface == "br0"
    assert codes(d) == ["wildcard-socket", "client-network-exposed", "client-network-exposed"]
    methods = [f.method for f in d.fixes]
    assert methods.count("snat-zone") == 1 and "pktinfo" in methods
    policy = next(f for f in d.fixes if f.method == "policy-route")
    assert not policy.recommended  # which address clients use is unknown


def test_wrong_source_pair_in_conntrack_is_broken() -> None:
    flows = (request(UPLINK), reply_from(BRIDGE))
    d = diagnose(snapshot(NC, flows=flows))
    assert d.verdict == "broken"
    [wrong] = d.evidence.wrong_source
    assert (wrong.service, wrong.actual_source) == (f"{UPLINK}:{PORT}", f"{BRIDGE}:{PORT}")
    assert wrong.client == f"{CLIENT}:40000" and wrong.mismatch == "address"
    [cn] = d.clients  # only the network seen in conntrack
    assert (cn.network, cn.addressed, cn.seen, cn.ok) == ("192.0.2.0/24", (UPLINK,), True, False)


def test_clients_seen_using_the_uplink_only_may_still_use_their_gateway() -> None:
    """The QA case: the bridge clients' flows had expired, only the uplink was seen.
    policy-route would break the clients of 192.0.2.1 (their gateway): not recommended,
    said as a condition; snat-zone is."""
    d = diagnose(snapshot(NC, flows=(request(UPLINK),)))
    assert d.verdict == "at-risk"
    [cn] = d.clients
    assert (cn.addressed, cn.onlink, cn.seen) == ((UPLINK,), (BRIDGE,), True)
    policy = next(f for f in d.fixes if f.method == "policy-route")
    assert not policy.recommended
    assert policy.summary.startswith("Only if clients in 192.0.2.0/24 never address 192.0.2.1:")
    assert "--force" in policy.detail
    assert next(f for f in d.fixes if f.method == "snat-zone").recommended


def test_policy_route_already_in_place_reads_at_risk_for_the_gateway_clients() -> None:
    """After a forced policy-route, the clients that use their gateway are the ones
    exposed, and explain names them."""
    snap = snapshot(NC, flows=(request(UPLINK),))
    choices = tuple(replace(c, source=UPLINK, table=100) for c in snap.route_choices)
    d = diagnose(replace(snap, route_choices=choices))
    [cn] = d.clients
    assert cn.predicted_source == UPLINK and not cn.ok
    assert d.verdict == "at-risk"
    assert cn.onlink == (BRIDGE,) and cn.addressed == (UPLINK,)
    # The request never got a reply: nc holds the port and did not answer it.
    assert codes(d) == [
        "wildcard-socket", "unanswered-no-reply", "client-network-exposed"
    ], d.reasons


def test_network_behind_an_interface_without_an_address_recommends_policy_route() -> None:
    """A tunnel with no address of its own: its clients can only use the one they
    were seen using, so a route per network is right."""
    client = "203.0.113.7"
    snap = snapshot(NC, flows=(request(BRIDGE, client=client),))
    choices = tuple(
        replace(c, source=UPLINK, interface="tun0") if c.destination == client else c
        for c in snap.route_choices
    )
    d = diagnose(replace(snap, route_choices=choices))
    [cn] = d.clients
    assert (cn.network, cn.interface, cn.onlink, cn.ok) == ("203.0.113.0/24", "tun0", (), False)
    policy = next(f for f in d.fixes if f.method == "policy-route")
    assert policy.recommended and "203.0.113.0/24 from 192.0.2.1" in policy.summary
    assert not next(f for f in d.fixes if f.method == "snat-zone").recommended


def test_mixed_addressing_recommends_snat_zone_not_policy_route() -> None:
    flows = (request(UPLINK, cport=1), request(BRIDGE, cport=2, replied=True))
    d = diagnose(snapshot(NC, flows=flows))
    policy = next(f for f in d.fixes if f.method == "policy-route")
    assert not policy.recommended and "192.0.2.1 and 198.51.100.13" in policy.summary
    assert next(f for f in d.fixes if f.method == "snat-zone").recommended
    assert d.evidence.healthy == 1


def test_only_healthy_evidence_is_ok() -> None:
    d = diagnose(snapshot(NC, flows=(request(BRIDGE, replied=True),)))
    assert d.verdict == "ok" and d.fixes == ()
    assert d.evidence.healthy == 1
    assert "only-matching-clients-seen" in codes(d)


def test_specific_bind_is_ok() -> None:
    d = diagnose(snapshot(replace(NC, address=BRIDGE)))
    assert d.verdict == "ok"
    assert all(cn.ok and cn.addressed == (BRIDGE,) for cn in d.clients)


def test_v6only_wildcard_does_not_serve_ipv4() -> None:
    v6 = Listener("::", PORT, "ipv6", "listening", process="srv", v6only=True)
    d = diagnose(snapshot(v6))
    assert d.verdict == "ok"  # no global IPv6 address here, and IPv4 is not served
    dual = replace(v6, v6only=False)
    assert diagnose(snapshot(dual)).verdict == "at-risk"


def test_knowledge_base_service_that_uses_pktinfo_is_ok() -> None:
    kb = rules.load([], builtin=True)
    dnsmasq = Listener("0.0.0.0", PORT, "ipv4", "listening", pid=7, process="dnsmasq")
    d = diagnose(snapshot(dnsmasq), kb)
    assert d.verdict == "ok", d.reasons
    assert d.service is not None and "dnsmasq" in d.service


def test_ctfix_serve_is_ok_but_its_broken_twin_is_not() -> None:
    serve = replace(NC, process="python", cmdline=("python", "-m", "ctfix", "serve", "--port", "1"))
    assert diagnose(snapshot(serve)).verdict == "ok"
    twin = replace(serve, cmdline=(*serve.cmdline, "--broken"))
    assert diagnose(snapshot(twin)).verdict == "at-risk"


def test_connected_netcat_is_still_judged_by_its_peer() -> None:
    connected = replace(NC, address=BRIDGE, state="connected", peer=f"{CLIENT}:40000")
    d = diagnose(snapshot(connected, flows=(request(UPLINK),)))
    assert d.verdict == "at-risk"
    [cn] = d.clients
    assert (cn.addressed, cn.predicted_source) == ((UPLINK,), BRIDGE)
    assert codes(d)[0] == "connected-socket"


def test_nothing_listening_is_ok_with_a_reason() -> None:
    d = diagnose(snapshot())
    assert d.verdict == "ok" and codes(d) == ["nothing-bound"]


def test_nothing_listening_but_clients_asking_says_the_service_may_be_down() -> None:
    d = diagnose(snapshot(flows=(request(UPLINK), request(BRIDGE, cport=40001))))
    assert d.evidence.unanswered == 2
    # One unanswered record per address the clients sent to.
    assert codes(d) == ["nothing-answers", *["unanswered-no-socket"] * 2] and d.service_down


def nat_rule(
    actions: set[str],
    *,
    sport: bool = True,
    dport: bool = False,
    backend: NetfilterBackend = "nftables",
) -> NetfilterRule:
    return NetfilterRule(backend, "ip", "t", "c", "rule", frozenset(actions), sport, dport)


@pytest.mark.parametrize(
    ("ruleset", "expected"),
    [
        ([nat_rule({"snat"})], PROBLEM_SNAT_REPLY),
        ([nat_rule({"masquerade"})], PROBLEM_SNAT_REPLY),
        ([nat_rule({"notrack"}, sport=False, dport=True)], PROBLEM_NOTRACK),
        ([nat_rule({"dnat"})], PROBLEM_DNAT_REPLY),
        ([nat_rule({"zone"})], PROBLEM_ZONE_ALONE),
        ([nat_rule({"snat"}), nat_rule({"zone", "mark"})], None),  # the snat-zone method
        ([nat_rule({"accept"})], None),
    ],
)
def test_rule_problems(ruleset: list[NetfilterRule], expected: str | None) -> None:
    d = diagnose(snapshot(NC, netfilter=tuple(ruleset)))
    assert d.rules[0].problem == expected


def test_zone_in_another_backend_does_not_rescue_an_snat() -> None:
    ruleset = (nat_rule({"snat"}), nat_rule({"zone"}, backend="iptables-legacy"))
    d = diagnose(snapshot(NC, netfilter=ruleset))
    assert d.rules[0].problem == PROBLEM_SNAT_REPLY


def test_policy_rule_on_the_port_that_breaks_the_other_address_is_named() -> None:
    flows = (request(BRIDGE, cport=1),)
    snap = snapshot(NC, flows=flows)
    # ip rule add ipproto udp sport 56789 table 100; route 192.0.2.0/24 src UPLINK there.
    choices = tuple(replace(c, source=UPLINK, table=100) for c in snap.route_choices)
    rule = PolicyRule(
        "ipv4", 100, "100: from all ipproto udp sport 56789 lookup 100", 100, 17, (PORT, PORT)
    )
    d = diagnose(replace(snap, route_choices=choices, policy_rules=(rule,)))
    assert d.verdict == "at-risk"
    assert "policy-rule-wrong" in codes(d)
    assert rule.text in said(d, "policy-rule-wrong")  # it names the rule to remove


def test_user_rules_directory_overrides(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "version: 1\nservices:\n  - id: mine\n    name: My echo\n    processes: [nc]\n"
        "    ports: [56789]\n    affected_when_wildcard: false\n    why: uses IP_PKTINFO\n"
        "    fix: nothing\n    snippet: ''\n    reference: https://example.org\n"
        "    confidence: high\n"
    )
    kb = rules.load([tmp_path], builtin=True)
    assert diagnose(snapshot(NC), kb).verdict == "ok"


def test_working_snat_zone_rules_make_the_networks_ok() -> None:
    def snat_to(address: str) -> NetfilterRule:
        return replace(nat_rule({"snat"}), nat_to=address)

    one = (snat_to(UPLINK), nat_rule({"zone"}))
    d = diagnose(snapshot(NC, netfilter=one))
    nets = {cn.network: cn.ok for cn in d.clients}
    assert nets == {"192.0.2.0/24": True, "198.51.100.0/24": False}
    both = (*one, snat_to(BRIDGE))
    assert diagnose(snapshot(NC, netfilter=both)).verdict == "ok"
    # Without the zone the same SNAT is the doomed kind and rescues nothing.
    assert diagnose(snapshot(NC, netfilter=(snat_to(UPLINK), snat_to(BRIDGE)))).verdict == "at-risk"


# -- evidence counts and pairing (QA P2.3, P2.5) ------------------------------------------


def test_two_clients_with_wrong_source_replies_are_two_and_one_count_of_unanswered() -> None:
    """QA F1: evidence.unanswered is the unanswered records' count (a refused
    wrong-source reply is no usable reply), never 0 beside them; F2: the wrong-source
    record counts client ports, the unanswered one client hosts."""
    flows = (
        request(UPLINK, cport=57589),
        reply_from(BRIDGE, cport=57589),
        request(UPLINK, cport=49785),
        reply_from(BRIDGE, cport=49785),
        request(UPLINK, cport=40001),  # no reply of any kind yet
    )
    d = diagnose(snapshot(NC, flows=flows))
    [wrong] = d.evidence.wrong_source
    assert (wrong.count, wrong.clients, wrong.client_network) == (2, 2, "192.0.2.0/24")
    document = to_json_obj(d)
    by_reason = {u["reason"]: u["flows"] for u in document["unanswered"]}
    assert by_reason == {"wrong-source": 2, "no-reply": 1}
    assert document["evidence"]["unanswered"] == 3 == sum(by_reason.values())
    text = render_text(d)
    assert f"2 replies to 2 client ports in 192.0.2.0/24, latest {wrong.client}" in text
    assert "from 1 client host to" in text
    assert document["evidence"]["wrong_source"][0]["clients"] == 2


def test_after_a_working_snat_zone_fix_the_zoned_replies_are_answers_not_evidence() -> None:
    def zoned(cport: int) -> CtEntry:
        """The remedy's reply: zone 51185, SNAT'd back to the uplink address."""
        return CtEntry(
            udp(BRIDGE, CLIENT, PORT, cport), udp(CLIENT, UPLINK, cport, PORT), zone=51185
        )

    flows = (
        request(BRIDGE, cport=38683, replied=True),
        zoned(50078),
        request(BRIDGE, cport=50106, replied=True),
        request(UPLINK, cport=50078),
        zoned(51298),
        request(UPLINK, cport=51298),
    )
    for order in (flows, flows[::-1]):
        d = diagnose(snapshot(NC, flows=order))
        assert d.evidence.wrong_source == ()  # not "192.0.2.1:... -> 192.0.2.3:..."
        assert (d.evidence.healthy, d.evidence.unanswered) == (4, 0)
        assert d.verdict != "broken"


# -- second QA pass (P1, P3, P4, P5, P7, P8) ---------------------------------------------

DNSMASQ = Listener(
    "0.0.0.0", PORT, "ipv4", "listening", pid=16441, process="dnsmasq", cmdline=("dnsmasq",)
)


def test_a_trusted_program_caught_answering_from_the_wrong_source_is_broken() -> None:
    """P1: a binary named dnsmasq that is really socat. The knowledge base says dnsmasq
    answers right; conntrack shows it did not. The evidence wins."""
    kb = rules.load([], builtin=True)
    flows = (request(UPLINK), reply_from(BRIDGE))
    d = diagnose(snapshot(DNSMASQ, flows=flows), kb)
    assert d.verdict == "broken", d.reasons
    assert codes(d)[0] == "knowledge-base-contradicted"
    assert "history-predates-fix" not in codes(d)
    assert "answers-from-destination" not in codes(d)
    [cn] = d.clients
    assert not cn.ok and cn.predicted_source == BRIDGE
    # Not dnsmasq's "nothing to do": the generic fixes, the server's own first.
    assert d.fixes[0].method == "pktinfo" and d.fixes[0].recommended
    assert not any("Nothing to do" in f.summary for f in d.fixes)
    # Without evidence the knowledge base is believed.
    assert diagnose(snapshot(DNSMASQ), kb).verdict == "ok"


def snat_zone_rules(address: str) -> tuple[NetfilterRule, ...]:
    return (replace(nat_rule({"snat"}), nat_to=address), nat_rule({"zone"}))


def test_evidence_before_a_snat_zone_fix_is_history_but_live_evidence_is_not() -> None:
    flows = (request(UPLINK), reply_from(BRIDGE))
    snap = snapshot(NC, flows=flows, netfilter=snat_zone_rules(UPLINK))
    d = diagnose(snap)
    assert d.verdict == "ok", d.reasons
    assert "snat-zone-in-place" in codes(d)
    assert "the snat-zone rewrite to 198.51.100.13" in said(d, "history-predates-fix")
    # The same reply seen during --listen happened now: never discounted.
    [wrong] = d.evidence.wrong_source
    live = diagnose(replace(snap, live_findings=(wrong,), listened_seconds=3.0))
    assert live.verdict == "broken"
    assert "wrong-source-live" in codes(live) and "wrong-source-seen" not in codes(live)
    assert "history-predates-fix" not in codes(live)


def test_a_network_that_looks_ok_without_a_remedy_does_not_discount_evidence() -> None:
    """Routing from the main table happens to give the uplink address now: that is not
    a change anyone made for this port, so the wrong-source reply is current."""
    flows = (request(UPLINK), reply_from(BRIDGE))
    snap = snapshot(NC, flows=flows)
    choices = tuple(replace(c, source=UPLINK) for c in snap.route_choices)
    d = diagnose(replace(snap, route_choices=choices))
    assert d.verdict == "broken"


POLICY = PolicyRule(
    "ipv4", 100, f"100: from all ipproto udp sport {PORT} lookup 100", 100, 17, (PORT, PORT)
)


def test_evidence_before_a_forced_policy_route_is_history_and_gateway_clients_at_risk() -> None:
    """P7: after `ctfix fix P --method policy-route --force --apply` the replies to the
    container network leave from the uplink address through table 100."""
    flows = (request(UPLINK), reply_from(BRIDGE))
    snap = snapshot(NC, flows=flows)
    choices = tuple(replace(c, source=UPLINK, table=100) for c in snap.route_choices)
    d = diagnose(replace(snap, route_choices=choices, policy_rules=(POLICY,)))
    assert d.verdict == "at-risk", d.reasons
    assert POLICY.text in said(d, "history-predates-fix"), d.reasons
    assert "client-network-exposed" in codes(d)
    [cn] = d.clients
    assert cn.predicted_source == UPLINK and cn.onlink == (BRIDGE,)
    # Without the policy rule the same route answer is no remedy.
    assert diagnose(replace(snap, route_choices=choices)).verdict == "broken"


DNAT_CLIENT, DNAT_PORT, SERVICE_PORT = "198.51.100.1", 9053, PORT


def dnat_flows() -> tuple[CtEntry, ...]:
    """nft: ip daddr UPLINK udp dport 9053 dnat to BRIDGE:PORT; a broken wildcard
    server answers the upstream client from UPLINK:PORT (routing's choice)."""
    forwarded = CtEntry(
        udp(DNAT_CLIENT, UPLINK, 40254, DNAT_PORT), udp(BRIDGE, DNAT_CLIENT, PORT, 40254)
    )
    wrong = CtEntry(udp(UPLINK, DNAT_CLIENT, PORT, 40254), udp(DNAT_CLIENT, UPLINK, 40254, PORT))
    return forwarded, wrong


DNAT_RULE = NetfilterRule(
    "nftables",
    "ip",
    "qa_dnat",
    "prerouting",
    f"ip daddr {UPLINK} udp dport {DNAT_PORT} dnat to {BRIDGE}:{PORT}",
    frozenset({"dnat"}),
    matches_dport=True,
    nat_to=BRIDGE,
)


def test_requests_forwarded_by_dnat_are_evidence_for_the_service_port() -> None:
    """P3, `explain 56789`: the forwarded client is a client, and its reply was wrong."""
    d = diagnose(snapshot(NC, flows=dnat_flows()))
    assert d.verdict == "broken", d.reasons
    [wrong] = d.evidence.wrong_source
    assert wrong.service == f"{UPLINK}:{DNAT_PORT}"
    assert wrong.expected_source == f"{BRIDGE}:{PORT}"
    assert wrong.actual_source == f"{UPLINK}:{PORT}"
    [cn] = d.clients
    assert (cn.network, cn.addressed, cn.predicted_source) == ("198.51.100.0/24", (BRIDGE,), UPLINK)
    assert f"{UPLINK}:{DNAT_PORT}" in said(d, "forwarded-here-by-dnat")


def test_a_port_forwarded_by_dnat_points_to_the_service_port() -> None:
    """P3, `explain 9053`: nothing is bound there and none needs to be."""
    snap = snapshot(flows=dnat_flows(), netfilter=(DNAT_RULE,), port=DNAT_PORT)
    d = diagnose(snap)
    assert d.forwarded_to == (f"{BRIDGE}:{PORT}",)
    assert not d.service_down
    assert codes(d)[0] == "forwarded-by-dnat" and "nothing-answers" not in codes(d)
    assert f"run `ctfix explain {PORT}`" in said(d, "forwarded-by-dnat")
    assert d.verdict == "broken" and d.fixes == ()  # the evidence; the fixes are there
    # The rule alone (no traffic yet) is enough to know.
    quiet = diagnose(snapshot(netfilter=(DNAT_RULE,), port=DNAT_PORT))
    assert quiet.forwarded_to == (f"{BRIDGE}:{PORT}",) and quiet.verdict == "ok"
    assert "forwarded by DNAT" in render_text(quiet).splitlines()[0]


def test_nothing_bound_with_unanswered_clients_is_unmistakably_an_outage() -> None:
    """P4: the verdict stays about wrong sources, but nobody reads it as fine."""
    from ctfix.commands.explain import exit_status

    d = diagnose(snapshot(flows=(request(UPLINK), request(BRIDGE, cport=40001))))
    assert d.verdict == "ok" and d.service_down
    assert codes(d) == ["nothing-answers", *["unanswered-no-socket"] * 2]
    assert "NOTHING ANSWERS" in render_text(d).splitlines()[0]
    assert to_json_obj(d)["service_down"] is True
    assert exit_status(d) == 1
    idle = diagnose(snapshot())
    assert not idle.service_down and exit_status(idle) == 0


def test_the_latest_client_is_the_newest_entry_not_the_first_in_the_dump() -> None:
    """P5: clients from 41001..41004 in that order; the newest has the most time left."""
    flows: list[CtEntry] = []
    for age, cport in enumerate((41001, 41002, 41003, 41004)):
        left = 26 + age
        flows += [
            request(UPLINK, cport=cport)._replace(timeout=left),
            reply_from(BRIDGE, cport=cport)._replace(timeout=left),
        ]
    for order in (flows, flows[::-1]):  # the dump's hash order is arbitrary
        [wrong] = diagnose(snapshot(NC, flows=tuple(order))).evidence.wrong_source
        assert wrong.client == f"{CLIENT}:41004"
        assert (wrong.count, wrong.clients) == (4, 4)


def test_fixes_come_in_the_same_order_in_json_and_text() -> None:
    """P8: recommended first, everywhere."""
    d = diagnose(snapshot(NC))
    json_order = [f["method"] for f in to_json_obj(d)["fixes"]]
    text = render_text(d)
    text_order = sorted(json_order, key=lambda m: text.index(f"[{m}]"))
    assert json_order == text_order == [f.method for f in d.fixes]
    assert json_order == ["pktinfo", "snat-zone", "bind", "policy-route"]


def test_the_reason_names_the_same_addresses_as_the_client_table() -> None:
    """P8: the table says 'UPLINK (seen), BRIDGE (on-link)'; so does the reason, also
    when the on-link address is the one replies come from."""
    d = diagnose(snapshot(NC, flows=(request(UPLINK),)))
    [cn] = d.clients
    assert cn.predicted_source == BRIDGE
    assert f"{UPLINK} (seen), {BRIDGE} (on-link)" in render_text(d)
    assert f"send to {UPLINK} and may address {BRIDGE}" in said(d, "client-network-exposed")


def _kb_with(text: str) -> kb_rules.KnowledgeBase:
    return kb_rules.KnowledgeBase(tuple(kb_rules.parse(text, "test.yaml")))


GUESSED = f"""version: 1
services:
  - id: quietd
    name: quietd
    processes: [quietd]
    ports: [{PORT}]
    affected_when_wildcard: false
    fixed_in: "3.1"
    why: It answers with IP_PKTINFO.
    fix: Nothing to do.
    reference: https://example.org/quietd
    confidence: high
"""


def test_a_program_matched_by_port_only_is_a_guess_with_no_nothing_to_do() -> None:
    # Issue 8, item 5: atftpd was presented as tftpd-hpa with that entry's "nothing to
    # do". A process the entry does not name is not that program.
    kb = _kb_with(GUESSED)
    other = replace(NC, process="atftpd", cmdline=("atftpd", "--daemon"), exe="/usr/sbin/atftpd")
    d = diagnose(snapshot(other), kb)
    assert d.verdict == "at-risk"
    assert d.service is None
    assert not any("Nothing to do" in f.detail or "quietd" in f.summary for f in d.fixes)


def test_a_recognised_program_with_a_fixed_release_gets_the_upgrade_advice() -> None:
    kb = _kb_with(GUESSED.replace("affected_when_wildcard: false", "affected_when_wildcard: true"))
    rule = kb.get("quietd")
    assert rule is not None
    quietd = replace(NC, process="quietd", cmdline=("/usr/sbin/quietd",))
    d = diagnose(snapshot(quietd), kb)
    assert d.service == "quietd"
    assert any(rule.upgrade_advice() in f.detail for f in d.fixes if f.method == "bind")


def test_every_holder_of_a_shared_socket_is_listed_in_json() -> None:
    shared = replace(NC, processes=((42, "nc"), (43, "nc")))
    listed = to_json_obj(diagnose(snapshot(shared)))["listeners"][0]["processes"]
    assert listed == [{"pid": 42, "process": "nc"}, {"pid": 43, "process": "nc"}]
