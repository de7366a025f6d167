"""The fix planner: plans are data, compared as data (no kernel, no mocks)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from ctfix.core.model import ClientNetwork, Diagnosis, Evidence, Listener, WrongSourceReply
from ctfix.core.plan import (
    METHODS,
    Backend,
    IpsetSpec,
    IptRuleSpec,
    NftTableSpec,
    RouteCheck,
    RouteSpec,
    RuleSpec,
    make_plan,
    method,
    step_from_dict,
    step_to_dict,
    table_id,
)
from ctfix.core.plan.snat_zone import CT_ZONE
from ctfix.errors import CtfixError

PORT = 56789
WILDCARD = Listener("0.0.0.0", PORT, "ipv4", "listening", pid=42, process="socat")
WILDCARD6 = Listener("::", PORT, "ipv6", "listening", pid=43, process="socat", v6only=True)
BOTH = (WILDCARD, WILDCARD6)


def diagnosis(*clients: ClientNetwork, listeners: tuple[Listener, ...] = BOTH) -> Diagnosis:
    return Diagnosis(
        port=PORT,
        netns="host",
        verdict="broken",
        reasons=(),
        listeners=listeners,
        clients=clients,
        local_addresses=("192.0.2.1", "198.51.100.13", "2001:db8:1::1", "2001:db8:2::13"),
    )


UPLINK_ONLY = ClientNetwork("192.0.2.0/24", ("198.51.100.13",), "192.0.2.1", False, "br0", True)
UPLINK_ONLY_V6 = ClientNetwork(
    "2001:db8:1::/64", ("2001:db8:2::13",), "2001:db8:1::1", False, "br0", True
)
MIXED = ClientNetwork(
    "192.0.2.0/24", ("198.51.100.13", "192.0.2.1"), "192.0.2.1", False, "br0", True
)
HEALTHY_UPSTREAM = ClientNetwork(
    "198.51.100.0/24", ("198.51.100.13",), "198.51.100.13", True, "eth0", True
)


def test_policy_route_one_route_per_broken_network_then_one_rule_per_family() -> None:
    plan = make_plan(diagnosis(UPLINK_ONLY, UPLINK_ONLY_V6, HEALTHY_UPSTREAM), "policy-route")
    table = table_id(PORT)
    assert [s.spec for s in plan.steps] == [
        RouteSpec("ipv4", "192.0.2.0/24", "br0", "198.51.100.13", table),
        RouteSpec("ipv6", "2001:db8:1::/64", "br0", "2001:db8:2::13", table),
        RuleSpec("ipv4", PORT, table),
        RuleSpec("ipv6", PORT, table),
    ]
    assert plan.steps[0].commands == (
        f"ip route add 192.0.2.0/24 dev br0 src 198.51.100.13 table {table} proto 199",
    )
    assert plan.steps[3].commands == (
        f"ip -6 rule add priority 32100 ipproto udp sport {PORT} lookup {table} protocol 199",
    )
    # The check asks about an address inside the network that is not a local one.
    assert plan.checks == (
        RouteCheck("192.0.2.254", "198.51.100.13"),
        RouteCheck("2001:db8:1:0:ffff:ffff:ffff:fffe", "2001:db8:2::13"),
    )


def test_policy_route_checks_a_client_that_was_actually_seen() -> None:
    seen = Diagnosis(
        port=PORT,
        netns="host",
        verdict="broken",
        reasons=(),
        listeners=(WILDCARD,),
        clients=(UPLINK_ONLY,),
        evidence=Evidence(
            (WrongSourceReply("192.0.2.3:40000", "198.51.100.13:56789", "198.51.100.13",
                              "192.0.2.1", "address"),)
        ),
    )
    assert make_plan(seen, "policy-route").checks == (RouteCheck("192.0.2.3", "198.51.100.13"),)


def test_policy_route_refuses_a_network_that_addresses_several_local_addresses() -> None:
    with pytest.raises(CtfixError) as err:
        make_plan(diagnosis(MIXED), "policy-route")
    assert "192.0.2.0/24" in err.value.message
    assert "198.51.100.13 and 192.0.2.1" in err.value.message
    assert err.value.hint == "use --method snat-zone"


#: What diagnose() reports in the QA case: only the uplink seen, but the bridge
#: address is the clients' gateway (conntrack had forgotten their flows).
GATEWAY_UNSEEN = replace(UPLINK_ONLY, onlink=("192.0.2.1",))
GATEWAY_UNSEEN_V6 = replace(UPLINK_ONLY_V6, onlink=("2001:db8:1::1",))


def test_policy_route_refuses_when_clients_may_address_their_gateway() -> None:
    with pytest.raises(CtfixError) as err:
        make_plan(diagnosis(GATEWAY_UNSEEN), "policy-route")
    assert err.value.message.startswith(
        "policy-route would answer clients in 192.0.2.0/24 that address 192.0.2.1 "
        "(the host's own address on br0, their gateway) from 198.51.100.13: none was seen"
    )
    assert err.value.hint == (
        "use --method snat-zone (it serves both), or add --force if no client in "
        "192.0.2.0/24 ever addresses 192.0.2.1"
    )


def test_policy_route_refusal_names_every_network_it_would_break() -> None:
    """QA P8: the dual-stack lab's refusal named only 192.0.2.0/24."""
    with pytest.raises(CtfixError) as err:
        make_plan(
            replace(diagnosis(GATEWAY_UNSEEN, GATEWAY_UNSEEN_V6), udp_timeout=30),
            "policy-route",
        )
    assert err.value.message == (
        "policy-route would answer clients in 192.0.2.0/24 that address 192.0.2.1 (the "
        "host's own address on br0, their gateway) from 198.51.100.13 and clients in "
        "2001:db8:1::/64 that address 2001:db8:1::1 (the host's own address on br0, their "
        "gateway) from 2001:db8:2::13: none was seen, but conntrack forgets an unanswered "
        "flow after 30 s (nf_conntrack_udp_timeout in this namespace), so that is no proof "
        "there are none"
    )
    assert err.value.hint == (
        "use --method snat-zone (it serves both), or add --force if no client in "
        "192.0.2.0/24 ever addresses 192.0.2.1, and none in 2001:db8:1::/64 ever "
        "addresses 2001:db8:1::1"
    )


