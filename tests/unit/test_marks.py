"""Which recorded steps ctfix may act on: its marks for the port, checked by name
before the kernel is asked (issue 9 item 1). No root, no kernel: every case here is
refused on the record alone."""

from __future__ import annotations

import pytest

from ctfix.core.plan import (
    IpsetSpec,
    IptRuleSpec,
    NftTableSpec,
    RouteSpec,
    RuleSpec,
    Spec,
    XtExtension,
    table_id,
)
from ctfix.platform.remedy import marks

PORT = 6000
RULE = IptRuleSpec(
    "ipv4", "nat", "POSTROUTING", "udp", "!198.51.100.13", None,
    (XtExtension("udp", (("sport", "6000"),)),),
    XtExtension("SNAT", (("to-source", "198.51.100.13:6000"),)),
)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        # A tampered record: the type says inet, the file said ip.
        (NftTableSpec("ip", "nat", ()), "table ip nat"),  # type: ignore[arg-type]
        (NftTableSpec("inet", "ctfix_6001", ()), "table inet ctfix_6001"),
        (IpsetSpec("docker-set", "ipv4"), "ipset docker-set"),
        (IpsetSpec("ctfix-6001-v4-0", "ipv4"), "ipset ctfix-6001-v4-0"),
        (RouteSpec("ipv4", "0.0.0.0/0", "eth0", "192.0.2.1", 254, 3), "route 0.0.0.0/0"),
        (RouteSpec("ipv4", "192.0.2.0/24", "br0", "192.0.2.1", table_id(PORT), 2), "protocol 2"),
        (RuleSpec("ipv4", PORT, 254), "table 254"),
        (RuleSpec("ipv4", 53, table_id(53)), "UDP port 53"),
        (RULE, "does not carry ctfix's comment ctfix:6000"),
    ],
)
def test_a_record_naming_what_is_not_ours_is_refused_by_name(spec: Spec, named: str) -> None:
    why = marks.foreign(spec, PORT, {})
    assert why is not None and named in why


def test_ctfix_own_names_pass_the_record_check() -> None:
    own = RuleSpec("ipv6", PORT, table_id(PORT))
    assert marks.foreign(own, PORT, {}) is None
    route = RouteSpec("ipv4", "192.0.2.0/24", "br0", "198.51.100.13", table_id(PORT))
    assert marks.foreign(route, PORT, {}) is None
    tagged = IptRuleSpec(
        RULE.family, RULE.table, RULE.chain, RULE.protocol, RULE.source, RULE.destination,
        (*RULE.matches, XtExtension("comment", (("comment", "ctfix:6000"),))), RULE.target,
    )
    assert marks.foreign(tagged, PORT, {}) is None
    assert marks.foreign(tagged, PORT + 1, {}) is not None


def test_a_watch_table_owner_is_dead_only_when_provably_gone() -> None:
    """Item 4: pid reuse and other pid namespaces (no kernel needed: /proc only)."""
    from ctfix.platform import watchtables

    me = watchtables.own_name()
    assert watchtables.owner(me) == "self"
    pid, start, pidns = (int(part) for part in me.removeprefix("ctfix_watch_").split("_"))
    assert watchtables.owner(f"ctfix_watch_{pid}_{start + 1}_{pidns}") == "dead"  # reused
    assert watchtables.owner(f"ctfix_watch_{pid}_{start}_{pidns + 1}") == "unknown"
    assert watchtables.owner(f"ctfix_watch_{2**22 + 1}_{start}_{pidns}") == "dead"
    assert watchtables.owner(f"ctfix_watch_{pid}") == "unknown"  # the first release's name
    assert watchtables.owner("ctfix_watch_other") is None and watchtables.owner("ctfix_1") is None


def test_choose_backend_does_not_count_watch_tables_of_either_naming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ctfix.platform import iptables_legacy, nft, remedy

    monkeypatch.setattr(iptables_legacy, "in_use", lambda: False)
    monkeypatch.setattr(nft, "ruleset", lambda: [
        {"table": {"family": "ip", "name": "ctfix_watch_4242_99_4026531836"}},
        {"table": {"family": "ip6", "name": "ctfix_watch_4242"}},
    ])
    assert remedy.choose_backend(None) == ("nftables", "the namespace holds no netfilter rules")
