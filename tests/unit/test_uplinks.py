"""Two uplinks, by hand: explain's egress per remote client network (diagnose() on
hand-built snapshots) and the reroute a fix plans for it (plans compared as data)."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from ctfix.core.decode import CtEntry, CtTuple
from ctfix.core.diagnosis import diagnose, probe_destinations, requests_to, uplink_lookups
from ctfix.core.model import ClientNetwork, Diagnosis, Listener, Uplink
from ctfix.core.plan import (
    IptRuleSpec,
    NftTableSpec,
    RouteCheck,
    RouteSpec,
    RuleSpec,
    make_plan,
    reroute_table,
    step_from_dict,
    step_to_dict,
    table_id,
)
from ctfix.core.snapshot import LocalAddress, NetfilterRule, Route, RouteChoice, Snapshot
from ctfix.errors import CtfixError
from ctfix.render.explain import render_text, to_json_obj

PORT = 40002
WAN1, GW1 = "198.51.100.13", "198.51.100.1"
WAN2, GW2 = "192.0.2.13", "192.0.2.1"
CLIENT = "203.0.113.7"
MARK = table_id(PORT)
ADDRESSES = (
    LocalAddress("lo", "127.0.0.1", 8, "ipv4", "host"),
    LocalAddress("wan1", WAN1, 24, "ipv4"),
    LocalAddress("wan2", WAN2, 24, "ipv4"),
)
ROUTES = (
    Route("ipv4", "0.0.0.0/0", "wan1", GW1, metric=100, text=f"default via {GW1} dev wan1"),
    Route("ipv4", "0.0.0.0/0", "wan2", GW2, metric=200, text=f"default via {GW2} dev wan2"),
    Route("ipv4", "198.51.100.0/24", "wan1", protocol=2, text="198.51.100.0/24 dev wan1"),
    Route("ipv4", "192.0.2.0/24", "wan2", protocol=2, text="192.0.2.0/24 dev wan2"),
)
SOCAT = Listener("0.0.0.0", PORT, "ipv4", "listening", pid=42, process="socat")


def udp(src: str, dst: str, sport: int, dport: int) -> CtTuple:
    return CtTuple(src, dst, sport, dport, 17, socket.AF_INET)


def request(addressed: str, cport: int = 41000) -> CtEntry:
    return CtEntry(udp(CLIENT, addressed, cport, PORT), udp(addressed, CLIENT, PORT, cport))


def reply_from(source: str, cport: int = 41000) -> CtEntry:
    return CtEntry(udp(source, CLIENT, PORT, cport), udp(CLIENT, source, cport, PORT))


#: a client of wan2 answered from wan1, out of wan1 (the lower-metric default)
FLOWS = (request(WAN2), reply_from(WAN1), request(WAN1, 41001))


def snapshot(
    *listeners: Listener,
    flows: tuple[CtEntry, ...] = FLOWS,
    extra: tuple[RouteChoice, ...] = (),
    **kw: object,
) -> Snapshot:
    routes = kw.get("route_table", ROUTES)
    assert isinstance(routes, tuple)
    probes = probe_destinations(PORT, ADDRESSES, flows, routes)
    plain = tuple(
        RouteChoice(d, WAN1, "wan1", 254, gateway=GW1)
        if not d.startswith("192.0.2.")
        else RouteChoice(d, WAN2, "wan2", 254)
        for d in probes.values()
    )
    base = Snapshot(
        port=PORT,
        netns="test",
        listeners=listeners or (SOCAT,),
        addresses=ADDRESSES,
        route_table=ROUTES,
        route_choices=plain + extra,
        flows=flows,
        probes=probes,
    )
    return replace(base, **kw)  # type: ignore[arg-type]  # kw: Snapshot fields, as objects


def codes(d: Diagnosis) -> list[str]:
    return [r.code for r in d.reasons]


def remote(d: Diagnosis) -> ClientNetwork:
    return next(cn for cn in d.clients if cn.network == "203.0.113.0/24")


# -- explain -------------------------------------------------------------------------


def test_a_client_of_the_second_uplink_answered_out_of_the_first_is_named() -> None:
    d = diagnose(snapshot())
    assert d.verdict == "broken"
    assert "reply-leaves-other-uplink" in codes(d)
    cn = remote(d)
    assert (cn.egress, cn.egress_gateway, cn.ok) == ("wan1", GW1, False)
    [uplink] = cn.uplinks  # wan1's own clients leave by wan1: nothing to say
    assert (uplink.address, uplink.interface, uplink.gateway) == (WAN2, "wan2", GW2)
    assert (uplink.network, uplink.routed, uplink.rerouted, uplink.ok) == (
        "192.0.2.0/24", True, False, False,
    )
    text = next(r.text for r in d.reasons if r.code == "reply-leaves-other-uplink")
    for name in ("wan1", "wan2", GW1, GW2, "BCP 38"):
        assert name in text
    client = to_json_obj(d)["clients"][0]
    assert (client["egress"], client["egress_gateway"]) == ("wan1", GW1)
    assert client["uplinks"][0]["interface"] == "wan2" and client["uplinks"][0]["ok"] is False
    assert "leaves by wan1, not wan2" in render_text(d)
    snat = next(f for f in d.fixes if f.method == "snat-zone")
    assert "own uplink" in snat.detail


def test_the_extra_lookups_are_from_the_addressed_address_and_with_each_reply_mark() -> None:
    local = {a.address for a in ADDRESSES}
    probes = probe_destinations(PORT, ADDRESSES, FLOWS, ROUTES)
    asked = requests_to(FLOWS, PORT, local)
    assert uplink_lookups(probes, asked, ADDRESSES, [MARK]) == [
        (CLIENT, None, WAN2),
        (CLIENT, MARK, None),
        (CLIENT, None, WAN1),
    ]
    # No client seen: the internet stands for them (two uplinks), from each address.
    internet = probes["0.0.0.0/0"]
    assert uplink_lookups(probes, [], ADDRESSES, []) == [
        (internet, None, WAN1),
        (internet, None, WAN2),
    ]


def test_with_no_client_seen_the_internet_is_an_assumed_client_network() -> None:
    """Two uplinks, nothing in conntrack yet: clients on the internet may send to
    either uplink's address, and wan2's would be answered out of wan1."""
    d = diagnose(snapshot(flows=()))
    assert d.verdict == "at-risk"
    internet = next(cn for cn in d.clients if cn.network == "0.0.0.0/0")
    assert (internet.addressed, internet.seen, internet.egress) == ((WAN1, WAN2), False, "wan1")
    assert internet.probe == "203.0.113.254"
    [uplink] = internet.uplinks
    assert (uplink.interface, uplink.gateway, uplink.ok) == ("wan2", GW2, False)
    assert "reply-leaves-other-uplink" in codes(d)


def test_one_uplink_has_no_internet_network() -> None:
    one = tuple(r for r in ROUTES if r.interface == "wan1")
    d = diagnose(snapshot(flows=(), route_table=one))
    assert {cn.network for cn in d.clients} == {"198.51.100.0/24", "192.0.2.0/24"}
    assert "reply-leaves-other-uplink" not in codes(d)


def test_a_reroute_in_place_makes_it_ok_and_says_so() -> None:
    mark_rule = NetfilterRule(
        "nftables", "inet", f"ctfix_{PORT}", "reroute", "... meta mark set ...",
        actions=frozenset({"mark"}), matches_sport=True, hook="output", mark_to=MARK,
    )
    snat = NetfilterRule(
        "nftables", "inet", f"ctfix_{PORT}", "reply_snat", "... snat ip to ...",
        actions=frozenset({"snat"}), matches_sport=True, hook="postrouting", nat_to=WAN2,
    )
    zone = replace(snat, chain="reply_zone", actions=frozenset({"zone"}), nat_to=None)
    marked = RouteChoice(CLIENT, WAN2, "wan2", MARK, gateway=GW2, mark=MARK)
    d = diagnose(snapshot(netfilter=(mark_rule, zone, snat), extra=(marked,)))
    assert "reroute-in-place" in codes(d) and "reply-leaves-other-uplink" not in codes(d)
    [uplink] = remote(d).uplinks
    assert uplink.rerouted and uplink.ok and remote(d).ok


def test_a_mark_that_routes_elsewhere_is_no_reroute() -> None:
    mark_rule = NetfilterRule(
        "nftables", "inet", "t", "c", "r", actions=frozenset({"mark"}), matches_sport=True,
        hook="output", mark_to=7,
    )
    marked = RouteChoice(CLIENT, WAN1, "wan1", 254, gateway=GW1, mark=7)
    d = diagnose(snapshot(netfilter=(mark_rule,), extra=(marked,)))
    assert "reply-leaves-other-uplink" in codes(d) and "reroute-in-place" not in codes(d)


def test_an_interface_that_leads_to_no_router_is_not_an_uplink() -> None:
    """A LAN (only its connected route): remote clients' replies can only leave by the
    routed uplink, so nothing is said about uplinks."""
    lan_only = tuple(r for r in ROUTES if not (r.interface == "wan2" and r.gateway))
    d = diagnose(snapshot(route_table=lan_only))
    [uplink] = remote(d).uplinks
    assert not uplink.routed and uplink.ok
    assert "reply-leaves-other-uplink" not in codes(d)
    assert "client-network-exposed" in codes(d)  # the wrong source is still said


def test_an_uplink_whose_routes_do_not_cover_the_clients_has_no_known_gateway() -> None:
    partial = (
        *(r for r in ROUTES if not (r.interface == "wan2" and r.gateway)),
        Route("ipv4", "10.0.0.0/8", "wan2", GW2, text=f"10.0.0.0/8 via {GW2} dev wan2"),
    )
    d = diagnose(snapshot(route_table=partial))
    [uplink] = remote(d).uplinks
    assert uplink.routed and not uplink.ok and uplink.gateway is None and uplink.route is None
    text = next(r.text for r in d.reasons if r.code == "reply-leaves-other-uplink")
    assert "--gateway" in text


def test_clients_on_a_link_of_the_host_have_no_uplink_question() -> None:
    """A neighbour on wan2's link that addresses wan1: its reply goes straight out on
    its own link, whatever the defaults."""
    neighbour = "192.0.2.50"
    flows = (
        CtEntry(udp(neighbour, WAN1, 41000, PORT), udp(WAN1, neighbour, PORT, 41000)),
    )
    d = diagnose(snapshot(flows=flows))
    assert all(not cn.uplinks for cn in d.clients)
    assert "reply-leaves-other-uplink" not in codes(d)


@pytest.mark.parametrize("source_routed", [True, False])
def test_a_server_bound_to_the_address_depends_on_source_routing(source_routed: bool) -> None:
    """A reply that already leaves from wan2's address is routed by the host's source
    rules (`ip rule from`): without one it still leaves by wan1."""
    bound = Listener(WAN2, PORT, "ipv4", "listening", pid=43, process="socat")
    egress = "wan2" if source_routed else "wan1"
    sourced = RouteChoice(CLIENT, WAN2, egress, 254, from_address=WAN2)
    d = diagnose(snapshot(bound, flows=(request(WAN2),), extra=(sourced,)))
    [uplink] = remote(d).uplinks
    assert uplink.source_routed is source_routed and uplink.ok is source_routed
    assert ("reply-leaves-other-uplink" in codes(d)) is not source_routed
    if not source_routed:
        text = next(r.text for r in d.reasons if r.code == "reply-leaves-other-uplink")
        assert f"ip rule add from {WAN2}" in text


# -- fix: the reroute in a plan --------------------------------------------------------

UPLINK2 = Uplink(
    WAN2, "wan2", "192.0.2.0/24", GW2, f"default via {GW2} dev wan2 metric 200", True,
    ok=False,
)
REMOTE = ClientNetwork(
    "203.0.113.0/24", (WAN2, WAN1), WAN1, False, "wan1", True, onlink=(WAN1,),
    egress="wan1", egress_gateway=GW1, uplinks=(UPLINK2,),
)
WAN1_V6, WAN2_V6, GW2_V6 = "2001:db8:100::13", "2001:db8:200::13", "fe80::1"
UPLINK2_V6 = Uplink(
    WAN2_V6, "wan2", "2001:db8:200::/64", GW2_V6, f"default via {GW2_V6} dev wan2", True,
    ok=False,
)
REMOTE_V6 = ClientNetwork(
    "2001:db8:300::/64", (WAN2_V6,), WAN1_V6, False, "wan1", True,
    egress="wan1", egress_gateway="fe80::2", uplinks=(UPLINK2_V6,),
)
SOCAT6 = Listener("::", PORT, "ipv6", "listening", pid=43, process="socat", v6only=True)


def two_uplinks(*clients: ClientNetwork) -> Diagnosis:
    return Diagnosis(
        PORT, "host", "broken", (), listeners=(SOCAT, SOCAT6), clients=clients,
        local_addresses=(WAN1, WAN2, WAN1_V6, WAN2_V6),
    )


def test_snat_zone_nft_adds_a_table_a_fwmark_rule_and_a_marking_route_chain() -> None:
    plan = make_plan(two_uplinks(REMOTE, REMOTE_V6), "snat-zone", "nftables")
    table = table_id(PORT)
    route4, route6, rule4, rule6, nft = (s.spec for s in plan.steps)
    assert route4 == RouteSpec("ipv4", "0.0.0.0/0", "wan2", WAN2, table, gateway=GW2)
    assert route6 == RouteSpec("ipv6", "::/0", "wan2", WAN2_V6, table, gateway=GW2_V6)
    assert rule4 == RuleSpec("ipv4", PORT, table, fwmark=table)
    assert rule6 == RuleSpec("ipv6", PORT, table, fwmark=table)
    assert plan.steps[0].commands == (
        f"ip route add default via {GW2} dev wan2 src {WAN2} table {table} proto 199",
    )
    assert plan.steps[2].commands == (
        f"ip rule add priority 32100 fwmark {table:#x} ipproto udp sport {PORT} lookup "
        f"{table} protocol 199",
    )
    assert isinstance(nft, NftTableSpec)
    assert "type route hook output priority mangle;" in nft.text
    marking = [line.strip() for line in nft.text.splitlines() if "meta mark set" in line]
    assert marking == [
        f"ip saddr != {WAN2} udp sport {PORT} ip daddr . udp dport @clients4_0 "
        f'meta mark set {table:#x} comment "ctfix:{PORT}"',
        f"ip6 saddr != {WAN2_V6} udp sport {PORT} ip6 daddr . udp dport @clients6_0 "
        f'meta mark set {table:#x} comment "ctfix:{PORT}"',
    ]
    assert plan.checks == (
        RouteCheck("203.0.113.254", WAN2, "wan2", table),
        RouteCheck("2001:db8:300:0:ffff:ffff:ffff:fffe", WAN2_V6, "wan2", table),
    )


def test_snat_zone_legacy_marks_in_mangle_output_after_the_snat() -> None:
    plan = make_plan(two_uplinks(REMOTE), "snat-zone", "iptables-legacy")
    specs = [s.spec for s in plan.steps]
    assert isinstance(specs[0], RouteSpec) and isinstance(specs[1], RuleSpec)
    mark = specs[-1]
    assert isinstance(mark, IptRuleSpec)
    assert (mark.table, mark.chain, mark.source) == ("mangle", "OUTPUT", f"!{WAN2}")
    assert mark.target.name == "MARK" and mark.target.options == (
        ("set-mark", f"{table_id(PORT):#x}"),
    )
    zone = next(s for s in specs if isinstance(s, IptRuleSpec) and s.target.name == "CT")
    assert mark.matches == zone.matches  # the same replies the zone and SNAT take


def test_no_reroute_without_an_uplink_mismatch() -> None:
    plan = make_plan(two_uplinks(replace(REMOTE, uplinks=())), "snat-zone", "nftables")
    [step] = plan.steps
    assert isinstance(step.spec, NftTableSpec) and "reroute" not in step.spec.text
    assert not plan.checks


def test_an_unknown_gateway_is_refused_naming_the_option_and_given_by_it() -> None:
    unknown = replace(UPLINK2, gateway=None, route=None)
    diagnosis = two_uplinks(replace(REMOTE, uplinks=(unknown,)))
    with pytest.raises(CtfixError) as err:
        make_plan(diagnosis, "snat-zone", "nftables")
    assert "wan2" in err.value.message and "--gateway ADDR" in (err.value.hint or "")
    plan = make_plan(diagnosis, "snat-zone", "nftables", gateways=("192.0.2.254",))
    assert plan.steps[0].spec == RouteSpec(
        "ipv4", "0.0.0.0/0", "wan2", WAN2, table_id(PORT), gateway="192.0.2.254"
    )


def test_a_gateway_can_declare_an_uplink_the_routes_do_not_show() -> None:
    lan = replace(UPLINK2, gateway=None, route=None, routed=False, ok=True)
    diagnosis = two_uplinks(replace(REMOTE, uplinks=(lan,)))
    assert len(make_plan(diagnosis, "snat-zone", "nftables").steps) == 1
    plan = make_plan(diagnosis, "snat-zone", "nftables", gateways=(GW2,))
    assert plan.steps[0].spec == RouteSpec(
        "ipv4", "0.0.0.0/0", "wan2", WAN2, table_id(PORT), gateway=GW2
    )


@pytest.mark.parametrize(
    ("gateway", "words"),
    [
        ("203.0.113.1", "on no uplink"),
        ("fe80::1", "needs its interface"),
        ("router", "not an IP address"),
    ],
)
def test_a_gateway_that_fits_no_uplink_is_refused(gateway: str, words: str) -> None:
    with pytest.raises(CtfixError) as err:
        make_plan(two_uplinks(REMOTE), "snat-zone", "nftables", gateways=(gateway,))
    assert words in err.value.message


def test_a_link_local_gateway_names_its_interface() -> None:
    unknown = replace(UPLINK2_V6, gateway=None, route=None)
    plan = make_plan(
        two_uplinks(replace(REMOTE_V6, uplinks=(unknown,))), "snat-zone", "nftables",
        gateways=("fe80::9%wan2",),
    )
    assert plan.steps[0].spec == RouteSpec(
        "ipv6", "::/0", "wan2", WAN2_V6, table_id(PORT), gateway="fe80::9"
    )


def test_a_second_uplink_to_reroute_gets_the_next_table_of_the_range() -> None:
    wan3 = Uplink("203.0.113.99", "wan3", "203.0.113.96/27", "203.0.113.97", "default via "
                  "203.0.113.97 dev wan3", True, ok=False)
    other = replace(REMOTE, network="192.0.2.128/25", addressed=("203.0.113.99",),
                    uplinks=(wan3,))
    diagnosis = replace(
        two_uplinks(REMOTE, other), local_addresses=(WAN1, WAN2, "203.0.113.99")
    )
    plan = make_plan(diagnosis, "snat-zone", "nftables")
    tables = [s.spec.table for s in plan.steps if isinstance(s.spec, RouteSpec)]
    assert tables == [table_id(PORT), reroute_table(PORT, 1)]
    assert reroute_table(PORT, 1) == 0xC7F10000 + PORT


def test_policy_route_sends_a_remote_network_through_the_right_gateway() -> None:
    only_wan2 = replace(REMOTE, addressed=(WAN2,), onlink=())
    plan = make_plan(two_uplinks(only_wan2), "policy-route")
    route = plan.steps[0].spec
    assert route == RouteSpec(
        "ipv4", "203.0.113.0/24", "wan2", WAN2, table_id(PORT), gateway=GW2
    )
    assert plan.steps[0].commands == (
        f"ip route add 203.0.113.0/24 via {GW2} dev wan2 src {WAN2} table {table_id(PORT)} "
        "proto 199",
    )
    assert plan.checks == (RouteCheck("203.0.113.254", WAN2, "wan2"),)


def test_policy_route_uses_the_egress_gateway_for_remote_clients_of_one_uplink() -> None:
    """No uplink mismatch, but the clients are beyond a router: `dev wan1` alone would
    make the host look for them on wan1's link."""
    same = replace(REMOTE, addressed=(WAN1,), predicted_source=WAN2, onlink=(), uplinks=())
    [route, _rule] = make_plan(two_uplinks(same), "policy-route").steps
    assert route.spec == RouteSpec(
        "ipv4", "203.0.113.0/24", "wan1", WAN1, table_id(PORT), gateway=GW1
    )


