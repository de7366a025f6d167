"""Clients behind a DNAT (kube-proxy's ClusterIP -> hostNetwork case): reading the
rules, the diagnosis, the snat-zone plan, and the fix's effect. No kernel: rulesets
and conntrack tables are built by hand, plans compared as data."""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import replace
from typing import Any

import pytest

from ctfix.core import decode
from ctfix.core.decode import CtEntry, CtTuple
from ctfix.core.diagnosis import diagnose, probe_destinations
from ctfix.core.diagnosis.advice import dnat_notes
from ctfix.core.diagnosis.evidence import last_packet
from ctfix.core.diagnosis.forwarding import forwarded_services
from ctfix.core.model import ClientNetwork, Diagnosis, ForwardedService, Listener
from ctfix.core.nat import NatRuleset
from ctfix.core.nat.nft_json import nat_chains
from ctfix.core.nat.paths import DnatPath, dnat_paths
from ctfix.core.plan import IptRuleSpec, make_plan, plan_to_dict
from ctfix.core.plan.bind import dnat_advice
from ctfix.core.snapshot import (
    FixRecord,
    LocalAddress,
    NetfilterRule,
    RouteChoice,
    Snapshot,
)
from ctfix.lab import registry

PORT = 56789
BRIDGE, NODE, POD = "192.0.2.1", "198.51.100.13", "192.0.2.3"
CLUSTER_IP, OTHER = "203.0.113.10", 40054
ADDRESSES = (
    LocalAddress("br0", BRIDGE, 24, "ipv4"),
    LocalAddress("eth0", NODE, 24, "ipv4"),
)
WILD = Listener("0.0.0.0", PORT, "ipv4", "listening", pid=42, process="socat")
NOW = 1_700_000_000.0


# -- reading: the path to each DNAT ------------------------------------------------------


def payload(protocol: str, field: str, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"payload": {"protocol": protocol, "field": field}},
                      "right": right}}


def chain(name: str, hook: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"family": "ip", "table": "kube", "name": name}
    if hook:
        body.update(type="nat", hook=hook, prio=-100, policy="accept")
    return {"chain": body}


def rule(chain_name: str, handle: int, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": "ip", "table": "kube", "chain": chain_name, "handle": handle,
                     "expr": list(expr)}}


def jump(target: str) -> dict[str, Any]:
    return {"jump": {"target": target}}


def nft_dnat_rules(
    objects: list[dict[str, Any]], texts: dict[tuple[str, str, str, int], str], port: int
) -> list[DnatPath]:
    """The DNAT paths to `port` of a ruleset, as explain reads them (the NAT model)."""
    return dnat_paths(NatRuleset(tuple(nat_chains(objects, texts))), port)


#: kube-proxy's shape: hooks -> services -> one chain per endpoint -> DNAT
KUBE = [
    chain("prerouting", "prerouting"),
    chain("output", "output"),
    chain("services"),
    chain("sep_same"),
    chain("sep_other"),
    rule("prerouting", 1, jump("services")),
    rule("output", 2, jump("services")),
    rule("services", 3, payload("ip", "daddr", CLUSTER_IP), payload("udp", "dport", PORT),
         jump("sep_same")),
    rule("services", 4, payload("ip", "daddr", CLUSTER_IP), payload("udp", "dport", OTHER),
         jump("sep_other")),
    # The same ClusterIP and port for TCP: not a UDP path.
    rule("services", 5, payload("ip", "daddr", CLUSTER_IP), payload("tcp", "dport", OTHER),
         jump("sep_other")),
    rule("sep_same", 6, {"dnat": {"addr": NODE}}),
    rule("sep_other", 7, {"dnat": {"addr": NODE, "port": PORT}}),
]


def test_a_dnat_is_read_with_the_matches_of_the_chains_that_jump_to_it() -> None:
    found = nft_dnat_rules(KUBE, {}, PORT)
    assert sorted((r.hook, r.destinations, r.dports, r.to_address, r.to_port) for r in found) == [
        ("output", (CLUSTER_IP,), (OTHER,), NODE, PORT),
        ("output", (CLUSTER_IP,), (PORT,), NODE, None),
        ("prerouting", (CLUSTER_IP,), (OTHER,), NODE, PORT),
        ("prerouting", (CLUSTER_IP,), (PORT,), NODE, None),
    ]
    # A port the DNATs do not send anything to: nothing.
    assert nft_dnat_rules(KUBE, {}, OTHER) == []


