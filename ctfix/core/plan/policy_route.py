"""The policy-route method: a route per broken client network with the right source,
and one `ip rule` per family that sends the port's replies through that table.

Pure. Know before changing: a route gives all replies to a network ONE source, so it
is right only where each client network addresses one local address; it must refuse
(or, with --force, warn) when clients that may address another of the host's addresses
(on their link: their gateway) would be answered from the routed one. Routes come
before the rule that makes them used.
"""

from __future__ import annotations

from ctfix.core.addr import unmap
from ctfix.core.detectors.wrong_source_words import conntrack_memory
from ctfix.core.model import ClientNetwork, Diagnosis, Family
from ctfix.core.plan import Backend, Plan, PlanMethod, reroute, targets
from ctfix.core.plan.probes import probe_address
from ctfix.core.plan.specs import (
    RT_PROTO,
    RULE_PRIORITY,
    RouteCheck,
    RouteSpec,
    RuleSpec,
    Step,
    table_id,
)
from ctfix.errors import CtfixError


def _broken_networks(diagnosis: Diagnosis) -> list[ClientNetwork]:
    """Client networks that send to an exposed address other than the reply source."""
    broken = []
    for cn in diagnosis.clients:
        predicted = unmap(cn.predicted_source) if cn.predicted_source else None
        if not cn.ok and any(a != predicted for a in targets.addressed(cn, diagnosis.listeners)):
            broken.append(cn)
    return broken


