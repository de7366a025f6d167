"""The lab's narrative: a topology sketch, one line per check, a verdict.

Know before changing: the README shows this output verbatim; keep it short enough
for an engineer to follow at 3 a.m. and free of anything run-specific besides the
namespace names, ports and pids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from ctfix.render.style import Style

if TYPE_CHECKING:
    from ctfix.lab.scenario import Check, Section, Story
    from ctfix.lab.topology import Topology


class LabPrinter:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.style = Style.for_stream(out)

    def _p(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def topology(self, topo: Topology, port: int) -> None:
        from ctfix.lab import topology as t

        s = self.style
        self._p(s("ctfix lab: a UDP service that answers from the wrong address", "bold"))

        def both(v4: str, v6: str, sep: str = ", ") -> str:
            """The IPv4 item, and the IPv6 one too when the lab runs IPv6."""
            return f"{v4}{sep}{v6}" if topo.ipv6 else v4

        self._p(
            f"  host ns       {topo.host}\n"
            f"                  br0  {both(f'{t.BRIDGE_V4}/24', f'{t.BRIDGE_V6}/64')}"
            "   (docker0's role)\n"
            f"                  eth0 {both(f'{t.UPLINK_V4}/24', f'{t.UPLINK_V6}/64')}"
            "   (uplink)\n"
            f"  container ns  {topo.container}\n"
            f"                  eth0 {both(f'{t.CONTAINER_V4}/24', f'{t.CONTAINER_V6}/64')}"
            ", default via the bridge\n"
            f"  upstream ns   {topo.upstream}   ({both(t.UPSTREAM_V4, t.UPSTREAM_V6)}"
            ", no route out)\n"
            f"  netfilter     MASQUERADE {both(t.CONTAINER_NET_V4, t.CONTAINER_NET_V6, ' and ')}"
            f" leaving by anything but br0 ({topo.netfilter}), as Docker does\n"
            f"  service       UDP port {port} in the host ns; clients in the container"
        )

    def report(self, kind: str, item: object) -> None:
        if kind == "section":
            self._section(item)  # type: ignore[arg-type]
        else:
            self._check(item)  # type: ignore[arg-type]

    def _section(self, section: Section) -> None:
        self._p()
        self._p(self.style(section.title, "bold"))

    def _check(self, check: Check) -> None:
        s = self.style
        self._p(f"  {s.mark(check.ok)} {check.title}")
        self._p(f"      expected: {check.expected}")
        self._p(f"      seen:     {check.seen}")
        for line in check.detail:
            self._p(f"      {s(line, 'dim')}")

    def stale_nat_topology(self, topo: Topology, port: int) -> None:
        from ctfix.lab import stale_nat as sn
        from ctfix.lab import topology as t

        s = self.style
        self._p(s("ctfix lab: UDP clients pinned by conntrack to a backend that moved", "bold"))
        self._p(
            f"  host ns       {topo.host}\n"
            f"                  eth0 {t.UPLINK_V4}/24 (uplink): UDP port {port} forwarded "
            f"by DNAT ({topo.netfilter})\n"
            f"  container ns  {topo.container}\n"
            f"                  a one-way sender from {t.CONTAINER_V4}:{sn.SENDER_PORT} "
            f"(syslog-like), 10 datagrams/s\n"
            f"  upstream ns   {topo.upstream}\n"
            f"                  backend A {sn.BACKEND_A}:{port}, backend B "
            f"{sn.BACKEND_B}:{port}"
        )

    def verdict(self, story: Story, why: str | None = None) -> None:
        s = self.style
        self._p()
        bug = "reproduced" if story.reproduced else "NOT reproduced"
        fix = "confirmed" if story.fixed else "NOT confirmed"
        good = story.reproduced and story.fixed
        self._p(s(f"Result: bug {bug}, fix {fix}.", "bold", "green" if good else "red"))
        if good and why is not None:
            self._p(why)
        elif good:
            self._p(
                "Why: the broken server's reply to a client that addressed the uplink left by\n"
                "br0, so the kernel gave it br0's address as the source; the client's\n"
                "connected socket does not match it and answers ICMP port unreachable, and\n"
                "conntrack files the reply as a new flow. The reference server reads the\n"
                "address each request was sent to (IP_PKTINFO / IPV6_PKTINFO) and replies\n"
                "from it. Find such services: `ctfix watch`; diagnose one: `ctfix explain PORT`."
            )

    def keep(self, topo: Topology, port: int, scenario: str = "wrong-source") -> None:
        from ctfix.commands.common import ctfix_command

        ctfix = ctfix_command()
        self._p()
        self._p("The lab is still up (--keep). Enter it with:")
        for role, ns in (("host", topo.host), ("container", topo.container)):
            self._p(f"  ip netns exec {ns} bash    # {role}")
        self._p("Try it:")
        if scenario == "stale-nat":
            self._p(f"  ip netns exec {topo.container} nc -u -p 40515 198.51.100.13 {port}")
            self._p(f"  {ctfix} watch --netns {topo.host}     (then move the DNAT rule)")
            self._p(f"  {ctfix} explain {port} --netns {topo.host}")
            self._p(f"  {ctfix} fix {port} --method flush-stale --netns {topo.host}")
        else:
            self._p(f"  ip netns exec {topo.host} {ctfix} serve --broken --port {port} &")
            self._p(f"  ip netns exec {topo.container} nc -u 198.51.100.13 {port}")
            self._p(f"  {ctfix} watch --netns {topo.host}")
            self._p(f"  {ctfix} explain {port} --netns {topo.host}")
        self._p("Remove it with:")
        self._p("  " + " && ".join(f"ip netns del {ns}" for ns in topo.namespaces))


def stale_nat_why() -> str:
    """The stale-nat story's closing explanation."""
    return (
        "Why: conntrack chose the sender's backend when its first datagram arrived and\n"
        "restarts the entry's timeout with every datagram, so a sender that never pauses\n"
        "keeps its old target for ever, whatever the rules say now. ctfix compares each\n"
        "entry with where the current rules would send a new flow, and deletes exactly\n"
        "the stale ones (by tuple and id); the next datagram follows the rules.\n"
        "Find them: `ctfix watch`; diagnose a port: `ctfix explain PORT`; runbook:\n"
        "docs/runbooks/udp-stale-nat.md."
    )