def test_iptables_nft_dnat_target_is_read_from_the_printed_rule() -> None:
    """iptables-nft stores DNAT as an `xt` target: the JSON has no address, the text has."""
    objects = [
        chain("PREROUTING", "prerouting"),
        rule("PREROUTING", 9, payload("ip", "daddr", CLUSTER_IP), payload("udp", "dport", OTHER),
             {"xt": {"type": "target", "name": "DNAT"}}),
    ]
    texts = {("ip", "kube", "PREROUTING", 9):
             f"ip daddr {CLUSTER_IP} udp dport {OTHER} counter dnat to {NODE}:{PORT}"}
    [found] = nft_dnat_rules(objects, texts, PORT)
    assert (found.destinations, found.dports, found.to_address, found.to_port) == (
        (CLUSTER_IP,), (OTHER,), NODE, PORT
    )


def test_a_negated_destination_is_no_known_destination() -> None:
    objects = [
        chain("PREROUTING", "prerouting"),
        rule("PREROUTING", 1, payload("ip", "daddr", BRIDGE, "!="),
             payload("udp", "dport", OTHER), {"dnat": {"addr": NODE, "port": PORT}}),
    ]
    [found] = nft_dnat_rules(objects, {}, PORT)
    assert found.destinations == ()
    [service] = forwarded_services(PORT, [found], (), {BRIDGE, NODE})
    assert not service.exact and service.service == f"any address:{OTHER}"


def test_kube_proxy_nftables_mode_a_verdict_map_by_address_protocol_and_port() -> None:
    """`ip daddr . meta l4proto . th dport vmap @service-ips`: each UDP entry is a path;
    the TCP one on the same address and port is not."""
    key = {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}},
                      {"meta": {"key": "l4proto"}},
                      {"payload": {"protocol": "th", "field": "dport"}}]}
    elements = [[{"concat": [CLUSTER_IP, proto, OTHER]}, {"goto": {"target": f"svc_{proto}"}}]
                for proto in ("udp", "tcp")]
    service_ips = {"map": {"family": "ip", "table": "kube", "name": "service-ips",
                           "map": "verdict", "elem": elements}}
    objects = [
        chain("prerouting", "prerouting"), chain("svc_udp"), chain("svc_tcp"), service_ips,
        rule("prerouting", 1, {"vmap": {"key": key, "data": "@service-ips"}}),
        rule("svc_udp", 2, {"dnat": {"addr": NODE, "port": PORT}}),
        rule("svc_tcp", 3, {"dnat": {"addr": NODE, "port": PORT}}),
    ]
    vmap = "ip daddr . meta l4proto . th dport vmap @service-ips"
    texts = {("ip", "kube", "svc_udp", 2): f"dnat to {NODE}:{PORT}",
             ("ip", "kube", "prerouting", 1): vmap}
    [found] = nft_dnat_rules(objects, texts, PORT)
    assert (found.destinations, found.dports, found.to_address, found.to_port) == (
        (CLUSTER_IP,), (OTHER,), NODE, PORT
    )
    assert found.via == (vmap,)


def test_each_entry_of_a_dnat_map_is_a_service() -> None:
    """`dnat ip to ip daddr . udp dport map { A . 40054 : NODE . PORT, ... }`."""
    key = {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}},
                      {"payload": {"protocol": "udp", "field": "dport"}}]}
    entries = [[{"concat": [CLUSTER_IP, p]}, {"concat": [NODE, PORT]}] for p in (OTHER, 40055)]
    objects = [
        chain("prerouting", "prerouting"),
        rule("prerouting", 1, payload("udp", "dport", {"set": [OTHER, 40055]}),
             {"dnat": {"family": "ip", "addr": {"map": {"key": key, "data": {"set": entries}}}}}),
    ]
    found = nft_dnat_rules(objects, {}, PORT)
    assert [(r.destinations, r.dports, r.to_port) for r in found] == [
        ((CLUSTER_IP,), (OTHER,), PORT), ((CLUSTER_IP,), (40055,), PORT)
    ]


