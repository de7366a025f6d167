"""Who listens on the port, and whether the knowledge base recognises it. Pure.

Know before changing: a *serving* socket is an unconnected UDP socket on the port
(AF_INET serves IPv4; AF_INET6 serves IPv6, and IPv4 too when bound to `::` without
v6only). A wildcard socket is *exposed* unless its program is known to answer from
the request's destination (the knowledge base says `affected` is False, matched by
name or command line, not by port alone; or it is `ctfix serve`); evidence beats that
claim: a family in which conntrack caught it answering from the wrong source makes it
exposed again (`contradicted`). Evidence beats prediction the other way too: a family
in which conntrack shows requests to an address that routing would not pick answered
from that address (`observed`) proves that the program chooses its source: it is not
exposed there, whatever the knowledge base knows of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctfix.core.addr import endpoint
from ctfix.core.diagnosis.codes import reason
from ctfix.core.model import Family, Listener, Reason

if TYPE_CHECKING:
    from ctfix.core.rules import KnowledgeBase, ServiceRule


def is_ctfix_serve(listener: Listener) -> bool:
    words = [w.rsplit("/", 1)[-1] for w in listener.cmdline]
    if "--broken" in words:  # its deliberate recvfrom/sendto twin
        return False
    return "serve" in words and any(w in ("ctfix", "ctfix.cli", "-mctfix") for w in words)


@dataclass(frozen=True, slots=True)
class Known:
    rule: ServiceRule | None
    port_only: bool
    correct: bool  # answers from the request's destination even on a wildcard
    label: str | None
    #: what shows the knowledge base's own fix is already on (command line, config)
    in_effect: str | None = None


def recognise(
    listener: Listener,
    kb: KnowledgeBase | None,
    port: int,
    configs: Mapping[str, str] | None = None,
) -> Known:
    """`configs`: the process's configuration files that were read (path -> text)."""
    if is_ctfix_serve(listener):
        return Known(None, False, True, "ctfix serve (IP_PKTINFO reference server)")
    if kb is None:
        return Known(None, False, False, None)
    match = kb.match(listener.process, listener.cmdline, port, exe=listener.exe)
    if match is None:
        return Known(None, False, False, None)
    verdict = match.rule.affected(listener.family, listener.cmdline, configs)
    correct = verdict is False and not match.port_only
    in_effect = match.rule.fix_in_effect(listener.cmdline, configs) if correct else None
    return Known(match.rule, match.port_only, correct, match.rule.name, in_effect)


def config_globs(
    listeners: Iterable[Listener], kb: KnowledgeBase | None, port: int
) -> list[tuple[int, str]]:
    """(pid, file glob) of the configuration files the knowledge base says show a
    listener's fix is on (`fixed_if_config`): what the collector reads."""
    wanted: list[tuple[int, str]] = []
    if kb is None:
        return wanted
    for listener in listeners:
        match = kb.match(listener.process, listener.cmdline, port, exe=listener.exe)
        if listener.pid is None or match is None or match.port_only:
            continue
        for glob, _pattern in match.rule.fixed_if_config:
            if (listener.pid, glob) not in wanted:
                wanted.append((listener.pid, glob))
    return wanted


def replies_from_other_port(
    listeners: Iterable[Listener], kb: KnowledgeBase | None, port: int
) -> bool:
    """Whether the program on the port answers from other ports by design (TFTP's
    transfer ids): a socket's program that the knowledge base marks
    `replies_from_other_port`, recognised by process or command line (never by port
    alone); or a port that every knowledge-base entry claiming it marks so (69: the
    protocol does it, whichever program speaks it)."""
    if kb is None:
        return False
    claims = kb.by_port(port)
    if claims and all(rule.replies_from_other_port for rule in claims):
        return True
    for listener in listeners:
        match = kb.match(listener.process, listener.cmdline, exe=listener.exe)
        if match is not None and match.rule.replies_from_other_port:
            return True
    return False


def serves(listener: Listener) -> tuple[Family, ...]:
    if listener.state != "listening":
        return ()
    if listener.family == "ipv4":
        return ("ipv4",)
    if listener.address == "::" and not listener.v6only:
        return ("ipv4", "ipv6")
    if listener.address.startswith("::ffff:"):
        return ("ipv4",)
    return ("ipv6",)


def wild_for(listener: Listener, family: Family) -> bool:
    return listener.wildcard or (family == "ipv4" and listener.address == "::ffff:0.0.0.0")


