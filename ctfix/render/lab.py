"""The lab's narrative: a topology sketch, one line per check, a verdict.

Know before changing: the README shows this output verbatim; keep it short enough
for an engineer to follow at 3 a.m. and free of anything run-specific besides the
namespace names, ports and pids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from ctfix.core.addr import endpoint
from ctfix.lab.checks import (
    Check,
    ConntrackCheck,
    DeliveryCheck,
    EntryCheck,
    ExchangeCheck,
    FlushCheck,
    IcmpCheck,
    Section,
    StaleFindingCheck,
    StaleSection,
)
from ctfix.render.conntrack import conntrack_line
from ctfix.render.style import Style

if TYPE_CHECKING:
    from ctfix.lab.checks import Story
    from ctfix.lab.topology import Topology


def _section_title(section: Section | StaleSection) -> str:
    if isinstance(section, StaleSection):
        match section.step:
            case "forwarded":
                return (
                    f"a one-way sender {section.client} -> {section.service}, forwarded by "
                    f"DNAT to {section.backend_a}"
                )
            case "moved":
                return f"the rule moved to backend B {section.backend_b}; A's address removed"
            case "flushed":
                return f"ctfix fix {section.port} --method flush-stale --apply"
    title = (
        "a wildcard server that answers with recvfrom()/sendto() (ctfix serve --broken)"
        if section.broken
        else "the reference server: wildcard + IP_PKTINFO (ctfix serve)"
    )
    return f"{title}, pid {section.pid}"


def check_words(check: Check) -> tuple[str, str, str, list[str]]:
    """(title, expected, seen, detail lines) of one check."""
    match check:
        case ExchangeCheck():
            address = endpoint(check.address, check.port)
            expected = (
                f"reply from {address}"
                if check.want_reply
                else "no reply: the bug (the reply leaves from another address)"
            )
            came = check.reply_from
            seen = "no reply" if came is None else f"reply from {endpoint(*came)}"
            return f"connected client {endpoint(*check.client)} -> {address}", expected, seen, []
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
                "the request, then the reply filed as a NEW flow from another address",
                seen,
                detail,
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
                title = (
                    f"{where} receives the sender's datagrams"
                    + (" again" if check.backend == "B" else "")
                )
                return title, f"datagrams at {check.backend}", _datagrams(
                    check.received, check.address), []
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
                "exactly the stale entry is deleted",
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

    def report(self, item: Section | StaleSection | Check) -> None:
        """The story's callback: a section as it starts, each check as it is made."""
        if isinstance(item, Section | StaleSection):
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

    def keep(self, topo: Topology, port: int, ctfix: str, scenario: str = "wrong-source") -> None:
        """`ctfix`: how to run this ctfix from a shell (the command knows)."""
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
