"""The NAT model: where the rules would send a new flow, from nft JSON and legacy rules.

The nft JSON below is what `nft -j list ruleset` printed (nft 1.0.6) for the rules in
the comments; the legacy rules are what python-iptables gives for iptables-save lines.
"""

from __future__ import annotations

import socket
from typing import Any

from ctfix.core.nat import Evaluator, Flow, NatRuleset
from ctfix.core.nat.legacy import nat_chains as legacy_chains
from ctfix.core.nat.nft_json import nat_chains
from ctfix.core.ruleset import LegacyRule, LegacyTable

LOCAL = ("198.51.100.13", "192.0.2.1")


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _ruleset(*rules: list[dict[str, Any]], extra: tuple[dict[str, Any], ...] = (),
             chains: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = [
        {"table": {"family": "ip", "name": "t"}},
        {"chain": {"family": "ip", "table": "t", "name": "pre", "type": "nat",
                   "hook": "prerouting", "prio": -100, "policy": "accept"}},
    ]
    objects += [{"chain": {"family": "ip", "table": "t", "name": name}} for name in chains]
    objects += list(extra)
    for handle, expr in enumerate(rules, 10):
        chain = "pre"
        if expr and "chain" in expr[0]:
            chain = expr[0]["chain"]
            expr = expr[1:]
        objects.append({"rule": {"family": "ip", "table": "t", "chain": chain,
                                 "handle": handle, "expr": expr}})
    return objects


def _evaluator(objects: list[dict[str, Any]]) -> Evaluator:
    return Evaluator(NatRuleset(tuple(nat_chains(objects))), LOCAL)


def _flow(dport: int, saddr: str = "192.0.2.3", daddr: str = "198.51.100.13") -> Flow:
    return Flow(socket.AF_INET, 17, saddr, 40514, daddr, dport)


def _targets(ev: Evaluator, flow: Flow) -> tuple[tuple[str, ...], bool]:
    outcome = ev.outcome(flow)
    assert not outcome.undetermined, outcome.undetermined
    return outcome.describe(flow), outcome.unnatted


# ip daddr 198.51.100.13 udp dport 5140 dnat to 198.51.100.22
DNAT_B = [
    _match(_payload("ip", "daddr"), "198.51.100.13"),
    _match(_payload("udp", "dport"), 5140),
    {"dnat": {"addr": "198.51.100.22"}},
]


def test_a_plain_dnat_sends_its_port_there_and_nothing_else() -> None:
    ev = _evaluator(_ruleset(DNAT_B))
    assert _targets(ev, _flow(5140)) == (("198.51.100.22:5140",), False)
    assert _targets(ev, _flow(5141)) == ((), True)
    assert _targets(ev, _flow(5140, daddr="198.51.100.14")) == ((), True)
    tcp = Flow(socket.AF_INET, 6, "192.0.2.3", 1, "198.51.100.13", 5140)
    assert _targets(ev, tcp) == ((), True)  # `udp dport` needs UDP
    assert ev.forwarded_ports() == frozenset({5140})


def test_jump_goto_return_and_a_vmap_on_address_and_port() -> None:
    # map svc { ipv4_addr . inet_service : verdict } = { .13 . 5140 : jump a, .13 . 5141 : goto b }
    svc = {"map": {"family": "ip", "table": "t", "name": "svc", "map": "verdict",
                   "type": ["ipv4_addr", "inet_service"],
                   "elem": [[{"concat": ["198.51.100.13", 5140]}, {"jump": {"target": "a"}}],
                            [{"concat": ["198.51.100.13", 5141]}, {"goto": {"target": "b"}}]]}}
    objects = _ruleset(
        [{"vmap": {"key": {"concat": [_payload("ip", "daddr"), _payload("udp", "dport")]},
                   "data": "@svc"}}],
        [{"chain": "a"}, {"dnat": {"addr": "198.51.100.21", "port": 6000}}],
        # chain b: ip saddr != 192.0.2.3 return; dnat to 198.51.100.22
        [{"chain": "b"}, _match(_payload("ip", "saddr"), "192.0.2.3", "!="), {"return": None}],
        [{"chain": "b"}, {"dnat": {"addr": "198.51.100.22"}}],
        extra=(svc,),
        chains=("a", "b"),
    )
    ev = _evaluator(objects)
    assert _targets(ev, _flow(5140)) == (("198.51.100.21:6000",), False)
    assert _targets(ev, _flow(5141)) == (("198.51.100.22:5141",), False)
    assert _targets(ev, _flow(5141, saddr="192.0.2.9")) == ((), True)
    assert ev.forwarded_ports() == frozenset({5140, 5141})


def test_a_match_it_cannot_evaluate_goes_both_ways() -> None:
    # iifname != "br0" udp dport 5500 dnat to 198.51.100.50-198.51.100.52
    ev = _evaluator(_ruleset([
        _match({"meta": {"key": "iifname"}}, "br0", "!="),
        _match(_payload("udp", "dport"), 5500),
        {"dnat": {"addr": {"range": ["198.51.100.50", "198.51.100.52"]}}},
    ]))
    flow = _flow(5500)
    outcome = ev.outcome(flow)
    assert outcome.unnatted  # the interface is unknown: maybe no DNAT
    assert outcome.sends_to("198.51.100.51", 5500, flow, frozenset(LOCAL))
    assert not outcome.sends_to("198.51.100.53", 5500, flow, frozenset(LOCAL))
    # Known, the interface decides.
    assert _targets(ev, flow._replace(iif="br0")) == ((), True)
    assert ev.outcome(flow._replace(iif="eth0")).unnatted is False


def test_dnat_maps_anonymous_and_named() -> None:
    tgt = {"map": {"family": "ip", "table": "t", "name": "tgt", "type": "inet_service",
                   "map": "ipv4_addr . inet_service",
                   "elem": [[6000, {"concat": ["198.51.100.30", 7000]}]]}}
    objects = _ruleset(
        # udp dport 5600 dnat ip to udp dport map { 5600 : 198.51.100.60 }
        [_match(_payload("udp", "dport"), 5600),
         {"dnat": {"addr": {"map": {"key": _payload("udp", "dport"),
                                    "data": {"set": [[5600, "198.51.100.60"]]}}}}}],
        # udp dport 6000 dnat ip to udp dport map @tgt
        [_match(_payload("udp", "dport"), 6000),
         {"dnat": {"family": "ip", "addr": {"map": {"key": _payload("udp", "dport"),
                                                    "data": "@tgt"}}}}],
        extra=(tgt,),
    )
    ev = _evaluator(objects)
    assert _targets(ev, _flow(5600)) == (("198.51.100.60:5600",), False)
    assert _targets(ev, _flow(6000)) == (("198.51.100.30:7000",), False)


def test_named_sets_fib_type_and_ct_state() -> None:
    locals_set = {"set": {"family": "ip", "table": "t", "name": "nets", "type": "ipv4_addr",
                          "flags": ["interval"],
                          "elem": [{"prefix": {"addr": "192.0.2.0", "len": 24}},
                                   {"range": ["203.0.113.5", "203.0.113.9"]}]}}
    objects = _ruleset(
        [_match({"ct": {"key": "state"}}, "new", "in"),
         _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
         _match(_payload("ip", "saddr"), "@nets"),
         _match(_payload("udp", "dport"), {"range": [5200, 5210]}),
         {"counter": {"packets": 0, "bytes": 0}},
         {"dnat": {"addr": "198.51.100.40"}}],
        extra=(locals_set,),
    )
    ev = _evaluator(objects)
    assert _targets(ev, _flow(5205)) == (("198.51.100.40:5205",), False)
    assert _targets(ev, _flow(5205, saddr="203.0.113.7")) == (("198.51.100.40:5205",), False)
    assert _targets(ev, _flow(5205, saddr="203.0.113.10")) == ((), True)
    assert _targets(ev, _flow(5205, daddr="198.51.100.99")) == ((), True)  # not local


def test_numgen_random_may_pick_any_entry() -> None:
    objects = _ruleset(
        [_match(_payload("udp", "dport"), 6200),
         {"vmap": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}},
                   "data": {"set": [[0, {"goto": {"target": "a"}}],
                                    [1, {"goto": {"target": "b"}}]]}}}],
        [{"chain": "a"}, {"dnat": {"addr": "198.51.100.21"}}],
        [{"chain": "b"}, {"dnat": {"addr": "198.51.100.22"}}],
        chains=("a", "b"),
    )
    targets, _ = _targets(_evaluator(objects), _flow(6200))
    assert set(targets) == {"198.51.100.21:6200", "198.51.100.22:6200"}