def test_policy_route_forced_plans_the_same_routes_and_names_who_breaks() -> None:
    forced = make_plan(diagnosis(GATEWAY_UNSEEN, GATEWAY_UNSEEN_V6), "policy-route", force=True)
    plain = make_plan(diagnosis(UPLINK_ONLY, UPLINK_ONLY_V6), "policy-route")
    assert forced.steps == plain.steps and plain.warnings == ()
    assert forced.warnings == (
        "--force: replies to 192.0.2.0/24 will leave from 198.51.100.13; clients in "
        "192.0.2.0/24 that address 192.0.2.1 (the host's own address on br0, their "
        "gateway) will be answered from it, not from the address they asked, until --revert",
        "--force: replies to 2001:db8:1::/64 will leave from 2001:db8:2::13; clients in "
        "2001:db8:1::/64 that address 2001:db8:1::1 (the host's own address on br0, their "
        "gateway) will be answered from it, not from the address they asked, until --revert",
    )


def test_policy_route_gateway_seen_in_use_is_refused_even_forced() -> None:
    with pytest.raises(CtfixError, match=re.escape("198.51.100.13 and 192.0.2.1")):
        make_plan(diagnosis(replace(MIXED, onlink=("192.0.2.1",))), "policy-route", force=True)


def test_policy_route_refuses_when_nothing_is_broken() -> None:
    with pytest.raises(CtfixError, match="nothing to route"):
        make_plan(diagnosis(HEALTHY_UPSTREAM), "policy-route")


def test_no_socket_and_no_evidence_is_refused_unless_forced() -> None:
    quiet = diagnosis(UPLINK_ONLY, listeners=())
    with pytest.raises(CtfixError, match="no UDP socket on port 56789"):
        make_plan(quiet, "snat-zone")
    assert make_plan(quiet, "snat-zone", force=True).steps