@dataclass(frozen=True, slots=True)
class Judged:
    """One socket on the port, with what ctfix knows about its program."""

    listener: Listener
    known: Known
    #: the knowledge base trusts it, but conntrack caught it answering wrongly
    contradicted: bool = False
    #: conntrack shows it answering from addresses routing would not pick: it chooses
    #: its source (the text: which address, and what routing would have picked)
    observed: str | None = None
    #: the families whose one wrong-source reply is the knowledge base's documented
    #: first-request caveat (`wrong_first_reply`), not a contradiction
    caveat: tuple[Family, ...] = ()


@dataclass(frozen=True, slots=True)
class Listening:
    """Every socket on the port, judged; which families they serve, and whether a
    socket that lets routing pick its reply source serves each family."""

    judged: tuple[Judged, ...]
    serving: dict[Family, list[Listener]]
    exposed: dict[Family, bool]

    @property
    def contradicted(self) -> bool:
        return any(j.contradicted for j in self.judged)

    @property
    def caveat(self) -> set[Family]:
        """Families whose wrong-source evidence is a known first-request caveat."""
        return {family for j in self.judged for family in j.caveat}

    @property
    def service_rule(self) -> ServiceRule | None:
        """The knowledge base's entry for the first recognised program, if any.

        A match by the port alone is a guess: it names no service and gives no advice
        (atftpd on port 69 is not tftpd-hpa, whatever that entry says)."""
        return next(
            (j.known.rule for j in self.judged if j.known.rule and not j.known.port_only), None
        )


def judge(
    listeners: Iterable[Listener],
    kb: KnowledgeBase | None,
    port: int,
    caught: set[Family],
    observed: Mapping[Family, str] | None = None,
    configs: Mapping[int, Mapping[str, str]] | None = None,
    replies: Mapping[Family, int] | None = None,
) -> Listening:
    """`caught`: the families of the clients conntrack shows wrong-source replies to;
    `observed`: family -> what shows the server choosing its source there (none of
    those families is caught); `configs`: pid -> its configuration files read;
    `replies`: family -> how many wrong-source replies conntrack shows."""
    observed = observed or {}
    judged: list[Judged] = []
    for listener in listeners:
        info = recognise(listener, kb, port, (configs or {}).get(listener.pid or -1))
        wild = [f for f in serves(listener) if wild_for(listener, f)]
        hit = tuple(f for f in wild if f in caught)
        if info.correct and hit and _first_reply(info, hit, replies or {}):
            # The one wrong reply its knowledge-base entry documents (first request
            # after start): the caveat, and the claim stands.
            judged.append(Judged(listener, info, caveat=hit))
        # Evidence beats a claim: a program the knowledge base trusts that was caught
        # answering from the wrong source is judged like any other wildcard server.
        elif info.correct and hit:
            doubted = Known(info.rule, info.port_only, False, info.label)
            judged.append(Judged(listener, doubted, contradicted=True))
        elif not info.correct and wild and all(f in observed for f in wild):
            # ... and a prediction: seen answering from what routing would not pick.
            shown = "; ".join(observed[f] for f in wild)
            trusted = Known(info.rule, info.port_only, True, info.label)
            judged.append(Judged(listener, trusted, observed=shown))
        else:
            judged.append(Judged(listener, info))
    serving: dict[Family, list[Listener]] = {}
    correct: dict[int, bool] = {}
    for one in judged:
        correct[id(one.listener)] = one.known.correct
        for family in serves(one.listener):
            serving.setdefault(family, []).append(one.listener)
    exposed = {
        family: any(wild_for(lst, family) and not correct[id(lst)] for lst in listeners_)
        for family, listeners_ in serving.items()
    }
    return Listening(tuple(judged), serving, exposed)


def _first_reply(info: Known, families: tuple[Family, ...], replies: Mapping[Family, int]) -> bool:
    """Whether the wrong-source replies in these families are no more than the first
    request's per socket that the program's entry documents (`wrong_first_reply`)."""
    rule = info.rule
    if rule is None or not rule.wrong_first_reply or info.port_only:
        return False
    return all(0 < replies.get(family, 0) <= 1 for family in families)


def who(listener: Listener) -> str:
    name = listener.process or "an unknown process"
    pid = f" (pid {listener.pid})" if listener.pid is not None else ""
    ref = listener.container
    unit = f" in container {ref.name}" if ref else f" in {listener.unit}" if listener.unit else ""
    return f"{name}{pid}{unit}"


def bind_text(listener: Listener) -> str:
    where = endpoint(listener.address, listener.port)
    if listener.address == "0.0.0.0":
        return f"{where} (every IPv4 address)"
    if listener.address == "::":
        scope = "every IPv6 address" if listener.v6only else "every IPv6 and IPv4 address"
        return f"[::]:{listener.port} ({scope})"
    return where


