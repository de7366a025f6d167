"""The lab's narrative: a topology sketch, one line per check, a verdict.

Know before changing: the README shows this output verbatim; keep it short enough
for an engineer to follow at 3 a.m. and free of anything run-specific besides the
namespace names, ports and pids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from ctfix.core.addr import endpoint
from ctfix.lab.checks import (
    ApplyCheck,
    Check,
    ConntrackCheck,
    DeliveryCheck,
    EntryCheck,
    ExchangeCheck,
    ExplainCheck,
    FlushCheck,
    IcmpCheck,
    RevertCheck,
    Section,
    ServiceCheck,
    StaleFindingCheck,
    StatusCheck,
)
from ctfix.render.conntrack import conntrack_line
from ctfix.render.style import Style

if TYPE_CHECKING:
    from ctfix.lab.checks import Story
    from ctfix.lab.topology import Topology


#: each scenario's headline (ctfix.lab.registry names the scenarios)
TITLES = {
    "wrong-source": "a UDP service that answers from the wrong address",
    "clusterip": "a hostNetwork UDP server behind a Kubernetes ClusterIP",
    "stale-nat": "UDP clients pinned by conntrack to a backend that moved",
}
#: sections of scenarios other than wrong-source, by kind
_SECTIONS = {
    "clusterip-failure": "pods ask the ClusterIP; a wildcard server on the node answers "
    "with recvfrom()/sendto() (ctfix serve --broken)",
    "clusterip-finding": "what ctfix finds",
    "clusterip-repair": "the snat-zone repair (the server unchanged)",
    "clusterip-revert": "the revert",
    "stale-nat-forwarded": "a one-way sender from a fixed port, forwarded by DNAT to "
    "backend A",
    "stale-nat-moved": "the rule moved to backend B; A's address removed",
    "stale-nat-flushed": "the exact flush: ctfix fix PORT --method flush-stale --apply",
}
#: why a good result is good, per scenario
WHY = {
    "wrong-source": (
        "the broken server's reply to a client that addressed the uplink left by\n"
        "br0, so the kernel gave it br0's address as the source; the client's\n"
        "connected socket does not match it and answers ICMP port unreachable, and\n"
        "conntrack files the reply as a new flow. The reference server reads the\n"
        "address each request was sent to (IP_PKTINFO / IPV6_PKTINFO) and replies\n"
        "from it. Find such services: `ctfix watch`; diagnose one: `ctfix explain PORT`."
    ),
    "clusterip": (
        "kube-proxy DNATs the ClusterIP to the node's address, but the wildcard\n"
        "server's reply to a pod leaves by the bridge with the bridge's address: it does\n"
        "not match the DNAT'd conntrack entry, so it is not translated back, becomes a\n"
        "NEW flow, and the pod's connected socket rejects it (kubernetes 95565).\n"
        "snat-zone remembers each pod by what it sent to before DNAT (ClusterIP and\n"
        "port), moves the wrong-source reply into a conntrack zone of its own and SNATs\n"
        "it to exactly that. The lasting fix is in the server (IP_PKTINFO, or a bind to\n"
        "the node's address): see docs/runbooks/udp-wrong-source.md."
    ),
    "stale-nat": (
        "conntrack chose the sender's backend when its first datagram arrived and\n"
        "restarts the entry's timeout with every datagram, so a sender that never pauses\n"
        "keeps its old target for ever, whatever the rules say now. ctfix compares each\n"
        "entry with where the current rules would send a new flow, and deletes exactly\n"
        "the stale ones (by tuple and id); the next datagram follows the rules.\n"
        "Find them: `ctfix watch`; diagnose a port: `ctfix explain PORT`; runbook:\n"
        "docs/runbooks/udp-stale-nat.md."
    ),
}


def _setup_lines(scenario: str, topo: Topology, port: int) -> list[str]:
    """What a scenario adds to the lab's topology, one line per item."""
    if scenario == "stale-nat":
        from ctfix.lab import stale_nat as sn
        from ctfix.lab import topology as t

        return [
            f"DNAT          {endpoint(t.UPLINK_V4, port)} forwarded to backend A "
            f"{endpoint(sn.BACKEND_A, port)}, later B {endpoint(sn.BACKEND_B, port)} (both in "
            f"the upstream ns; {topo.netfilter})",
            f"sender        {endpoint(t.CONTAINER_V4, sn.SENDER_PORT)} in the container, "
            "one-way, 10 datagrams/s from that fixed port (syslog-like)",
        ]
    if scenario != "clusterip":
        return []
    from ctfix.lab import clusterip

    families = [(clusterip.CLUSTER_IP_V4, "198.51.100.13")]
    if topo.ipv6:
        families.append((clusterip.CLUSTER_IP_V6, "2001:db8:2::13"))
    clusters = " and ".join(ip for ip, _node in families)
    nodes = " and ".join(endpoint(node, port) for _ip, node in families)
    return [
        "Kubernetes    the host ns is the node, br0 is cni0, the container ns is a pod; "
        f"ClusterIP {clusters} on UDP ports {port} and {clusterip.other_port(port)}, "
        f"DNAT'd to {nodes} (kube-proxy's chains, {topo.netfilter}, prerouting and output)"
    ]


