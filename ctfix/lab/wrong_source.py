"""The lab's first story (`ctfix lab`): reproduce the wrong-source bug, then show the
IP_PKTINFO fix.

A wildcard server that replies with sendto() leaves a container that addresses the
uplink without an answer (the two conntrack entries and the client's ICMP port
unreachable prove why); the reference server answers on every address. Know before
changing: the README shows this story's output verbatim.
"""

from __future__ import annotations

import socket

from ctfix.core.addr import endpoint
from ctfix.lab import topology as t
from ctfix.lab.scenario import Check, Report, Scenario, Section, Story, reply_text, server


def _exchange_check(
    topo: t.Topology, address: str, port: int, *, want_reply: bool, timeout: float
) -> tuple[Check, t.Exchange]:
    ex = t.udp_exchange(topo.container, address, port, timeout=timeout)
    right = ex.reply_from is not None and ex.reply_from[0] == address
    expected = (
        f"reply from {endpoint(address, port)}"
        if want_reply
        else "no reply: the bug (the reply leaves from another address)"
    )
    ok = right if want_reply else ex.reply_from is None
    title = f"connected client {endpoint(*ex.client)} -> {endpoint(address, port)}"
    return Check(title, expected, reply_text(ex), ok), ex


def run_story(
    topo: t.Topology, port: int, report: Report, *, timeout: float = 1.0, evidence: bool = True
) -> Story:
    """Run both halves of the story for each family the topology has."""
    from ctfix.lab.evidence import LabEvidence

    story = Story(port)
    families = [socket.AF_INET] + ([socket.AF_INET6] if topo.ipv6 else [])
    for broken in (True, False):
        title = (
            "a wildcard server that answers with recvfrom()/sendto() (ctfix serve --broken)"
            if broken
            else "the reference server: wildcard + IP_PKTINFO (ctfix serve)"
        )
        with server(topo, port, broken) as proc, LabEvidence(topo) as proof:
            section = Section(f"{title}, pid {proc.pid}")
            report("section", section)
            for family in families:
                uplink, bridge = topo.local_addresses(family)
                for address, want in ((bridge, True), (uplink, not broken)):
                    check, ex = _exchange_check(
                        topo, address, port, want_reply=want, timeout=timeout
                    )
                    extra = proof.checks(port, ex) if broken and not want and evidence else []
                    for item in (check, *extra):
                        section.checks.append(item)
                        report("check", item)
            (story.bug if broken else story.fix).append(section)
    return story


def _try_it(topo: t.Topology, port: int, ctfix: str) -> tuple[str, ...]:
    return (
        f"ip netns exec {topo.host} {ctfix} serve --broken --port {port} &",
        f"ip netns exec {topo.container} nc -u 198.51.100.13 {port}",
        f"{ctfix} watch --netns {topo.host}",
        f"{ctfix} explain {port} --netns {topo.host}",
    )


SCENARIO = Scenario(
    name="wrong-source",
    title="a UDP service that answers from the wrong address",
    run=lambda topo, port, report, timeout: run_story(topo, port, report, timeout=timeout),
    why=(
        "the broken server's reply to a client that addressed the uplink left by\n"
        "br0, so the kernel gave it br0's address as the source; the client's\n"
        "connected socket does not match it and answers ICMP port unreachable, and\n"
        "conntrack files the reply as a new flow. The reference server reads the\n"
        "address each request was sent to (IP_PKTINFO / IPV6_PKTINFO) and replies\n"
        "from it. Find such services: `ctfix watch`; diagnose one: `ctfix explain PORT`."
    ),
    try_it=_try_it,
)