# -- the diagnosis ----------------------------------------------------------------------


def udp(src: str, dst: str, sport: int, dport: int) -> CtTuple:
    return CtTuple(src, dst, sport, dport, 17, socket.AF_INET)


def dnat_request(port: int, cport: int, timeout: int = 29) -> CtEntry:
    """A pod's request to the ClusterIP, DNAT'd to the node's address on PORT."""
    return CtEntry(udp(POD, CLUSTER_IP, cport, port), udp(NODE, POD, PORT, cport),
                   timeout=timeout)


def wrong_reply(cport: int, timeout: int = 29, start: int | None = None) -> CtEntry:
    """The wildcard server's reply from the bridge address: a NEW flow."""
    return CtEntry(udp(BRIDGE, POD, PORT, cport), udp(POD, BRIDGE, cport, PORT),
                   timeout=timeout, start=start)


def zoned_reply(port: int, cport: int) -> CtEntry:
    """snat-zone's reply: in its zone, SNAT'd back to what the pod sent to."""
    return CtEntry(udp(BRIDGE, POD, PORT, cport), udp(POD, CLUSTER_IP, cport, port),
                   zone=51186, timeout=29)


def services(*forwards: tuple[int, int | None]) -> NatRuleset:
    """A ClusterIP's ports DNAT'd to the node: (service port, target port or None)."""
    objects = [chain("prerouting", "prerouting")] + [
        rule("prerouting", handle, payload("ip", "daddr", CLUSTER_IP),
             payload("udp", "dport", p), {"dnat": {"addr": NODE, "port": to}})
        for handle, (p, to) in enumerate(forwards, 1)
    ]
    return NatRuleset(tuple(nat_chains(objects)))


SERVICES = services((PORT, None), (OTHER, PORT))
SERVICE_RULES = dnat_paths(SERVICES)


def snapshot(flows: tuple[CtEntry, ...] = (), **kw: Any) -> Snapshot:
    probes = probe_destinations(PORT, ADDRESSES, flows)
    choices = tuple(
        RouteChoice(d, BRIDGE if d.startswith("192.0.2.") else NODE, None, 254)
        for d in probes.values()
    )
    base = Snapshot(
        port=PORT, netns="node", listeners=(WILD,), addresses=ADDRESSES,
        route_choices=choices, flows=flows, probes=probes, nat_rules=SERVICES,
        taken_at=NOW, udp_timeout=30,
    )
    return replace(base, **kw)


def snat(address: str, port: int) -> tuple[NetfilterRule, ...]:
    """A working snat-zone rewrite of the port's replies to address:port."""
    return (
        NetfilterRule("nftables", "inet", "ctfix", "reply_snat", "snat", frozenset({"snat"}),
                      True, nat_to=address, nat_port=port),
        NetfilterRule("nftables", "inet", "ctfix", "reply_zone", "zone", frozenset({"zone"}),
                      True),
    )


def codes(d: Diagnosis) -> list[str]:
    return [r.code for r in d.reasons]


def test_services_dnatd_here_come_from_the_rules_and_from_conntrack() -> None:
    flows = (dnat_request(OTHER, 41000), dnat_request(40099, 41001))
    services = forwarded_services(PORT, SERVICE_RULES, flows, {BRIDGE, NODE})
    assert [(s.service, s.target, s.hooks, s.seen) for s in services] == [
        (f"{CLUSTER_IP}:{PORT}", f"{NODE}:{PORT}", ("prerouting",), 0),
        (f"{CLUSTER_IP}:{OTHER}", f"{NODE}:{PORT}", ("prerouting",), 1),
        (f"{CLUSTER_IP}:40099", f"{NODE}:{PORT}", (), 1),  # conntrack only
    ]