def unbound_reason(
    port: int, forwards: list[tuple[str, int]], unanswered: int
) -> Reason:
    """Why nothing on the port may (forwarded elsewhere), must (an outage) or might
    (a wrong port or namespace) matter. Only for a port without sockets."""
    if forwards:
        targets = ", ".join(endpoint(a, p) for a, p in forwards)
        first = forwards[0][1]
        return reason(
            "forwarded-by-dnat",
            f"Nothing is bound to UDP port {port} here, and none needs to be: it is "
            f"forwarded by DNAT to {targets}. The server is there: run `ctfix explain "
            f"{first}` for its sockets, client networks and fixes.",
        )
    if unanswered:
        return reason(
            "nothing-answers",
            f"NOTHING ANSWERS: nothing is bound to UDP port {port} in this namespace, yet "
            f"clients sent {unanswered} request{'s' if unanswered > 1 else ''} "
            "to it that got no reply: is the service down? (The host answers such "
            "requests with ICMP port unreachable.) The verdict speaks only of "
            "wrong-source replies; the exit status is 1 all the same.",
        )
    return reason(
        "nothing-bound",
        f"Nothing is bound to UDP port {port} in this namespace: check the port "
        "(`ss -ulpn`), or pass --netns for a service that runs in another namespace "
        "(a container: --netns container:NAME or pid:PID).",
    )


def listener_reason(one: Judged, port: int) -> Reason:
    """What one socket on the port does with the source of its replies."""
    listener, info = one.listener, one.known
    if listener.state == "connected":
        return reason(
            "connected-socket",
            f"{who(listener)} has a socket on {endpoint(listener.address, port)} "
            f"connect()ed to {listener.peer}: it accepts datagrams from that peer only "
            "(netcat does this after its first datagram); other clients get ICMP port "
            "unreachable.",
        )
    line = f"{who(listener)} listens on {bind_text(listener)}"
    if info.rule is not None and info.rule.one_way and info.correct and not one.contradicted:
        return reason(
            "one-way-service",
            line + f"; it is {info.label}, a one-way service (knowledge base): it never "
            "replies, so the source of replies does not matter, and requests without a "
            "reply are expected.",
        )
    if one.caveat and info.rule is not None:
        return reason(
            "first-reply-caveat",
            line + f"; it is {info.label}, which answers from the address each request "
            "was sent to, except the first request after it starts, which it answers "
            "from the address routing picks (a caveat the knowledge base documents). "
            "The one wrong-source reply conntrack shows (below) is that caveat, not a "
            f"sign of misbehaviour. {info.rule.fix}",
        )
    if listener.wildcard and one.observed:
        return reason(
            "observed-right-source",
            line + f": conntrack shows it answering {one.observed}. It chooses the "
            "source of its replies (IP_PKTINFO, or a socket per address), so the "
            "verdict rests on these observed replies, not on a prediction.",
        )
    if listener.wildcard and info.correct and info.in_effect:
        return reason(
            "fix-already-in-effect",
            line + f"; it is {info.label}, and its own fix is already in effect "
            f"({info.in_effect}): it answers from the address each request was sent "
            "to. Nothing to change.",
        )
    if listener.wildcard and info.correct:
        return reason(
            "answers-from-destination",
            line + f"; it is {info.label}, which answers from the address each request "
            "was sent to.",
        )
    if one.contradicted:
        return reason(
            "knowledge-base-contradicted",
            line + f": the knowledge base says {info.label} answers from the address each "
            "request was sent to, but conntrack caught this one answering from another "
            "address (below). It behaves unlike that entry: it may not be the real "
            f"{listener.process or 'program'}, or its configuration differs. The "
            "evidence wins: it is judged as a server that lets routing pick its reply "
            "source, and the knowledge base's advice is not offered.",
        )
    if listener.wildcard:
        line += (
            ": it does not choose the source of its replies, so the kernel picks it by "
            "routing toward the client, whatever address the client sent to."
        )
        if info.rule is not None and info.port_only:
            line += (
                f" Port {listener.port} is the default port of {info.label}, but "
                f"{listener.process or 'the process'} was not recognised as it by name "
                "or command line: that is a guess from the port, so the knowledge "
                "base's advice for it is not offered."
            )
        elif info.rule is not None:
            affected_now = info.rule.affected(listener.family, listener.cmdline)
            line += f" It is {info.label}" + (
                " (affected in this configuration)."
                if affected_now
                else " (affected or not depending on its configuration)."
            )
        return reason("wildcard-socket", line)
    return reason("specific-bind", line + ": replies always leave from the bound address.")