def test_reroute_steps_survive_the_state_file_and_old_records_still_read() -> None:
    plan = make_plan(two_uplinks(REMOTE), "snat-zone", "nftables")
    for step in plan.steps:
        assert step_from_dict(step_to_dict(step)) == step
    route = plan.steps[0].spec
    assert isinstance(route, RouteSpec)
    old = step_to_dict(plan.steps[0])
    del old["spec"]["gateway"]  # a state file from before two uplinks
    assert step_from_dict(old).spec == replace(route, gateway=None)


def test_policy_route_refusal_beyond_a_router_says_what_routing_does_not_their_gateway() -> None:
    """QA F23: clients two routers away that may address wan1's address are not on its
    link (it is not their gateway); they would be answered from wan2's. And conntrack's
    memory is this namespace's nf_conntrack_udp_timeout, as read."""
    only_wan2 = replace(REMOTE, addressed=(WAN2,))
    diagnosis = replace(two_uplinks(only_wan2), udp_timeout=5)
    with pytest.raises(CtfixError) as err:
        make_plan(diagnosis, "policy-route")
    assert err.value.message == (
        f"policy-route would answer clients in 203.0.113.0/24 that address {WAN1} (the "
        f"host's own address on wan1) from {WAN2}: none was seen, but conntrack forgets "
        "an unanswered flow after 5 s (nf_conntrack_udp_timeout in this namespace), so "
        "that is no proof there are none"
    )
    forced = make_plan(diagnosis, "policy-route", force=True)
    [warning] = forced.warnings
    assert "gateway" not in warning and f"will leave from {WAN2}" in warning
    unread = replace(diagnosis, udp_timeout=None)
    with pytest.raises(CtfixError) as err:
        make_plan(unread, "policy-route")
    assert "nf_conntrack_udp_timeout seconds (unreadable here)" in err.value.message


def test_explain_policy_route_advice_beyond_a_router_names_no_gateway() -> None:
    """QA F23, explain's side: the same words as fix's refusal."""
    from ctfix.core.diagnosis.advice import fixes_for

    only_wan2 = replace(REMOTE, addressed=(WAN2,))
    [route] = [
        f for f in fixes_for(PORT, "broken", [only_wan2], None, [], (), 5)
        if f.method == "policy-route"
    ]
    assert "their gateway" not in route.detail and f"address {WAN1} (the host)" in route.detail
    assert "after 5 s (nf_conntrack_udp_timeout in this namespace)" in route.detail
