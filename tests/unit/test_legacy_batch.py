"""Reverting iptables-legacy rules in one child per family instead of one per rule:
the order of removals, per-step outcomes, and which rules reach a child. No root:
the child and the ipset listing are stand-ins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ctfix.core.model import Family
from ctfix.core.plan.specs import IpsetSpec, IptRuleSpec, XtExtension
from ctfix.errors import CtfixError
from ctfix.platform import iptables_legacy
from ctfix.platform.remedy import legacy, registry


def rule(family: Family, chain: str, ipset: str | None = None) -> IptRuleSpec:
    matches: tuple[XtExtension, ...] = (XtExtension("comment", (("comment", "ctfix:56789"),)),)
    if ipset:
        matches += (XtExtension("set", (("match-set", f"{ipset} dst,dst"),)),)
    return IptRuleSpec(family, "nat", chain, "udp", None, None, matches, XtExtension("ACCEPT"))


def test_a_run_of_rules_is_removed_at_once_between_the_steps_around_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rules go in one batch after the step before them and before the ipset
    after them (a set in use cannot be destroyed); each step keeps its own outcome
    and an error in one does not stop the others."""
    calls: list[Any] = []
    first, last = IpsetSpec("ctfix-56789-v4-1", "ipv4"), IpsetSpec("ctfix-56789-v4-0", "ipv4")
    rules = [rule("ipv4", "POSTROUTING"), rule("ipv6", "POSTROUTING"), rule("ipv4", "OUTPUT")]
    refused = CtfixError("iptables-legacy said no")

    def remove(spec: Any) -> bool:
        calls.append(spec)
        if spec == last:
            raise CtfixError("ipset said no")
        return True

    def remove_rules(specs: list[IptRuleSpec]) -> list[bool | CtfixError]:
        calls.append(tuple(specs))
        return [True, refused, False]

    monkeypatch.setattr(registry, "remove", remove)
    monkeypatch.setattr(legacy, "remove_rules", remove_rules)
    outcomes = registry.remove_each([first, *rules, last])
    assert next(outcomes) is True and calls == [first]  # nothing removed ahead of time
    rest = list(outcomes)
    assert calls == [first, tuple(rules), last]
    assert rest[:3] == [True, refused, False]
    assert isinstance(rest[3], CtfixError) and rest[3].message == "ipset said no"


def test_one_child_per_family_and_no_look_for_a_rule_naming_a_missing_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    children: list[list[IptRuleSpec]] = []

    def in_child(function: Callable[..., Any], specs: list[IptRuleSpec]) -> list[bool]:
        assert function is legacy._delete_each
        children.append(specs)
        return [True] * len(specs)

    monkeypatch.setattr(iptables_legacy, "in_child", in_child)
    monkeypatch.setattr(legacy, "ipset_names", lambda: ["ctfix-56789-v4-0"])
    specs = [
        rule("ipv4", "POSTROUTING", "ctfix-56789-v4-0"),
        rule("ipv6", "POSTROUTING"),
        rule("ipv4", "OUTPUT", "ctfix-56789-v4-9"),  # its set is gone: it cannot be there
        rule("ipv4", "PREROUTING"),
    ]
    assert legacy.remove_rules(specs) == [True, True, False, True]
    assert children == [[specs[0], specs[3]], [specs[1]]]


def test_a_child_that_fails_fails_each_of_its_rules_and_not_the_other_family(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = CtfixError("another program has held the xtables lock")

    def in_child(_function: Callable[..., Any], specs: list[IptRuleSpec]) -> list[bool]:
        if specs[0].family == "ipv4":
            raise held
        return [True] * len(specs)

    monkeypatch.setattr(iptables_legacy, "in_child", in_child)
    specs = [rule("ipv4", "POSTROUTING"), rule("ipv6", "POSTROUTING"), rule("ipv4", "OUTPUT")]
    assert legacy.remove_rules(specs) == [held, True, held]
    with pytest.raises(CtfixError, match="xtables lock"):
        legacy.remove_rule(specs[0])