def test_snat_zone_nftables_is_one_atomic_table_for_both_families() -> None:
    plan = make_plan(diagnosis(MIXED, UPLINK_ONLY_V6), "snat-zone", "nftables")
    assert plan.backend == "nftables"
    [step] = plan.steps
    spec = step.spec
    assert isinstance(spec, NftTableSpec)
    assert (spec.family, spec.name) == ("inet", "ctfix_56789")
    assert step.undo == ("nft delete table inet ctfix_56789",)
    # Only the address whose clients get the wrong source is rewritten; replies that
    # already leave from the address the client used are excluded by `saddr !=`.
    assert (
        "ip saddr != 198.51.100.13 udp sport 56789 ip daddr . udp dport @clients4_0 "
        f"ct zone set {CT_ZONE}" in spec.text
    )
    assert "snat ip to 198.51.100.13:56789" in spec.text
    assert "snat ip6 to [2001:db8:2::13]:56789" in spec.text
    assert "192.0.2.1" not in spec.text
    batch = list(spec.batch)
    assert batch[0] == {"add": {"table": {"family": "inet", "name": "ctfix_56789"}}}
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in batch if "chain" in c["add"]}
    assert chains["reply_zone"]["prio"] == -300  # before conntrack (-200) sees the reply
    assert chains["reply_zone"]["hook"] == "output"
    assert chains["reply_snat"]["type"] == "nat"
    rules = [c["add"]["rule"] for c in batch if "rule" in c["add"]]
    assert len(rules) == 8 and all(r["comment"] == "ctfix:56789" for r in rules)


def test_snat_zone_iptables_orders_sets_remember_zone_then_snat() -> None:
    plan = make_plan(diagnosis(MIXED), "snat-zone", "iptables-legacy")
    specs = [s.spec for s in plan.steps]
    assert specs[0] == IpsetSpec("ctfix-56789-v4-0", "ipv4")
    rules = [s for s in specs if isinstance(s, IptRuleSpec)]
    assert [(r.table, r.chain, r.target.name) for r in rules] == [
        ("raw", "PREROUTING", "SET"),
        ("raw", "PREROUTING", "SET"),
        ("raw", "OUTPUT", "CT"),
        ("nat", "POSTROUTING", "SNAT"),
    ]
    assert plan.steps[3].commands == (
        "iptables-legacy -w -t raw -I OUTPUT -p udp ! -s 198.51.100.13 -m udp --sport 56789 "
        "-m set --match-set ctfix-56789-v4-0 dst,dst -m comment --comment ctfix:56789 "
        f"-j CT --zone {CT_ZONE}",
    )
    assert all(("comment", "ctfix:56789") in r.matches[-1].options for r in rules)


def test_snat_zone_with_nothing_wrong_is_refused_unless_forced() -> None:
    with pytest.raises(CtfixError, match="nothing to fix"):
        make_plan(diagnosis(HEALTHY_UPSTREAM), "snat-zone")
    forced = make_plan(diagnosis(HEALTHY_UPSTREAM), "snat-zone", "iptables-legacy", force=True)
    names = [s.spec.name for s in forced.steps if isinstance(s.spec, IpsetSpec)]
    assert names == ["ctfix-56789-v4-0", "ctfix-56789-v4-1", "ctfix-56789-v6-0", "ctfix-56789-v6-1"]


def test_dual_stack_mapped_addresses_are_planned_as_ipv4() -> None:
    mapped = ClientNetwork(
        "192.0.2.0/24", ("::ffff:198.51.100.13",), "192.0.2.1", False, "br0", True
    )
    plan = make_plan(diagnosis(mapped), "policy-route")
    assert plan.steps[0].spec == RouteSpec(
        "ipv4", "192.0.2.0/24", "br0", "198.51.100.13", table_id(PORT)
    )


def test_bind_changes_nothing() -> None:
    plan = make_plan(diagnosis(MIXED), "bind", advice=("use IP_PKTINFO",))
    assert plan.steps == () and plan.advice == ("use IP_PKTINFO",)


@pytest.mark.parametrize("backend", ["nftables", "iptables-legacy"])
def test_steps_survive_the_state_file_round_trip(backend: Backend) -> None:
    plan = make_plan(diagnosis(MIXED, UPLINK_ONLY_V6), "snat-zone", backend)
    for step in plan.steps:
        assert step_from_dict(json.loads(json.dumps(step_to_dict(step)))) == step
    routed = make_plan(diagnosis(UPLINK_ONLY), "policy-route")
    for step in routed.steps:
        assert step_from_dict(json.loads(json.dumps(step_to_dict(step)))) == step


