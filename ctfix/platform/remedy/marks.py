"""ctfix's marks on kernel objects: whose is this object, and what no record explains.

The kernel is the truth, the state file a hint. Every object `ctfix fix` makes
carries marks for its port (see ctfix/core/plan.py): nftables table `inet
ctfix_<port>` whose rules are commented `ctfix:<port>`, `ip rule`s and routes of
protocol 199 in table 0xC7F00000+port, iptables-legacy rules commented
`ctfix:<port>`, ipsets `ctfix-<port>-v4|v6-<n>`; and what the kernel said when it was
made (an nftables table's handle) is recorded beside the step. `--revert` removes a
recorded step's object only when the kernel copy carries those marks (`foreign`
says why not, and then nothing is removed), and finds marked objects that no record
explains (`unrecorded`: a lost or edited state file) so that they can be removed
too. The checks themselves live in the backends (nftables.py, iproute.py,
legacy.py); this module only dispatches by the kind of step.

Know before changing: a backend's `unrecorded` must return only objects whose marks
are complete (a table named like ours but holding somebody else's rule is not ours),
and its `remove_marked` checks the marks again in the kernel right before removing.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ctfix.core.plan import Spec
from ctfix.errors import CtfixError, MissingFeatureError


class AlreadyThere(CtfixError):
    """A create found its object (or its name, its route slot) taken by somebody else.

    apply_plan drops that step from the record before rolling back, so the rollback
    never removes the object that was there.
    """


@dataclass(frozen=True, slots=True)
class Marked:
    """A kernel object that carries ctfix's marks for `port`."""

    port: int
    kind: str  # the kind of step that makes such objects ("nft-table", "ipset", ...)
    obj: str  # what it is, as --status and --revert print it
    key: tuple[str, ...]  # what its backend needs to find it again (and remove it)


#: kind of step -> (backend module, its ownership check). A check returns why the
#: recorded step's object is not ctfix's for the port, or None (ours, or gone).
_FOREIGN: dict[str, tuple[str, str]] = {
    "nft-table": ("nftables", "table_foreign"),
    "rule": ("iproute", "rule_foreign"),
    "route": ("iproute", "route_foreign"),
    "iptables-rule": ("legacy", "rule_foreign"),
    "ipset": ("legacy", "ipset_foreign"),
}
#: the backends that can find marked objects, and the order in which they are removed
#: (an iptables rule before the ipset it names; an ip rule before its table's routes)
_REMOVAL_ORDER = ("iptables-rule", "rule", "nft-table", "route", "ipset")
_FINDERS = ("legacy", "iproute", "nftables")


def _backend(name: str) -> Any:
    return importlib.import_module(f"ctfix.platform.remedy.{name}")


def foreign(spec: Spec, port: int, made: Mapping[str, Any]) -> str | None:
    """Why the recorded step's object must not be removed (None: it is ctfix's for
    the port, or it is not in the kernel)."""
    module, function = _FOREIGN[spec.kind]
    reason: str | None = getattr(_backend(module), function)(spec, port, made)
    return reason


def made(spec: Spec) -> dict[str, Any]:
    """What the kernel says about a step's object just made, to recognise it later."""
    if spec.kind != "nft-table":
        return {}
    found: dict[str, Any] = _backend("nftables").table_identity(spec)
    return found


def unrecorded(recorded: Iterable[tuple[int, Spec]], port: int | None = None) -> list[Marked]:
    """Objects with ctfix's marks (for `port`, or any) that no recorded step explains,
    in removal order. A backend that is not installed has nothing of ours."""
    steps = list(recorded)
    found: list[Marked] = []
    for name in _FINDERS:
        try:
            found.extend(_backend(name).unrecorded(steps))
        except MissingFeatureError:
            continue
    order = {kind: index for index, kind in enumerate(_REMOVAL_ORDER)}
    return sorted(
        (m for m in found if port is None or m.port == port),
        key=lambda m: (m.port, order[m.kind]),
    )


def remove_marked(marked: Marked) -> bool:
    """Remove it if it is still there with its marks; False when it was not."""
    module = _FOREIGN[marked.kind][0]
    removed: bool = _backend(module).remove_marked(marked)
    return removed


def remove_all(found: Sequence[Marked]) -> tuple[list[Marked], list[str]]:
    """(removed, failures): each is tried, a failure does not stop the others."""
    from ctfix.errors import CtfixError

    removed: list[Marked] = []
    failures: list[str] = []
    for marked in found:
        try:
            if remove_marked(marked):
                removed.append(marked)
        except CtfixError as err:
            failures.append(f"{marked.obj}: {err.one_line()}")
    return removed, failures
