"""The registry of step kinds: for each kind of spec, the backend functions that make,
remove, find and check it (`create`, `remove`, `present`, `present_all`, `clash`).

Know before changing: `_operations` is an exhaustive match over `Spec`: a new kind
of step fails mypy until it has a case here, and a spec of a kind this ctfix does not
know (a newer state file, a bug) raises instead of reaching another kind's backend.
Backends are imported only when a step of theirs is met.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import takewhile
from typing import NamedTuple, Never, NoReturn

from ctfix.core.plan import (
    ConntrackEntrySpec,
    IpsetSpec,
    IptRuleSpec,
    NftTableSpec,
    RouteSpec,
    RuleSpec,
    Spec,
)
from ctfix.errors import CtfixError


class _Operations(NamedTuple):
    """What can be done with one step's object, bound to its spec."""

    create: Callable[[], None]
    remove: Callable[[], bool]  # False: it was not there
    present: Callable[[], bool]
    #: why creating it would clash with what is in the kernel now (None: it would not)
    clash: Callable[[], str | None]


def _operations(spec: Spec) -> _Operations:
    """The registry: the backend functions for each kind of step (imported only when
    needed). Exhaustive: a spec kind without a case fails mypy here, and a spec of a
    kind this ctfix does not know (a newer state file, a bug) raises instead of
    reaching another kind's backend."""
    match spec:
        case RouteSpec() as route:
            from ctfix.platform.remedy import iproute

            return _Operations(
                partial(iproute.create_route, route),
                partial(iproute.remove_route, route),
                partial(iproute.route_present, route),
                partial(iproute.route_clash, route),
            )
        case RuleSpec() as rule:
            from ctfix.platform.remedy import iproute

            return _by_name(
                partial(iproute.create_rule, rule),
                partial(iproute.remove_rule, rule),
                partial(iproute.rule_present, rule),
            )
        case NftTableSpec() as table:
            from ctfix.platform.remedy import nftables

            return _by_name(
                partial(nftables.create_table, table),
                partial(nftables.remove_table, table),
                partial(nftables.table_present, table),
            )
        case IpsetSpec() as ipset:
            from ctfix.platform.remedy import legacy

            return _by_name(
                partial(legacy.create_ipset, ipset),
                partial(legacy.remove_ipset, ipset),
                partial(legacy.ipset_present, ipset),
            )
        case IptRuleSpec() as ipt_rule:
            from ctfix.platform.remedy import legacy

            return _by_name(
                partial(legacy.create_rule, ipt_rule),
                partial(legacy.remove_rule, ipt_rule),
                partial(legacy.rule_present, ipt_rule),
            )
        case ConntrackEntrySpec() as entry:
            from ctfix.platform.remedy import conntrack

            return _Operations(
                partial(conntrack.delete_entry, entry),
                partial(conntrack.cannot_undo, entry),
                partial(conntrack.entry_gone, entry),
                partial(conntrack.no_clash, entry),
            )
        case _:
            _unknown_kind(spec)


def _unknown_kind(spec: Never) -> NoReturn:
    """mypy proves this unreachable (every Spec has a case); at run time it is the
    refusal for anything else."""
    kind = getattr(spec, "kind", type(spec).__name__)
    raise CtfixError(
        f"a step of kind {kind!r} that this ctfix cannot make or remove",
        "is the state file from a newer ctfix? revert with that version",
    )


def _by_name(
    create: Callable[[], None], remove: Callable[[], bool], present: Callable[[], bool]
) -> _Operations:
    """For objects known by name alone: creating clashes when the name is taken."""

    def clash() -> str | None:
        return "it is already in the kernel" if present() else None

    return _Operations(create, remove, present, clash)


def create(spec: Spec) -> None:
    _operations(spec).create()


def remove(spec: Spec) -> bool:
    """Remove the object if it exists; False when it was not there."""
    return _operations(spec).remove()


def remove_each(specs: Sequence[Spec]) -> Iterator[bool | CtfixError]:
    """`remove` of each spec in order, yielding each outcome (an error is that step's,
    and the next ones are still tried) as soon as it is known, so the caller records
    it before the next removal. A run of iptables-legacy rules is removed at once, in
    one child per family (see `legacy.remove_rules`); the steps around it keep their
    order (rules go before the ipsets they name)."""
    index = 0
    while index < len(specs):
        rules = list(takewhile(lambda s: isinstance(s, IptRuleSpec), specs[index:]))
        if rules:
            from ctfix.platform.remedy import legacy

            yield from legacy.remove_rules([s for s in rules if isinstance(s, IptRuleSpec)])
            index += len(rules)
            continue
        try:
            yield remove(specs[index])
        except CtfixError as err:
            yield err
        index += 1


def present(spec: Spec) -> bool:
    return _operations(spec).present()


def present_all(specs: Sequence[Spec]) -> list[bool]:
    """`present` of each spec, iptables-legacy rules read in one go (see
    `legacy.rules_found`)."""
    found = [False] * len(specs)
    rules = [(i, s) for i, s in enumerate(specs) if isinstance(s, IptRuleSpec)]
    if rules:
        from ctfix.platform.remedy import legacy

        for (index, _spec), answer in zip(
            rules, legacy.rules_found([s for _i, s in rules]), strict=True
        ):
            found[index] = answer
    for index, spec in enumerate(specs):
        if not isinstance(spec, IptRuleSpec):
            found[index] = present(spec)
    return found


def clash(spec: Spec) -> str | None:
    """Why the step cannot be made without touching something already there."""
    return _operations(spec).clash()