def test_an_nft_batch_is_json_data_in_the_record_and_older_string_batches_still_read() -> None:
    """The batch is recorded as the list of commands (not a JSON string inside JSON);
    a state file written by the first release (batch as a string, plus the text) reads
    to the same step, so --revert and --status keep working after an upgrade."""
    [step] = make_plan(diagnosis(MIXED), "snat-zone", "nftables").steps
    assert isinstance(step.spec, NftTableSpec)
    record = step_to_dict(step)
    assert record["spec"]["batch"][0] == {
        "add": {"table": {"family": "inet", "name": "ctfix_56789"}}
    }
    older = json.loads(json.dumps(record))
    older["spec"]["batch"] = json.dumps(list(step.spec.batch), sort_keys=True)
    older["spec"]["text"] = "table inet ctfix_56789 { ... }"
    assert step_from_dict(older) == step
    older["spec"]["batch"] = '{"add": "not a list"}'
    with pytest.raises(CtfixError, match="unreadable step"):
        step_from_dict(older)


def test_every_method_is_registered_and_offered_by_fix() -> None:
    """One list of methods: each has a planner that says it is that method, and
    `ctfix fix --method` offers exactly those."""
    import argparse

    from ctfix.commands import fix

    assert METHODS == ("policy-route", "snat-zone", "bind", "flush-stale")
    for name in METHODS:
        assert method(name).name == name
    parser = argparse.ArgumentParser()
    fix.add_arguments(parser)
    [choices] = [a.choices for a in parser._actions if a.dest == "method"]
    assert tuple(choices or ()) == METHODS


def test_a_backend_the_method_cannot_use_is_refused() -> None:
    with pytest.raises(CtfixError, match="snat-zone needs nftables or iptables-legacy"):
        make_plan(diagnosis(MIXED), "snat-zone", "iproute2")
    with pytest.raises(CtfixError, match="policy-route needs iproute2"):
        make_plan(diagnosis(UPLINK_ONLY), "policy-route", "nftables")


def test_unreadable_step_record_is_a_one_line_error() -> None:
    with pytest.raises(CtfixError, match="unreadable step"):
        step_from_dict({"spec": {"kind": "teleport"}})


#: QA P2: ntpd (always port 123), SNMP managers, a NAT that keeps source ports: one
#: client (address, port) may ask several local addresses in turn.
TWO_UPLINKS = ClientNetwork(
    "192.0.2.0/24", ("198.51.100.13", "198.51.100.14", "192.0.2.1"), "192.0.2.1", False,
    "br0", True,
)


def test_snat_zone_nftables_forgets_a_client_that_asks_another_local_address() -> None:
    plan = make_plan(diagnosis(TWO_UPLINKS), "snat-zone", "nftables")
    [step] = plan.steps
    assert isinstance(step.spec, NftTableSpec)
    remember = step.spec.text.split("chain remember_clients {")[1].split("}\n")[0]
    rules = [line.strip() for line in remember.splitlines() if "comment" in line]
    assert rules == [
        f"ip daddr {address} udp dport 56789 update @{name} {{ ip saddr . udp sport }} "
        'comment "ctfix:56789"'
        if op == "update"
        else f"ip daddr != {address} udp dport 56789 fib daddr type local "
        f'delete @{name} {{ ip saddr . udp sport }} comment "ctfix:56789"'
        for address, name in (("198.51.100.13", "clients4_0"), ("198.51.100.14", "clients4_1"))
        for op in ("update", "delete")
    ]
    # Each rewritten address has its own zone: a NAT binding is per conntrack entry,
    # so a client moving from .13 to .14 must not find .13's binding in the zone.
    assert f"@clients4_0 ct zone set {CT_ZONE}" in step.spec.text
    assert f"@clients4_1 ct zone set {CT_ZONE + 1}" in step.spec.text
    batch = list(step.spec.batch)
    deletes = [
        e["set"] for c in batch if "rule" in c["add"] for e in c["add"]["rule"]["expr"]
        if "set" in e and e["set"]["op"] == "delete"
    ]
    assert [d["set"] for d in deletes] == ["@clients4_0", "@clients4_1"]


