"""The bind method: change nothing on the host; say how to fix the application.

Pure. Know before changing: a bind plan has no steps, so it can never be applied or
recorded; its advice (the knowledge base's, found by the command) comes first, then
the generic IP_PKTINFO advice from `pktinfo_advice`.
"""

from __future__ import annotations

from ctfix.core.model import Diagnosis, ForwardedService
from ctfix.core.plan import Backend, Plan, PlanMethod


def build(
    diagnosis: Diagnosis,
    backend: Backend,
    *,
    force: bool,
    notes: tuple[str, ...],
    advice: tuple[str, ...],
    gateways: tuple[str, ...],
) -> Plan:
    del force, gateways  # nothing to force, nothing to route: nothing changes
    return Plan(diagnosis.port, "bind", backend, (), notes, advice=advice)


def pktinfo_advice(port: int) -> tuple[str, ...]:
    """The generic application fix, for any program."""
    return (
        "The lasting fix is in the application: answer each datagram from the address it "
        "was sent to.",
        "Either bind one socket per local address (and per address added later), or keep "
        "the wildcard socket and enable IP_PKTINFO / IPV6_RECVPKTINFO: read the "
        "destination address with recvmsg() and pass it back as the source in sendmsg()'s "
        "IP_PKTINFO / IPV6_PKTINFO control message.",
        f"`ctfix serve --port {port}` is a reference echo server that does exactly this "
        "(see ctfix/pktinfo.py and docs/pktinfo.md).",
    )


METHOD = PlanMethod("bind", ("none",), changes_host=False, build=build)


def dnat_advice(forwarded: tuple[ForwardedService, ...]) -> tuple[str, ...]:
    """For clients that reach the port through a DNAT: bind to the DNAT's target."""
    if not forwarded:
        return ()
    by_target: dict[str, list[str]] = {}
    for service in forwarded:
        by_target.setdefault(service.target_address, []).append(service.service)
    return tuple(
        f"Clients of {', '.join(services)} reach this port through DNAT, addressed to "
        f"{target}: a socket bound to {target} answers them from it, and conntrack "
        "translates the reply back to what they sent to (binding works for them; so "
        "does IP_PKTINFO, which gives the address after DNAT)."
        for target, services in by_target.items()
    )