def _try_lines(scenario: str, topo: Topology, port: int, ctfix: str) -> list[str]:
    if scenario == "stale-nat":
        return [
            f"ip netns exec {topo.container} nc -u -p 40515 198.51.100.13 {port}",
            f"{ctfix} watch --netns {topo.host}     (then move the DNAT rule)",
            f"{ctfix} explain {port} --netns {topo.host}",
            f"{ctfix} fix {port} --method flush-stale --netns {topo.host}",
        ]
    if scenario == "clusterip":
        from ctfix.lab import clusterip

        return [
            f"ip netns exec {topo.host} {ctfix} serve --broken --port {port} &",
            f"ip netns exec {topo.container} nc -u {clusterip.CLUSTER_IP_V4} "
            f"{clusterip.other_port(port)}",
            f"{ctfix} explain {port} --netns {topo.host}",
            f"{ctfix} fix {port} --method snat-zone --netns {topo.host}",
        ]
    return [
        f"ip netns exec {topo.host} {ctfix} serve --broken --port {port} &",
        f"ip netns exec {topo.container} nc -u 198.51.100.13 {port}",
        f"{ctfix} watch --netns {topo.host}",
        f"{ctfix} explain {port} --netns {topo.host}",
    ]


def _section_title(section: Section) -> str:
    if section.kind:
        title = _SECTIONS.get(section.kind, section.kind)
        return f"{title}, pid {section.pid}" if section.broken else title
    title = (
        "a wildcard server that answers with recvfrom()/sendto() (ctfix serve --broken)"
        if section.broken
        else "the reference server: wildcard + IP_PKTINFO (ctfix serve)"
    )
    return f"{title}, pid {section.pid}"


def _exchange_words(
    check: ExchangeCheck | ServiceCheck, who: str, when: str, failure: str
) -> tuple[str, str, str, list[str]]:
    """A client asked address:port: (title, expected, seen, detail)."""
    address = endpoint(check.address, check.port)
    expected = f"reply from {address}" if check.want_reply else failure
    came = check.reply_from
    seen = "no reply" if came is None else f"reply from {endpoint(*came)}"
    return f"{who} {endpoint(*check.client)} -> {address}{when}", expected, seen, []


def check_words(check: Check) -> tuple[str, str, str, list[str]]:
    """(title, expected, seen, detail lines) of one check."""
    match check:
        case ExchangeCheck():
            failure = "no reply: the bug (the reply leaves from another address)"
            return _exchange_words(check, "connected client", "", failure)
        case ConntrackCheck():
            reply = check.reply
            seen = (
                f"a new flow from {endpoint(reply.orig.src, reply.orig.sport)}, not "
                f"{endpoint(check.server, check.port)}"
                if reply is not None
                else "no second flow"
            )
            detail = [
                f"{label} {conntrack_line(entry) if entry else '(not found)'}"
                for label, entry in (("request", check.request), ("reply  ", reply))
            ]
            return (
                "conntrack in the host namespace",
                "the request"
                + (
                    f" DNAT'd to {endpoint(check.server, check.port)}"
                    if check.request is not None and check.request.orig.dst != check.server
                    else ""
                )
                + ", then the reply filed as a NEW flow from another address",
                seen,
                detail,
            )
        case ServiceCheck():
            failure = "no reply: the reply leaves from another address and matches no entry"
            who = "direct client" if check.direct else "pod"
            return _exchange_words(check, who, ", again" if check.again else "", failure)
        case ExplainCheck():
            seen = (
                f"{(check.verdict or 'no answer').upper()}; DNAT'd here: "
                f"{', '.join(check.named) or 'none'}; recommended: "
                f"{', '.join(check.recommended) or '-'}"
            )
            return (
                f"ctfix explain {check.port}",
                f"BROKEN, naming {', '.join(check.wanted)} as DNAT'd to the port, and "
                "snat-zone recommended",
                seen,
                list(check.reasons),
            )
        case ApplyCheck():
            seen = (
                f"exit {check.returncode}; covers the clients of "
                f"{', '.join(check.covers) or 'nothing'}"
                + (f"; {check.error}" if check.error else "")
            )
            return (
                f"ctfix fix {check.port} --method snat-zone --apply",
                f"applied, covering the clients of {', '.join(check.wanted)}",
                seen,
                [],
            )
        case StatusCheck():
            return (
                "ctfix fix --status",
                "whole, and no wrong-source reply since it was applied",
                f"exit {check.returncode}; effect: {check.verdict}",
                [],
            )
        case RevertCheck():
            return (
                f"ctfix fix --revert {check.port}",
                "the ruleset exactly as before the fix",
                f"exit {check.returncode}; ruleset {'as before' if check.same else 'DIFFERENT'}",
                [],
            )
        case IcmpCheck():
            r = check.rejected
            seen = (
                f"ICMP port unreachable from {check.sender} for the reply "
                f"{endpoint(r.src, r.sport)} -> {endpoint(r.dst, r.dport)}"
                if r is not None
                else "no ICMP port unreachable seen"
            )
            return (
                "the client rejects the reply it did not expect",
                "ICMP port unreachable from the client, about a reply from another address",
                seen,
                [],
            )
        case DeliveryCheck() | EntryCheck() | StaleFindingCheck() | FlushCheck():
            return _stale_words(check)


