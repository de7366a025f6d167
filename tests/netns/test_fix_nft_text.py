"""The `nft -f` text `ctfix fix` shows loads the same ruleset as the JSON it applies.

What a user notices: pasting the printed table into `nft -f` (or reviewing it) gives
exactly what `--apply` makes. The kernel is the judge: each form is loaded into the
lab's host namespace in turn and `nft -j list table` must print the same objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from ctfix.core.model import ClientNetwork, Diagnosis, Listener, Uplink
from ctfix.core.plan import NftTableSpec, make_plan
from ctfix.core.plan.nft_syntax import NftCommand, render_batch
from ctfix.lab.topology import (
    BRIDGE_V4,
    BRIDGE_V6,
    CONTAINER_NET_V4,
    CONTAINER_NET_V6,
    UPLINK_V4,
    UPLINK_V6,
    Topology,
    lab_topology,
)

PORT = 56789


@pytest.fixture
def host_lab() -> Iterator[Topology]:
    with lab_topology(ipv6=True, netfilter="none") as topo:
        yield topo


def snat_zone_table(reroute: bool = False) -> NftTableSpec:
    """The snat-zone table; with `reroute`, as on a host with two uplinks (the replies
    to the uplink address's clients are also marked in a `route` chain)."""
    listeners = (
        Listener("0.0.0.0", PORT, "ipv4", "listening"),
        Listener("::", PORT, "ipv6", "listening", v6only=True),
    )
    uplinks = (
        (Uplink(UPLINK_V4, "eth0", "198.51.100.0/24", "198.51.100.1", "default", True,
                ok=False),),
        (Uplink(UPLINK_V6, "eth0", "2001:db8:2::/64", "2001:db8:2::1", "default", True,
                ok=False),),
    ) if reroute else ((), ())
    clients = (
        ClientNetwork(CONTAINER_NET_V4, (UPLINK_V4, BRIDGE_V4), BRIDGE_V4, False, "br0", True,
                      uplinks=uplinks[0]),
        ClientNetwork(CONTAINER_NET_V6, (UPLINK_V6,), BRIDGE_V6, False, "br0", True,
                      uplinks=uplinks[1]),
    )
    diagnosis = Diagnosis(
        PORT, "host", "broken", (), listeners=listeners, clients=clients,
        local_addresses=(BRIDGE_V4, UPLINK_V4, BRIDGE_V6, UPLINK_V6),
    )
    step = make_plan(diagnosis, "snat-zone", "nftables").steps[-1]
    assert isinstance(step.spec, NftTableSpec)
    return step.spec


def _other_statements() -> list[NftCommand]:
    """What the renderer claims beyond snat-zone (marks, ct zone matches, dnat,
    masquerade, prefixes): the forms the next methods (reroute, DNAT-aware zones)
    are built from."""
    base = {"family": "inet", "table": "ctfix_render"}
    ip_saddr = {"payload": {"protocol": "ip", "field": "saddr"}}
    rules: list[list[dict[str, Any]]] = [
        [
            {"match": {"op": "!=", "left": ip_saddr, "right": UPLINK_V4}},
            {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 2}},
        ],
        [
            {"match": {"op": "==", "left": {"ct": {"key": "zone"}}, "right": 60002}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}},
                       "right": PORT}},
            {"snat": {"family": "ip", "addr": UPLINK_V4, "port": PORT}},
        ],
        [
            {"match": {"op": "==", "left": ip_saddr,
                       "right": {"prefix": {"addr": "192.0.2.0", "len": 24}}}},
            {"masquerade": None},
        ],
    ]
    return [
        {"add": {"table": {"family": "inet", "name": "ctfix_render"}}},
        {"add": {"chain": {**base, "name": "pre", "type": "nat", "hook": "prerouting",
                           "prio": -100, "policy": "accept"}}},
        {"add": {"chain": {**base, "name": "post", "type": "nat", "hook": "postrouting",
                           "prio": 100, "policy": "accept"}}},
        {"add": {"rule": {**base, "chain": "pre", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                       "right": 40054}},
            {"dnat": {"family": "ip", "addr": "203.0.113.130", "port": 40053}},
        ]}}},
        *({"add": {"rule": {**base, "chain": "post", "expr": expr, "comment": "c"}}}
          for expr in rules),
    ]


def _listed(topo: Topology, family: str, name: str) -> list[dict[str, Any]]:
    """The table as the kernel lists it, without handles (they differ per load)."""
    out = json.loads(topo.run(topo.host, "nft", "-j", "list", "table", family, name))
    objects = []
    for obj in out["nftables"]:
        if "metainfo" in obj:
            continue
        [(kind, body)] = obj.items()
        objects.append({kind: {k: v for k, v in body.items() if k != "handle"}})
    return objects


@pytest.mark.parametrize("which", ["snat-zone", "snat-zone with reroute", "other statements"])
def test_text_and_batch_load_the_same_ruleset(host_lab: Topology, which: str) -> None:
    if which.startswith("snat-zone"):
        spec = snat_zone_table(reroute=which.endswith("reroute"))
        assert ("type route hook output" in spec.text) is which.endswith("reroute")
        batch, family, name = list(spec.batch), spec.family, spec.name
        text = spec.text
    else:
        batch, family, name = _other_statements(), "inet", "ctfix_render"
        text = render_batch(batch)
    topo = host_lab
    topo.run(topo.host, "nft", "-j", "-f", "-", stdin=json.dumps({"nftables": batch}))
    from_json = _listed(topo, family, name)
    topo.run(topo.host, "nft", "delete", "table", family, name)
    topo.run(topo.host, "nft", "-f", "-", stdin=text)
    from_text = _listed(topo, family, name)
    topo.run(topo.host, "nft", "delete", "table", family, name)
    assert from_json and from_text == from_json