def test_a_rewrite_to_the_dnat_target_does_not_rescue_the_clusterip_clients() -> None:
    """The first release's fix: SNAT to the node address; the pods still get nothing."""
    flows = (dnat_request(OTHER, 41000), wrong_reply(41000))
    d = diagnose(snapshot(flows, netfilter=snat(NODE, PORT)))
    assert d.verdict == "broken", d.reasons
    assert "history-predates-fix" not in codes(d)
    [pods] = [cn for cn in d.clients if cn.network == "192.0.2.0/24"]
    assert not pods.ok and pods.wrong_for == (f"{CLUSTER_IP}:{OTHER}",)
    assert pods.services == (f"{CLUSTER_IP}:{OTHER}",)
    assert [f.service for f in d.forwarded_from] == [f"{CLUSTER_IP}:{PORT}",
                                                      f"{CLUSTER_IP}:{OTHER}"]
    snat_zone = next(f for f in d.fixes if f.method == "snat-zone")
    assert snat_zone.recommended and f"{CLUSTER_IP}:{OTHER}" in snat_zone.detail


def test_a_rewrite_to_the_service_itself_does() -> None:
    flows = (dnat_request(OTHER, 41000), wrong_reply(41000))
    rules = (*snat(CLUSTER_IP, OTHER), *snat(CLUSTER_IP, PORT)[:1])
    d = diagnose(snapshot(flows, netfilter=rules))
    assert d.verdict == "ok", d.reasons
    assert "history-predates-fix" in codes(d)


def test_a_reply_rewritten_to_what_the_pod_sent_to_is_an_answer() -> None:
    flows = (dnat_request(OTHER, 41000), zoned_reply(OTHER, 41000))
    d = diagnose(snapshot(flows))
    assert d.evidence.wrong_source == () and d.evidence.healthy == 1


# -- the fix's effect ---------------------------------------------------------------------

COVERS = ((f"{NODE}:{PORT}", f"{NODE}:{PORT}"), (f"{CLUSTER_IP}:{OTHER}", f"{NODE}:{PORT}"),
          (f"{CLUSTER_IP}:{PORT}", f"{NODE}:{PORT}"))
WORKING = (*snat(CLUSTER_IP, OTHER), *snat(CLUSTER_IP, PORT)[:1], *snat(NODE, PORT)[:1])


def test_wrong_source_replies_dated_after_the_fix_make_it_ineffective() -> None:
    """The table keeps an unreplied entry 30 s after its last packet: 25 s left means
    its last packet left 5 s ago, after a fix applied 20 s ago."""
    flows = (dnat_request(OTHER, 41000), wrong_reply(41000, timeout=25))
    assert last_packet(flows[1], snapshot(flows)) == NOW - 5
    fix = FixRecord("snat-zone", NOW - 20, COVERS)
    d = diagnose(snapshot(flows, netfilter=WORKING, fix=fix))
    assert d.verdict == "broken", d.reasons
    assert "fix-ineffective" in codes(d) and "history-predates-fix" not in codes(d)
    assert d.fix_effect is not None and d.fix_effect.verdict == "ineffective"
    assert d.fix_effect.ineffective_for == (f"{CLUSTER_IP}:{OTHER}",)
    [evidence] = d.fix_effect.since_fix
    assert evidence.last_seen == NOW - 5 and evidence.client == f"{POD}:41000"
    # Applied after that reply: it predates the fix, which covers its clients.
    later = diagnose(snapshot(flows, netfilter=WORKING, fix=replace(fix, applied_at=NOW - 2)))
    assert later.verdict == "ok", later.reasons
    assert later.fix_effect is not None and later.fix_effect.verdict == "no-failure-seen"
    assert "history-predates-fix" in codes(later)


def test_conntrack_timestamps_date_a_reply_too() -> None:
    dated = wrong_reply(41000)._replace(timeout=None, start=int((NOW - 3) * 1e9))
    flows = (dnat_request(OTHER, 41000), dated)
    fix = FixRecord("snat-zone", NOW - 20, COVERS)
    d = diagnose(snapshot(flows, netfilter=WORKING, fix=fix))
    assert d.fix_effect is not None and d.fix_effect.verdict == "ineffective"
    assert "conntrack timestamps" in d.fix_effect.evidence


def test_a_service_forwarded_after_the_fix_is_named_as_not_covered() -> None:
    newer = services((PORT, None), (OTHER, PORT), (40055, PORT))
    fix = FixRecord("snat-zone", NOW - 20, COVERS)
    d = diagnose(snapshot(netfilter=WORKING, fix=fix, nat_rules=newer))
    assert d.verdict == "at-risk", d.reasons
    assert d.fix_effect is not None
    assert [s.service for s in d.fix_effect.uncovered] == [f"{CLUSTER_IP}:40055"]
    assert "fix-not-covering" in codes(d)
    # Without a record there is no verdict on a fix.
    assert diagnose(snapshot(netfilter=WORKING)).fix_effect is None


