"""Diagnosis + method -> Plan: the ordered, reversible steps of `ctfix fix`.

Pure: no sockets, no subprocess, no kernel. One module per method (policy_route,
snat_zone, bind), each registering one `PlanMethod`; `method()` is the one registry,
an exhaustive `match` over `Method` (the one list of methods, in ctfix.core.model),
so a method that is named but not built fails mypy, not a user. Step specs, their
serialisation and the names of ctfix's objects are in `specs`.

Know before changing: a step's spec is what the state file records and what
`--revert` undoes, possibly by a later ctfix version after a crash (see specs.py).
The order of steps is the order of safety, and undo runs in reverse.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from ctfix.core.model import Diagnosis, Method
from ctfix.core.plan.specs import (
    CLIENT_TIMEOUT,
    REROUTE_STEP,
    REROUTE_UPLINKS,
    RT_PROTO,
    RT_TABLE_BASE,
    RULE_PRIORITY,
    ConntrackEntrySpec,
    IpsetSpec,
    IptRuleSpec,
    NftTableSpec,
    RouteCheck,
    RouteSpec,
    RuleSpec,
    Spec,
    SpecKind,
    Step,
    XtExtension,
    comment,
    ipset_name,
    nft_table_name,
    reroute_table,
    spec_object,
    step_from_dict,
    step_to_dict,
    table_id,
)
from ctfix.core.plan.targets import Target
from ctfix.errors import CtfixError

Backend = Literal["iproute2", "nftables", "iptables-legacy", "ctnetlink", "none"]
#: every `ctfix fix --method`, in the order help and errors list them
METHODS: tuple[Method, ...] = typing.get_args(Method)
BACKENDS: tuple[Backend, ...] = typing.get_args(Backend)


@dataclass(frozen=True, slots=True)
class Plan:
    port: int
    method: Method
    backend: Backend
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()
    checks: tuple[RouteCheck, ...] = ()
    advice: tuple[str, ...] = ()  # method "bind": what to change in the application
    #: what the plan knowingly breaks (only with --force): printed before applying.
    warnings: tuple[str, ...] = ()
    #: False: its steps cannot be undone and need no undo (flush-stale deletes
    #: conntrack entries); it is applied without a state-file record.
    reversible: bool = True
    #: snat-zone: the clients it remembers (recorded, so --status can name services
    #: forwarded to the port after the fix)
    covers: tuple[Target, ...] = ()


class Build(Protocol):
    def __call__(
        self,
        diagnosis: Diagnosis,
        backend: Backend,
        *,
        force: bool,
        notes: tuple[str, ...],
        advice: tuple[str, ...],
        gateways: tuple[str, ...],
    ) -> Plan: ...


@dataclass(frozen=True, slots=True)
class PlanMethod:
    """One registered method: its name, the backends it can use (the first is the
    default), whether it changes the host (then it needs a socket or evidence on the
    port, unless forced), and its planner."""

    name: Method
    backends: tuple[Backend, ...]
    changes_host: bool
    build: Build


def method(name: Method) -> PlanMethod:
    """The registry: the PlanMethod of each name (its module is imported on use)."""
    match name:
        case "policy-route":
            from ctfix.core.plan import policy_route

            return policy_route.METHOD
        case "snat-zone":
            from ctfix.core.plan import snat_zone

            return snat_zone.METHOD
        case "bind":
            from ctfix.core.plan import bind

            return bind.METHOD
        case "flush-stale":
            from ctfix.core.plan import flush_stale

            return flush_stale.METHOD
        case _:
            typing.assert_never(name)


def make_plan(
    diagnosis: Diagnosis,
    method_name: Method,
    backend: Backend | None = None,
    *,
    force: bool = False,
    notes: tuple[str, ...] = (),
    advice: tuple[str, ...] = (),
    gateways: tuple[str, ...] = (),
) -> Plan:
    """The steps that fix `diagnosis.port` by `method_name`, or a CtfixError saying
    why not. `backend` defaults to the method's first (snat-zone: nftables).
    `gateways` (`fix --gateway`): the router of an uplink replies must leave by, where
    the host's routes do not tell it (ADDR, or ADDR%IFACE for a link-local one)."""
    if method_name not in METHODS:
        raise CtfixError(f"unknown method {method_name!r}", f"use one of {', '.join(METHODS)}")
    chosen = method(method_name)
    backend = backend or chosen.backends[0]
    if backend not in chosen.backends:
        raise CtfixError(
            f"{method_name} needs {' or '.join(chosen.backends)}, not {backend}"
        )
    port = diagnosis.port
    if (
        chosen.changes_host
        and not diagnosis.listeners
        and not diagnosis.evidence.wrong_source
        and not force
    ):
        raise CtfixError(
            f"no UDP socket on port {port} and no evidence of wrong-source replies",
            f"check the port (`ctfix explain {port}`), or pass --force to plan anyway",
        )
    return chosen.build(
        diagnosis, backend, force=force, notes=notes, advice=advice, gateways=gateways
    )


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "port": plan.port,
        "method": plan.method,
        "backend": plan.backend,
        "notes": list(plan.notes),
        "warnings": list(plan.warnings),
        "advice": list(plan.advice),
        "checks": [asdict(c) for c in plan.checks],
        "covers": [cover_to_dict(t) for t in plan.covers],
        "steps": [step_to_dict(s) for s in plan.steps],
        "reversible": plan.reversible,
    }


def cover_to_dict(target: Target) -> dict[str, Any]:
    """A covered target as the state file and --json record it."""
    return {
        "service": target.service,
        "target": target.reply_source,
        "label": target.label,
        "hooks": list(target.hooks),
    }


__all__ = [
    "BACKENDS",
    "CLIENT_TIMEOUT",
    "METHODS",
    "REROUTE_STEP",
    "REROUTE_UPLINKS",
    "RT_PROTO",
    "RT_TABLE_BASE",
    "RULE_PRIORITY",
    "Backend",
    "ConntrackEntrySpec",
    "IpsetSpec",
    "IptRuleSpec",
    "NftTableSpec",
    "Plan",
    "PlanMethod",
    "RouteCheck",
    "RouteSpec",
    "RuleSpec",
    "Spec",
    "SpecKind",
    "Step",
    "Target",
    "XtExtension",
    "comment",
    "cover_to_dict",
    "ipset_name",
    "make_plan",
    "method",
    "nft_table_name",
    "plan_to_dict",
    "reroute_table",
    "spec_object",
    "step_from_dict",
    "step_to_dict",
    "table_id",
]