def test_what_cannot_be_followed_is_undetermined_not_a_guess() -> None:
    # udp dport 7000 queue  -- a statement the model cannot follow
    ev = _evaluator(_ruleset([_match(_payload("udp", "dport"), 7000), {"queue": {"num": 1}}]))
    outcome = ev.outcome(_flow(7000))
    assert outcome.undetermined
    # An unreadable backend: nothing is determined at all.
    broken = Evaluator(NatRuleset((), ("iptables-legacy ipv4: python-iptables is missing",)))
    assert broken.outcome(_flow(7000)).undetermined


def test_a_jump_loop_is_bounded() -> None:
    objects = _ruleset(
        [_match(_payload("udp", "dport"), 7100), {"jump": {"target": "a"}}],
        [{"chain": "a"}, {"jump": {"target": "a"}}],
        chains=("a",),
    )
    assert _evaluator(objects).outcome(_flow(7100)).undetermined


def test_redirect_goes_to_a_local_address() -> None:
    redirect = [_match(_payload("udp", "dport"), 6300), {"redirect": {"port": 6301}}]
    ev = _evaluator(_ruleset(redirect))
    flow = _flow(6300)
    outcome = ev.outcome(flow)
    assert outcome.sends_to("198.51.100.13", 6301, flow, frozenset(LOCAL))
    assert not outcome.sends_to("198.51.100.22", 6301, flow, frozenset(LOCAL))


