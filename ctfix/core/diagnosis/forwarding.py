"""Which services a DNAT forwards to the port on this host: from the DNAT rules (the
NAT model's paths, ctfix.core.nat.paths) and from the conntrack entries of requests
already forwarded. Pure.

Know before changing: a forwarded service is known by what its clients send to
*before* DNAT (address, port). The server must answer it from the target (the DNAT's
address, this port), or conntrack cannot translate the reply back; a rewrite of a
wrong-source reply must go back to the service itself (kubernetes 95565: a ClusterIP
DNAT'd to a hostNetwork server on the node). A rule that matches no single address
(a network, any address) names its clients' service only once conntrack shows them,
as another, exact, service.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ctfix.core.addr import unmap
from ctfix.core.decode import CtEntry
from ctfix.core.diagnosis.codes import reason
from ctfix.core.model import ForwardedService, Reason
from ctfix.core.nat.paths import DnatPath

UDP = 17


@dataclass
class _Found:
    service: ForwardedService
    hooks: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    seen: int = 0


def _single(destination: str) -> str | None:
    """The address of a one-address network (`203.0.113.10`, `.../32`), else None."""
    net = ipaddress.ip_network(destination, strict=False)
    return unmap(str(net.network_address)) if net.num_addresses == 1 else None


def _from_rule(rule: DnatPath, port: int) -> list[ForwardedService]:
    target = unmap(rule.to_address)
    # The port is kept (no port in the DNAT): only requests to `port` itself come here.
    ports: list[int | None] = [port] if rule.to_port is None else list(rule.dports or [None])
    found: list[ForwardedService] = []
    for destination in rule.destinations or (None,):
        address = _single(destination) if destination else None
        matched = None if address else (destination or "any address")
        for service_port in ports:
            if address == target and service_port == port:
                continue  # a DNAT to itself changes nothing
            found.append(
                ForwardedService(address, service_port, target, port, matched=matched)
            )
    return found


def forwarded_services(
    port: int, rules: Iterable[DnatPath], flows: Iterable[CtEntry], local: set[str]
) -> list[ForwardedService]:
    """Services DNAT'd to `port` on a local address: the rules' first (ruleset order),
    then those only conntrack shows; each once, with every hook and rule that leads
    to it and how many requests to it the table holds."""
    found: dict[tuple[str, str, int | None], _Found] = {}

    def entry(service: ForwardedService) -> _Found:
        key = (service.address or service.matched or "", service.target, service.port)
        return found.setdefault(key, _Found(service))

    for rule in rules:
        if unmap(rule.to_address) not in local:
            continue  # forwarded to another host: not answered here
        text = rule.rule if not rule.via else f"{rule.via[-1]} -> {rule.rule}"
        for service in _from_rule(rule, port):
            item = entry(service)
            if rule.hook not in item.hooks:
                item.hooks.append(rule.hook)
            if text not in item.rules:
                item.rules.append(text)
    counted: set[tuple[str, int, str, int]] = set()
    for flow in flows:
        orig, reply = flow.orig, flow.reply
        target = unmap(reply.src)
        if orig.proto != UDP or reply.sport != port or target not in local:
            continue
        sent_to = (unmap(orig.dst), orig.dport)
        key = (orig.src, orig.sport, orig.dst, orig.dport)
        if sent_to == (target, port) or key in counted:
            continue  # not DNAT'd, or the same entry from two dumps
        counted.add(key)
        entry(ForwardedService(sent_to[0], sent_to[1], target, port)).seen += 1
    return [
        replace(item.service, hooks=tuple(item.hooks), rules=tuple(item.rules), seen=item.seen)
        for item in found.values()
    ]


def forwarding_reasons(services: Iterable[ForwardedService]) -> list[Reason]:
    """The services DNAT'd here, and the rules whose clients cannot be known ahead."""
    services = list(services)
    reasons: list[Reason] = []
    if services:
        exact = [s for s in services if s.exact]
        named = ", ".join(f"{s.service} (to {s.target})" for s in exact)
        if named:
            reasons.append(
                reason(
                    "forwarded-here-by-dnat",
                    f"Requests to {named} are forwarded here by DNAT: the server must "
                    "answer them from the address the DNAT sent them to, or conntrack "
                    "cannot translate the reply back.",
                )
            )
    for service in services:
        if service.exact:
            continue
        rule = f" (`{service.rules[0]}`)" if service.rules else ""
        reasons.append(
            reason(
                "dnat-destination-unknown",
                f"A DNAT{rule} forwards requests to {service.service} here: which address "
                "its clients send to is known only once conntrack shows them, so a fix "
                "can remember only the clients already seen.",
            )
        )
    return reasons