def build(
    diagnosis: Diagnosis,
    backend: Backend,
    *,
    force: bool,
    notes: tuple[str, ...],
    advice: tuple[str, ...],
    gateways: tuple[str, ...],
) -> Plan:
    """The routes and rules, or a CtfixError saying why a route cannot serve here."""
    del backend, advice  # always iproute2; no advice of its own
    port = diagnosis.port
    routers = reroute.checked_gateways(diagnosis, gateways)  # two uplinks: next hops
    broken = _broken_networks(diagnosis)
    seen = [cn for cn in broken if cn.seen]
    if broken and not seen:
        raise CtfixError(
            f"no client of port {port} has been seen yet, so which local address each "
            "network sends to is unknown; a route can give a network only one source",
            "let clients send requests first (conntrack remembers them), or use "
            "--method snat-zone",
        )
    if len(seen) < len(broken):
        skipped = ", ".join(cn.network for cn in broken if not cn.seen)
        notes = (*notes, f"no client seen from {skipped}: left alone")
    broken = seen
    if not broken:
        raise CtfixError(
            f"nothing to route: every known client network of port {port} already gets "
            "replies from the address it sends to",
            f"see `ctfix explain {port}`; use --method snat-zone to cover clients not seen "
            "yet",
        )
    table = table_id(port)
    steps: list[Step] = []
    checks: list[RouteCheck] = []
    families: list[Family] = []
    warnings: list[str] = []
    #: (who would get no answer, the --force condition): refused after the loop, so
    #: that the refusal names every network, not just the first one.
    breaks: list[tuple[str, str]] = []
    for cn in broken:
        addressed = targets.addressed(cn, diagnosis.listeners)
        if len(addressed) != 1:
            raise CtfixError(
                f"clients in {cn.network} send to {' and '.join(addressed) or 'no known address'}"
                ": a route can give their replies only one source",
                "use --method snat-zone",
            )
        if cn.interface is None:
            raise CtfixError(
                f"the interface of client network {cn.network} is unknown",
                "use --method snat-zone",
            )
        source = addressed[0]
        stranded = [
            a
            for a in (unmap(o) for o in cn.onlink)
            if a != source and targets.unexposed_reason(a, diagnosis.listeners) is None
        ]
        if stranded:
            who = _stranded(cn, stranded)
            breaks.append(
                (f"{who} from {source}", f"in {cn.network} ever addresses {' or '.join(stranded)}")
            )
            warnings.append(
                f"--force: replies to {cn.network} will leave from {source}; {who} will be "
                "answered from it, not from the address they asked, until --revert"
            )
        family = targets.family_of(source)
        if targets.family_of(cn.network.split("/")[0]) != family:
            raise CtfixError(f"clients in {cn.network} address {source} of another family")
        if family not in families:
            families.append(family)
        ip = "ip -6" if family == "ipv6" else "ip"
        # Clients beyond a router: through it, and by the source's own uplink.
        interface, gateway = reroute.policy_next_hop(cn, source, routers)
        interface = interface or cn.interface
        route = RouteSpec(family, cn.network, interface, source, table, gateway=gateway)
        via = f"via {gateway} " if gateway else ""
        steps.append(
            Step(
                route,
                f"replies to {cn.network} leave from {source}"
                + (f" by {interface} via {gateway}" if gateway else ""),
                (f"route {cn.network} {via}dev {interface} src {source} in table {table}",),
                (f"{ip} route add {route.words}",),
                (f"{ip} route del {route.words}",),
            )
        )
        checks.append(
            RouteCheck(probe_address(cn, diagnosis), source, interface if gateway else None)
        )
    if breaks and not force:
        raise CtfixError(
            f"policy-route would answer {' and '.join(who for who, _ in breaks)}: none was "
            "seen, but "
            f"{conntrack_memory(diagnosis.udp_timeout)}, so that is no proof there are none",
            "use --method snat-zone (it serves both), or add --force if no client "
            + ", and none ".join(unless for _, unless in breaks),
        )
    for family in families:
        ip = "ip -6" if family == "ipv6" else "ip"
        rule = (
            f"priority {RULE_PRIORITY} ipproto udp sport {port} lookup {table} "
            f"protocol {RT_PROTO}"
        )
        steps.append(
            Step(
                RuleSpec(family, port, table),
                f"{family} UDP replies from port {port} consult table {table}",
                (f"{family} rule {RULE_PRIORITY}: ipproto udp sport {port} lookup {table}",),
                (f"{ip} rule add {rule}",),
                (f"{ip} rule del {rule}",),
            )
        )
    notes = (*notes, *_dnat_notes(diagnosis, broken))
    if any(
        len(targets.addressed(cn, diagnosis.listeners)) > 1 for cn in diagnosis.clients if cn.ok
    ):
        notes = (
            *notes,
            "some client networks address several local addresses; they are left alone",
        )
    return Plan(
        port, "policy-route", "iproute2", tuple(steps), notes, tuple(checks),
        warnings=tuple(warnings),
    )


def _stranded(cn: ClientNetwork, stranded: list[str]) -> str:
    """Who a route would answer from another address than the one they asked, by what
    routing would do: on their link that address is the host's, their gateway; beyond
    a router it is only another address of the host."""
    where = f"the host's own address on {cn.interface}" if cn.interface else "the host's"
    remote = cn.egress_gateway is not None or bool(cn.uplinks)
    return (
        f"clients in {cn.network} that address {' or '.join(stranded)} "
        f"({where}{'' if remote else ', their gateway'})"
    )


def _dnat_notes(diagnosis: Diagnosis, routed: list[ClientNetwork]) -> list[str]:
    """Which clients behind a DNAT the routes serve, and which they cannot."""
    notes = [
        f"covers: clients of {service} in {cn.network} (DNAT'd to "
        f"{targets.addressed(cn, diagnosis.listeners)[0]}): their replies leave from "
        "the DNAT target, and conntrack translates them back"
        for cn in routed
        for service in cn.services
    ]
    own = sorted({f.service for f in diagnosis.forwarded_from if "output" in f.hooks})
    if own:
        notes.append(
            f"not covered: this host's own clients of {', '.join(own)} (a DNAT in "
            "output): a reply to a local address is routed by the `local` table before "
            "any policy rule; --method snat-zone covers them"
        )
    return notes


METHOD = PlanMethod("policy-route", ("iproute2",), changes_host=True, build=build)
