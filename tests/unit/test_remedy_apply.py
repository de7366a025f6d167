"""apply_plan's bookkeeping against a fake kernel: what it records, what a rollback
removes, which tables choose_backend counts, and the state file's lock.

The fake kernel is a set of step specs; no root, no netlink.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ctfix.core.model import ClientNetwork, Diagnosis, Listener
from ctfix.core.plan import Plan, Spec, make_plan
from ctfix.errors import CtfixError
from ctfix.platform import remedy
from ctfix.platform.fixstate import FixState
from ctfix.platform.remedy import registry

PORT = 56789
KEY = "netns-cookie-test"


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    return tmp_path


def policy_route_plan(port: int = PORT) -> Plan:
    listener = Listener("0.0.0.0", port, "ipv4", "listening", pid=42, process="socat")
    clients = (
        ClientNetwork("192.0.2.0/24", ("198.51.100.13",), "192.0.2.1", False, "br0", True),
        ClientNetwork("203.0.113.0/24", ("198.51.100.13",), "203.0.113.1", False, "br1", True),
    )
    diagnosis = Diagnosis(
        port=port, netns="host", verdict="broken", reasons=(), listeners=(listener,),
        clients=clients, local_addresses=("192.0.2.1", "203.0.113.1", "198.51.100.13"),
    )
    return make_plan(diagnosis, "policy-route")


class FakeKernel:
    """Objects by their step's spec; `foreign` ones were there before ctfix ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.objects: set[Spec] = set()
        self.foreign: set[Spec] = set()
        self.appears_meanwhile: set[Spec] = set()  # made by somebody else mid-apply
        self.removed: list[Spec] = []
        monkeypatch.setattr(registry, "create", self.create)
        monkeypatch.setattr(registry, "remove", self.remove)
        monkeypatch.setattr(registry, "present", lambda spec: spec in self.objects)
        monkeypatch.setattr(
            registry, "clash", lambda spec: "it is already in the kernel" if spec in self.objects
            else None,
        )
        monkeypatch.setattr(remedy, "_legacy_tables", lambda: {"ipv4": set(), "ipv6": set()})

    def create(self, spec: Spec) -> None:
        if spec in self.appears_meanwhile:
            self.objects.add(spec)
            self.foreign.add(spec)
        if spec in self.objects:
            raise remedy.AlreadyThere("exists already")
        self.objects.add(spec)

    def remove(self, spec: Spec) -> bool:
        if spec not in self.objects:
            return False
        self.objects.discard(spec)
        self.removed.append(spec)
        return True


def fine(_plan: Plan) -> list[str]:
    return []


def test_an_object_already_there_is_refused_before_anything_is_recorded(
    monkeypatch: pytest.MonkeyPatch, state_dir: Path
) -> None:
    """B1: a route or rule in ctfix's range that this namespace's record does not
    list (somebody else's, or a lost state file) stays; nothing is made or recorded."""
    kernel = FakeKernel(monkeypatch)
    plan = policy_route_plan()
    kernel.objects.add(plan.steps[-1].spec)
    kernel.foreign.add(plan.steps[-1].spec)
    state = FixState.load("host", KEY)
    with pytest.raises(CtfixError) as refused:
        remedy.apply_plan(plan, state, fine)
    line = refused.value.one_line()
    assert "no record of making it" in line and "nothing changed" in line
    assert "\n" not in line
    assert kernel.objects == kernel.foreign and kernel.removed == []
    assert FixState.load("host", KEY).fixes == {}


def test_an_object_somebody_makes_during_the_apply_survives_the_rollback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B1, the race: the check passed, then somebody else made the last step's object.
    The rollback removes the steps this run made, and only those."""
    kernel = FakeKernel(monkeypatch)
    plan = policy_route_plan()
    theirs = plan.steps[-1].spec
    kernel.appears_meanwhile.add(theirs)
    state = FixState.load("host", KEY)
    with pytest.raises(CtfixError) as failed:
        remedy.apply_plan(plan, state, fine)
    made = len(plan.steps) - 1
    assert f"rolled back {made} step(s) already made; nothing changed" in failed.value.message
    assert kernel.objects == {theirs}
    assert theirs not in kernel.removed
    assert sorted(map(repr, kernel.removed)) == sorted(repr(s.spec) for s in plan.steps[:-1])
    assert FixState.load("host", KEY).fixes == {}


def test_choose_backend_does_not_count_ctfix_own_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """While `ctfix watch --track` runs (table ctfix_watch_<pid>) next to an earlier
    fix (ctfix_<port>), a namespace with no rules of its own still has none; the lab's
    own ctfix_lab table is a real user of netfilter and counts."""
    from ctfix.platform import iptables_legacy, nft

    def ruleset_of(*tables: str) -> list[dict[str, Any]]:
        objects: list[dict[str, Any]] = []
        for name in tables:
            objects.append({"table": {"family": "inet", "name": name}})
            objects.append({"chain": {"family": "inet", "table": name, "name": "c",
                                      "type": "nat"}})
        return objects

    monkeypatch.setattr(iptables_legacy, "in_use", lambda: False)
    monkeypatch.setattr(nft, "ruleset", lambda: ruleset_of("ctfix_watch_4242", "ctfix_5000"))
    assert remedy.choose_backend(None) == ("nftables", "the namespace holds no netfilter rules")
    monkeypatch.setattr(nft, "ruleset", lambda: ruleset_of("ctfix_watch_4242", "ctfix_lab"))
    assert remedy.choose_backend(None) == ("nftables", "the namespace's rules are in nftables")


def test_a_second_apply_waits_for_the_lock_then_fails_in_one_line() -> None:
    """B4: while one apply or revert holds the namespace's state, another cannot load
    it to overwrite the record; it gives up after the timeout, changing nothing."""
    with FixState.locked("host", KEY) as first:
        assert first.fixes == {}
        with pytest.raises(CtfixError) as waited, FixState.locked("host", KEY, timeout=0.2):
            pytest.fail("two holders of one namespace's state")
        assert "nothing changed" in waited.value.one_line()
    with FixState.locked("host", KEY) as again:  # released on exit
        assert again.fixes == {}


def test_a_step_of_an_unknown_kind_reaches_no_backend() -> None:
    """The registry is exhaustive: a spec kind it has no case for (a newer state file,
    a new method wired up only halfway) is refused, never handed to another kind's
    backend (the first release sent anything unknown to iptables code)."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class TeleportSpec:
        kind: str = "teleport"

    unknown: Any = TeleportSpec()
    for operation in (remedy.create, remedy.remove, remedy.present, remedy.clash):
        with pytest.raises(CtfixError, match="'teleport' that this ctfix cannot make"):
            operation(unknown)
