"""The `nft -f` text ctfix shows is rendered from the JSON batch it applies.

tests/netns/test_fix_nft_text.py checks that the kernel loads the same ruleset from
both; here: the rendering itself, and that nothing unknown is silently dropped.
"""

from __future__ import annotations

import pytest

from ctfix.core.model import ClientNetwork, Diagnosis, Listener
from ctfix.core.plan import NftTableSpec, make_plan
from ctfix.core.plan.nft_syntax import render_batch, rule_text

PORT = 56789

EXPECTED = """\
table inet ctfix_56789 {
\tset clients4_0 {
\t\ttype ipv4_addr . inet_service
\t\tflags timeout
\t\ttimeout 180s
\t}
\tset clients6_0 {
\t\ttype ipv6_addr . inet_service
\t\tflags timeout
\t\ttimeout 180s
\t}
\tchain remember_clients {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tip daddr 198.51.100.13 udp dport 56789 update @clients4_0 { ip saddr . udp sport } \
comment "ctfix:56789"
\t\tip daddr != 198.51.100.13 udp dport 56789 fib daddr type local delete @clients4_0 \
{ ip saddr . udp sport } comment "ctfix:56789"
\t\tip6 daddr 2001:db8:2::13 udp dport 56789 update @clients6_0 { ip6 saddr . udp sport } \
comment "ctfix:56789"
\t\tip6 daddr != 2001:db8:2::13 udp dport 56789 fib daddr type local delete @clients6_0 \
{ ip6 saddr . udp sport } comment "ctfix:56789"
\t}
\tchain reply_zone {
\t\ttype filter hook output priority raw; policy accept;
\t\tip saddr != 198.51.100.13 udp sport 56789 ip daddr . udp dport @clients4_0 \
ct zone set 51185 comment "ctfix:56789"
\t\tip6 saddr != 2001:db8:2::13 udp sport 56789 ip6 daddr . udp dport @clients6_0 \
ct zone set 51186 comment "ctfix:56789"
\t}
\tchain reply_snat {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr != 198.51.100.13 udp sport 56789 ip daddr . udp dport @clients4_0 \
snat ip to 198.51.100.13:56789 comment "ctfix:56789"
\t\tip6 saddr != 2001:db8:2::13 udp sport 56789 ip6 daddr . udp dport @clients6_0 \
snat ip6 to [2001:db8:2::13]:56789 comment "ctfix:56789"
\t}
}
"""


def snat_zone_spec() -> NftTableSpec:
    listeners = (
        Listener("0.0.0.0", PORT, "ipv4", "listening", pid=42, process="socat"),
        Listener("::", PORT, "ipv6", "listening", pid=43, process="socat", v6only=True),
    )
    clients = (
        ClientNetwork(
            "192.0.2.0/24", ("198.51.100.13", "192.0.2.1"), "192.0.2.1", False, "br0", True
        ),
        ClientNetwork("2001:db8:1::/64", ("2001:db8:2::13",), "2001:db8:1::1", False, "br0", True),
    )
    diagnosis = Diagnosis(
        PORT, "host", "broken", (), listeners=listeners, clients=clients,
        local_addresses=("192.0.2.1", "198.51.100.13", "2001:db8:1::1", "2001:db8:2::13"),
    )
    [step] = make_plan(diagnosis, "snat-zone", "nftables").steps
    assert isinstance(step.spec, NftTableSpec)
    return step.spec


def test_the_shown_table_is_the_batch_in_nft_syntax() -> None:
    spec = snat_zone_spec()
    assert spec.text == EXPECTED
    assert render_batch(spec.batch) == EXPECTED


def test_the_dry_run_command_carries_the_rendered_text() -> None:
    spec = snat_zone_spec()
    listeners = (Listener("0.0.0.0", PORT, "ipv4", "listening"),)
    clients = (ClientNetwork("192.0.2.0/24", ("198.51.100.13",), "192.0.2.1", False, "br0"),)
    diagnosis = Diagnosis(PORT, "host", "at-risk", (), listeners=listeners, clients=clients)
    [step] = make_plan(diagnosis, "snat-zone", "nftables").steps
    assert isinstance(step.spec, NftTableSpec)
    assert step.commands == (f"nft -f - <<'EOF'\n{step.spec.text}EOF",)
    assert "clients6_0" not in step.spec.text and "clients6_0" in spec.text


@pytest.mark.parametrize(
    ("statement", "text"),
    [
        ({"mangle": {"key": {"meta": {"key": "mark"}}, "value": 2}}, "meta mark set 0x2"),
        ({"dnat": {"family": "ip", "addr": "203.0.113.130", "port": 40053}},
         "dnat ip to 203.0.113.130:40053"),
        ({"masquerade": None}, "masquerade"),
        ({"counter": None}, "counter"),
        ({"match": {"op": "==", "left": {"ct": {"key": "zone"}}, "right": 60002}},
         "ct zone 60002"),
        ({"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "right": {"prefix": {"addr": "192.0.2.0", "len": 24}}}},
         "ip saddr != 192.0.2.0/24"),
    ],
)
def test_statements_beyond_snat_zone(statement: dict[str, object], text: str) -> None:
    assert rule_text({"expr": [statement]}) == text


@pytest.mark.parametrize(
    "command",
    [
        {"add": {"rule": {"family": "inet", "table": "t", "chain": "c",
                          "expr": [{"queue": {"num": 1}}]}}},
        {"add": {"map": {"family": "inet", "table": "t", "name": "m"}}},
        {"delete": {"table": {"family": "inet", "name": "t"}}},
    ],
)
def test_what_it_cannot_render_is_an_error_not_an_omission(command: dict[str, object]) -> None:
    head = [
        {"add": {"table": {"family": "inet", "name": "t"}}},
        {"add": {"chain": {"family": "inet", "table": "t", "name": "c"}}},
    ]
    with pytest.raises(ValueError, match="cannot render"):
        render_batch([*head, command])