def test_a_flow_this_host_sends_meets_the_output_hook() -> None:
    objects = _ruleset(DNAT_B)
    objects[1]["chain"]["hook"] = "output"
    ev = _evaluator(objects)
    assert _targets(ev, _flow(5140)) == ((), True)
    assert _targets(ev, _flow(5140)._replace(local=True)) == (("198.51.100.22:5140",), False)


# -- iptables-legacy ------------------------------------------------------------------------


def _docker(target: str) -> LegacyTable:
    """Docker's published UDP port, as python-iptables reads the nat table."""
    return LegacyTable(
        "ipv4",
        (("PREROUTING", "ACCEPT"), ("INPUT", "ACCEPT"), ("OUTPUT", "ACCEPT"),
         ("POSTROUTING", "ACCEPT"), ("DOCKER", None)),
        (
            LegacyRule("PREROUTING", None, None, None, "ip",
                       (("addrtype", " --dst-type LOCAL"),), "DOCKER", "",
                       "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"),
            LegacyRule("DOCKER", None, None, "!docker0", "udp",
                       (("udp", " --dport 5140"),), "DNAT", f" --to-destination {target}",
                       f"-A DOCKER ! -i docker0 -p udp -m udp --dport 5140 -j DNAT "
                       f"--to-destination {target}"),
            LegacyRule("DOCKER", "192.0.2.0/255.255.255.0", None, None, "udp",
                       (("multiport", " --dports 6000:6010"),
                        ("statistic", " --mode random --probability 0.5")),
                       "DNAT", " --to-destination 198.51.100.30",
                       "-A DOCKER ... statistic ... -j DNAT --to-destination 198.51.100.30"),
        ),
    )


