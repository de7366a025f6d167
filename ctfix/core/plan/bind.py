"""The bind method: change nothing on the host; say how to fix the application.

Pure. Know before changing: a bind plan has no steps, so it can never be applied or
recorded; its advice (the knowledge base's, found by the command) comes first, then
the generic IP_PKTINFO advice from `pktinfo_advice`.
"""

from __future__ import annotations

from ctfix.core.model import Diagnosis
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