def _datagrams(count: int, where: str) -> str:
    if not count:
        return f"nothing at {where}"
    return f"{count} datagram{'s' if count != 1 else ''} at {where}"


def _stale_words(
    check: DeliveryCheck | EntryCheck | StaleFindingCheck | FlushCheck,
) -> tuple[str, str, str, list[str]]:
    """The stale-nat story's checks in words."""
    match check:
        case DeliveryCheck():
            where = f"backend {check.backend} {check.address}"
            if check.want:
                again = " again" if check.backend == "B" else ""
                title = f"{where} receives the sender's datagrams{again}"
                seen = _datagrams(check.received, check.address)
                return title, f"datagrams at {check.backend}", seen, []
            return (
                f"{where} receives nothing: the black hole",
                f"nothing at {check.backend} for {check.waited:g} s (the sender keeps its old "
                "entry)",
                _datagrams(check.received, check.backend),
                [],
            )
        case EntryCheck():
            seen = "; ".join(
                f"{check.client} -> {check.service} goes to {target}" for target in check.targets
            ) or "no entry for the sender"
            if check.pinned:
                return (
                    "conntrack still sends the sender to A",
                    f"the sender's entry goes to {check.want}",
                    seen,
                    ["its timeout restarts with every datagram: it never expires"],
                )
            return (
                "the sender's new entry follows the rule",
                f"{check.client} -> {check.service} goes to {check.want}",
                seen,
                [],
            )
        case StaleFindingCheck():
            seen = (
                f"verdict {check.verdict}, stale target {check.stale_target}, now "
                f"{', '.join(check.current)}, {check.clients} client(s)"
                if check.verdict is not None and check.stale_target is not None
                else check.error or f"verdict {check.verdict}, no stale-nat finding"
            )
            return (
                f"`ctfix explain {check.port}` finds it",
                f"broken, reason stale-nat: stale target {check.want_stale}, current "
                f"{check.want_current}",
                seen,
                [],
            )
        case FlushCheck():
            others = f"the other {check.others} entr{'y' if check.others == 1 else 'ies'}"
            seen = check.error or (
                f"{check.deleted} deleted; {others} of the table "
                + ("all still there" if check.kept else "NOT all there")
            )
            return (
                f"ctfix fix {check.port} --method flush-stale --apply",
                "1 entry deleted; every other entry of the table still there",
                seen,
                list(check.checks),
            )


class LabPrinter:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.style = Style.for_stream(out)

    def _p(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def topology(self, topo: Topology, port: int, scenario: str = "wrong-source") -> None:
        from ctfix.lab import topology as t

        s = self.style
        self._p(s(f"ctfix lab: {TITLES[scenario]}", "bold"))

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
        for line in _setup_lines(scenario, topo, port):
            self._p(f"  {line}")

    def report(self, item: Section | Check) -> None:
        """The story's callback: a section as it starts, each check as it is made."""
        if isinstance(item, Section):
            self._p()
            self._p(self.style(_section_title(item), "bold"))
        else:
            self._check(*check_words(item), item.ok)

    def _check(self, title: str, expected: str, seen: str, detail: list[str], ok: bool) -> None:
        s = self.style
        self._p(f"  {s.mark(ok)} {title}")
        self._p(f"      expected: {expected}")
        self._p(f"      seen:     {seen}")
        for line in detail:
            self._p(f"      {s(line, 'dim')}")

    def verdict(self, story: Story, scenario: str = "wrong-source") -> None:
        s = self.style
        self._p()
        bug = "reproduced" if story.reproduced else "NOT reproduced"
        fix = "confirmed" if story.fixed else "NOT confirmed"
        good = story.reproduced and story.fixed
        self._p(s(f"Result: bug {bug}, fix {fix}.", "bold", "green" if good else "red"))
        if good:
            self._p(f"Why: {WHY[scenario]}")

    def keep(
        self, topo: Topology, port: int, ctfix: str, scenario: str = "wrong-source"
    ) -> None:
        """`ctfix`: how to run this ctfix from a shell (the command knows)."""
        self._p()
        self._p("The lab is still up (--keep). Enter it with:")
        roles = (("host", topo.host), ("container", topo.container))
        wide = max(len(ns) for _role, ns in roles)
        for role, ns in roles:
            self._p(f"  ip netns exec {ns.ljust(wide)} bash    # {role}")
        self._p("Try it:")
        for line in _try_lines(scenario, topo, port, ctfix):
            self._p(f"  {line}")
        self._p("Remove it with:")
        self._p("  " + " && ".join(f"ip netns del {ns}" for ns in topo.namespaces))