def test_legacy_docker_rules() -> None:
    ev = Evaluator(NatRuleset(tuple(legacy_chains(_docker("172.17.0.3:5140")))), LOCAL)
    flow = _flow(5140)
    outcome = ev.outcome(flow)
    assert outcome.describe(flow) == ("172.17.0.3:5140",)
    assert not outcome.sends_to("172.17.0.2", 5140, flow, frozenset(LOCAL))
    assert outcome.unnatted  # ! -i docker0: the interface is not known
    assert ev.outcome(flow._replace(iif="eth0")).unnatted is False
    # Not local: addrtype says no.
    assert _targets(ev, _flow(5140, daddr="203.0.113.1")) == ((), True)
    # statistic: maybe; the source network decides the rest.
    statistic = ev.outcome(_flow(6005))
    assert statistic.describe(_flow(6005)) == ("198.51.100.30:6005",) and statistic.unnatted
    assert _targets(ev, _flow(6005, saddr="203.0.113.1")) == ((), True)
    assert ev.forwarded_ports() == frozenset({5140, *range(6000, 6011)})


def test_legacy_ipv6_dnat_target() -> None:
    table = LegacyTable(
        "ipv6",
        (("PREROUTING", "ACCEPT"), ("OUTPUT", "ACCEPT")),
        (LegacyRule("PREROUTING", None, "2001:db8::13/128", None, "udp",
                    (("udp", " --dport 53"),), "DNAT", " --to-destination [2001:db8::53]:5353",
                    "-A PREROUTING -d 2001:db8::13/128 -p udp -m udp --dport 53 -j DNAT "
                    "--to-destination [2001:db8::53]:5353"),),
    )
    ev = Evaluator(NatRuleset(tuple(legacy_chains(table))), ())
    flow = Flow(socket.AF_INET6, 17, "2001:db8::3", 1, "2001:db8::13", 53)
    assert _targets(ev, flow) == (("[2001:db8::53]:5353",), False)
    # An IPv4 flow never meets an ip6 table.
    assert _targets(ev, _flow(53, daddr="198.51.100.13")) == ((), True)


def test_iptables_nft_xt_expressions_are_read_from_the_rule_text() -> None:
    """What Docker's rules look like through Debian's iptables (nf_tables): the JSON
    says `xt target DNAT` / `xt match addrtype` without options, nft's text says the
    rest (captured from `iptables -t nat -A ...` then `nft -j list ruleset`)."""
    objects = [
        {"chain": {"family": "ip", "table": "nat", "name": "DOCKER", "handle": 1}},
        {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "handle": 2,
                   "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "nat", "chain": "DOCKER", "handle": 4, "expr": [
            _match({"meta": {"key": "iifname"}}, "docker0", "!="),
            _match(_payload("udp", "dport"), 5140),
            {"counter": {"packets": 0, "bytes": 0}},
            {"xt": {"type": "target", "name": "DNAT"}}]}},
        {"rule": {"family": "ip", "table": "nat", "chain": "PREROUTING", "handle": 3, "expr": [
            {"xt": {"type": "match", "name": "addrtype"}},
            {"counter": {"packets": 0, "bytes": 0}},
            {"jump": {"target": "DOCKER"}}]}},
    ]
    texts = {
        ("ip", "nat", "DOCKER", 4): 'iifname != "docker0" udp dport 5140 counter dnat to '
                                    "172.17.0.2:5140",
        ("ip", "nat", "PREROUTING", 3): "fib daddr type local counter jump DOCKER",
    }
    ev = Evaluator(NatRuleset(tuple(nat_chains(objects, texts))), LOCAL)
    flow = _flow(5140)
    outcome = ev.outcome(flow)
    assert not outcome.undetermined
    assert outcome.describe(flow) == ("172.17.0.2:5140",)
    assert _targets(ev, _flow(5140, daddr="203.0.113.1")) == ((), True)  # not local
    # Without the text (an nft that cannot translate): undetermined, never a guess.
    assert Evaluator(NatRuleset(tuple(nat_chains(objects))), LOCAL).outcome(flow).undetermined