# -- the plans ---------------------------------------------------------------------------

PODS = ClientNetwork("192.0.2.0/24", (NODE,), BRIDGE, False, "br0", True,
                     services=(f"{CLUSTER_IP}:{OTHER}",))


def forwarded(*hooks: str, address: str = CLUSTER_IP, port: int = OTHER,
              target: str = NODE) -> ForwardedService:
    return ForwardedService(address, port, target, PORT, hooks=hooks or ("prerouting",))


def plan_for(*services: ForwardedService, backend: str = "nftables",
             clients: tuple[ClientNetwork, ...] = (PODS,)) -> Any:
    listeners = (WILD, Listener("::", PORT, "ipv6", "listening", v6only=False))
    d = Diagnosis(PORT, "node", "broken", (), listeners=listeners, clients=clients,
                  forwarded_from=services, local_addresses=(BRIDGE, NODE))
    return make_plan(d, "snat-zone", backend)  # type: ignore[arg-type]


def test_snat_zone_remembers_dnatd_clients_by_what_they_sent_to_and_rewrites_to_it() -> None:
    plan = plan_for(forwarded())
    assert [t.label for t in plan.covers] == [
        f"{NODE}:{PORT}", f"{CLUSTER_IP}:{OTHER}, DNAT'd to {NODE}:{PORT}"
    ]
    text = plan.steps[0].spec.text
    assert f"ip daddr {CLUSTER_IP} udp dport {OTHER} update @clients4_1" in text
    assert (f"ip saddr != {NODE} udp sport {PORT} ip daddr . udp dport @clients4_1 "
            f"snat ip to {CLUSTER_IP}:{OTHER}") in text
    assert f"ip saddr != {NODE} udp sport {PORT} ip daddr . udp dport @clients4_1 ct zone " \
           "set 51186" in text
    # A pod that switches from the ClusterIP to the node address (or back) is forgotten.
    assert f"ip daddr {CLUSTER_IP} udp dport {OTHER} delete @clients4_0" in text
    assert "remember_own_clients" not in text  # no DNAT in output
    covers = plan_to_dict(plan)["covers"]
    assert covers[1] == {"service": f"{CLUSTER_IP}:{OTHER}", "target": f"{NODE}:{PORT}",
                         "label": f"{CLUSTER_IP}:{OTHER}, DNAT'd to {NODE}:{PORT}",
                         "hooks": ["prerouting"]}
    assert json.loads(json.dumps(covers)) == covers


def test_snat_zone_iptables_legacy_the_same_in_rules_and_ipsets() -> None:
    plan = plan_for(forwarded(), backend="iptables-legacy")
    specs = [s.spec for s in plan.steps if isinstance(s.spec, IptRuleSpec)]
    snat_rules = [s for s in specs if s.target.name == "SNAT"]
    assert [(s.source, s.target.options) for s in snat_rules] == [
        (f"!{NODE}", (("to-source", f"{NODE}:{PORT}"),)),
        (f"!{NODE}", (("to-source", f"{CLUSTER_IP}:{OTHER}"),)),
    ]
    remember = next(s for s in specs if s.destination == CLUSTER_IP
                    and s.target.options[0][0] == "add-set")
    assert remember.chain == "PREROUTING" and remember.matches[0].options == (
        ("dport", str(OTHER)),
    )
    creates = [obj for step in plan.steps for obj in step.creates]
    assert len(creates) == len(set(creates))  # one line each in --status and --revert


def test_a_dnat_in_output_remembers_the_hosts_own_clients_too() -> None:
    text = plan_for(forwarded("prerouting", "output")).steps[0].spec.text
    assert "chain remember_own_clients" in text
    assert "fib saddr type != local ip daddr 203.0.113.10 udp dport 40054 update" in text
    legacy = plan_for(forwarded("prerouting", "output"), backend="iptables-legacy")
    chains = {s.spec.chain for s in legacy.steps if isinstance(s.spec, IptRuleSpec)
              and s.spec.table == "raw" and s.spec.target.name == "SET"}
    assert chains == {"PREROUTING", "OUTPUT"}
    assert "-m addrtype ! --src-type LOCAL" in " ".join(c for s in legacy.steps
                                                         for c in s.commands)