def test_snat_zone_iptables_forgets_a_client_that_asks_another_local_address() -> None:
    plan = make_plan(diagnosis(TWO_UPLINKS), "snat-zone", "iptables-legacy")
    commands = [c for s in plan.steps for c in s.commands]
    for n, address in enumerate(("198.51.100.13", "198.51.100.14")):
        assert (
            f"iptables-legacy -w -t raw -I PREROUTING -p udp ! -d {address} -m udp --dport "
            "56789 -m addrtype --dst-type LOCAL -m comment --comment ctfix:56789 "
            f"-j SET --del-set ctfix-56789-v4-{n} src,src"
        ) in commands
        assert any(
            c.startswith(f"iptables-legacy -w -t raw -I OUTPUT -p udp ! -s {address} ")
            and c.endswith(f"-j CT --zone {CT_ZONE + n}")
            for c in commands
        )
    # Every rule is told apart in --status and --revert's one-object-per-line output.
    objects = [obj for s in plan.steps for obj in s.creates]
    assert len(set(objects)) == len(objects)


#: QA P6: `socat UDP4-RECVFROM:5353,bind=198.51.100.13` beside
#: `socat UDP6-RECVFROM:5353,ipv6only=1`: no IPv4 socket can answer from a wrong source.
BOUND_V4 = Listener("198.51.100.13", PORT, "ipv4", "listening", pid=44, process="socat")
ASSUMED_BRIDGE = ClientNetwork(
    "198.51.100.0/24", ("198.51.100.13", "192.0.2.1"), "198.51.100.13", False, "eth0", False
)


def test_snat_zone_covers_only_addresses_a_wildcard_socket_receives() -> None:
    plan = make_plan(
        diagnosis(ASSUMED_BRIDGE, UPLINK_ONLY, UPLINK_ONLY_V6, listeners=(BOUND_V4, WILDCARD6)),
        "snat-zone",
        "nftables",
    )
    [step] = plan.steps
    assert step.creates[1:3] == (
        "set clients6_0: clients that sent to [2001:db8:2::13]:56789",
        "chain remember_clients (filter hook prerouting priority raw)",
    )
    assert isinstance(step.spec, NftTableSpec)
    assert "192.0.2.1" not in step.spec.text and "198.51.100.13" not in step.spec.text
    assert plan.notes == (
        "left alone: no IPv4 wildcard socket listens on port 56789, so nothing there "
        "answers from the wrong source for 192.0.2.1",
        "left alone: 198.51.100.13 has a UDP socket of its own on port 56789, bound to it, "
        "so its replies already leave from it",
    )


def test_snat_zone_with_only_bound_sockets_is_refused_with_the_reason() -> None:
    with pytest.raises(CtfixError) as err:
        make_plan(diagnosis(ASSUMED_BRIDGE, UPLINK_ONLY, listeners=(BOUND_V4,)), "snat-zone")
    assert err.value.message == (
        "nothing to fix on port 56789: no IPv4 wildcard socket listens on port 56789, so "
        "nothing there answers from the wrong source for 192.0.2.1; 198.51.100.13 has a UDP "
        "socket of its own on port 56789, bound to it, so its replies already leave from it"
    )


def test_dual_stack_v6_wildcard_serves_ipv4_too() -> None:
    dual = Listener("::", PORT, "ipv6", "listening", pid=45, v6only=False)
    plan = make_plan(diagnosis(MIXED, listeners=(dual,)), "snat-zone", "iptables-legacy")
    assert [s.spec for s in plan.steps if isinstance(s.spec, IpsetSpec)] == [
        IpsetSpec("ctfix-56789-v4-0", "ipv4")
    ]


def test_policy_route_leaves_a_network_alone_when_its_address_has_its_own_socket() -> None:
    with pytest.raises(CtfixError, match="nothing to route"):
        make_plan(diagnosis(UPLINK_ONLY, listeners=(BOUND_V4, WILDCARD6)), "policy-route")