def test_ipv6_service_rewrites_to_the_bracketed_endpoint() -> None:
    six = ClientNetwork("2001:db8:1::/64", ("2001:db8:2::13",), "2001:db8:1::1", False,
                        "br0", True)
    plan = plan_for(forwarded(address="2001:db8:3::10", target="2001:db8:2::13"),
                    clients=(six,))
    assert "snat ip6 to [2001:db8:3::10]:40054" in plan.steps[0].spec.text


def test_a_dnat_with_no_known_address_is_left_alone_and_says_why() -> None:
    vague = ForwardedService(None, OTHER, NODE, PORT, matched="203.0.113.0/24")
    plan = plan_for(vague)
    assert [t.label for t in plan.covers] == [f"{NODE}:{PORT}"]
    assert any("203.0.113.0/24:40054" in n and "conntrack" in n for n in plan.notes)


def test_a_service_that_names_a_local_address_replaces_its_direct_target() -> None:
    """NodePort-like: the node's own address:PORT DNAT'd to the bridge address."""
    node_port = forwarded(address=NODE, port=PORT, target=BRIDGE)
    plan = plan_for(node_port)
    assert [t.label for t in plan.covers] == [f"{NODE}:{PORT}, DNAT'd to {BRIDGE}:{PORT}"]


# -- advice ---------------------------------------------------------------------------------


def test_advice_says_which_remedies_serve_dnatd_clients() -> None:
    notes = dnat_notes((PODS,), (forwarded("prerouting", "output"),))
    assert "route's source is the DNAT target" in notes["policy-route"]
    assert "does not reach this host's own clients" in notes["policy-route"]
    assert f"Bind to {NODE}" in notes["bind"]
    assert "rewrites the reply to exactly that address and port" in notes["snat-zone"]
    [line] = dnat_advice((forwarded(),))
    assert f"socket bound to {NODE}" in line and f"{CLUSTER_IP}:{OTHER}" in line


def test_policy_route_plan_names_the_dnatd_clients_it_serves_and_those_it_cannot() -> None:
    d = Diagnosis(PORT, "node", "broken", (), listeners=(WILD,), clients=(PODS,),
                  forwarded_from=(forwarded("prerouting", "output"),))
    notes = make_plan(d, "policy-route", force=True).notes
    assert any(n.startswith(f"covers: clients of {CLUSTER_IP}:{OTHER} in 192.0.2.0/24")
               for n in notes)
    assert any(n.startswith("not covered: this host's own clients") for n in notes)


# -- conntrack timestamps -------------------------------------------------------------------


def with_timestamp(message: bytes, start_ns: int) -> bytes:
    """A recorded ctnetlink message with CTA_TIMESTAMP (start) appended."""
    nested = decode.nla(decode.CTA_TIMESTAMP_START, struct.pack(">Q", start_ns))
    extra = decode.nla(decode.CTA_TIMESTAMP | decode.NLA_F_NESTED, nested)
    body = message + extra
    return struct.pack("=I", len(body)) + body[4:]


@pytest.mark.parametrize("fast", [True, False])
def test_the_start_timestamp_is_decoded_on_both_paths(fast: bool) -> None:
    from tests.unit.test_decode import RAW

    raw = with_timestamp(RAW[0], 1_700_000_000_123_456_789)
    batch = decode.decode(raw, fast=fast)
    assert batch.malformed == 0
    assert batch.events[0].entry.start == 1_700_000_000_123_456_789
    assert decode.decode(RAW[0]).events[0].entry.start is None


# -- the lab's scenarios ------------------------------------------------------------------


def test_every_registered_scenario_tells_a_story_and_has_words() -> None:
    import importlib

    from ctfix.render.lab import TITLES, WHY

    assert registry.DEFAULT in registry.SCENARIOS
    for name, (module, summary) in registry.SCENARIOS.items():
        assert callable(importlib.import_module(module).run_story) and summary
        assert name in TITLES and name in WHY
