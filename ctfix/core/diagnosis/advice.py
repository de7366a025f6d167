"""The fixes explain offers for a port that is not ok, with their trade-offs, and
which are recommended for this host. Pure.

Know before changing: every output lists fixes recommended first (`recommended_first`);
a fix that cannot be right here (policy-route with mixed addressing) is still listed,
saying why not, so the reader learns why the recommended one was chosen.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ctfix.core.detectors.wrong_source_words import conntrack_memory
from ctfix.core.diagnosis.netfilter import PROBLEM_NOTRACK
from ctfix.core.diagnosis.uplinks import fix_note
from ctfix.core.model import ClientNetwork, Fix, FixMethod, ForwardedService, RuleHit, Verdict
from ctfix.core.snippet import SnippetValues, for_this_host
from ctfix.core.snippet import values as snippet_values

if TYPE_CHECKING:
    from ctfix.core.rules import ServiceRule


def recommended_first(fixes: Iterable[Fix]) -> tuple[Fix, ...]:
    """The order every output lists fixes in: recommended first, then as diagnosed."""
    return tuple(sorted(fixes, key=lambda f: not f.recommended))



def dnat_notes(
    clients: Sequence[ClientNetwork], forwarded: Sequence[ForwardedService]
) -> dict[FixMethod, str]:
    """What each method does for clients that reached the server through a DNAT.

    The server must answer them from the DNAT's target, or the reply is rewritten to
    exactly what they sent to: the application fixes and snat-zone serve them; a
    route serves them when its source is the target (each network's one address is
    the target, for DNAT'd clients), but never the host's own clients of a DNAT in
    output: a reply to a local address is routed by the `local` table first.
    """
    if not forwarded:
        return {}
    exact = [f for f in forwarded if f.exact]
    named = "; ".join(f.label for f in exact) or "services DNAT'd here"
    targets = sorted({f.target_address for f in forwarded})
    notes: dict[FixMethod, str] = {
        "pktinfo": f" Clients of {named} are served too: IP_PKTINFO gives the address "
        "after DNAT, the one conntrack expects the reply from.",
        "bind": f" Bind to {' and '.join(targets)} (the DNAT target) for the clients of "
        f"{named}: their requests arrive addressed to it, and its replies are translated "
        "back to what they sent to.",
        "snat-zone": f" It covers the clients of {named} too: it remembers each by what it "
        "sent to before DNAT and rewrites the reply to exactly that address and port.",
    }
    vague = [f for f in forwarded if not f.exact]
    if vague:
        notes["snat-zone"] += (
            f" Clients of {', '.join(f.service for f in vague)} (a DNAT that matches no "
            "single address) are covered only once conntrack has shown them: plan it "
            "again then."
        )
    seen = [cn for cn in clients if cn.services]
    route = (
        f" For the clients of {', '.join(s for cn in seen for s in cn.services)} (seen "
        f"in {', '.join(cn.network for cn in seen)}), the route's source is the DNAT target, "
        "so the reply matches the DNAT'd entry and conntrack translates it back."
        if seen
        else ""
    )
    own = sorted({f.service for f in forwarded if "output" in f.hooks})
    if own:
        route += (
            f" It does not reach this host's own clients of {', '.join(own)} (a DNAT in "
            "output): a reply to a local address is routed by the `local` table before "
            "any policy rule."
        )
    if route:
        notes["policy-route"] = route
    return notes


def _first_sentence(text: str) -> tuple[str, str]:
    """(the first sentence, with its full stop; the rest, or "")."""
    first, _sep, rest = text.strip().partition(". ")
    return f"{first.rstrip('.')}.", rest.strip()


def _snippet_values(port: int, clients: Sequence[ClientNetwork]) -> SnippetValues:
    """The port, and the addresses, networks and interfaces of its clients (seen, or
    assumed from the host's connected networks)."""
    return snippet_values(
        port,
        [a for cn in clients for a in cn.addressed],
        [cn.network for cn in clients],
        [cn.interface for cn in clients if cn.interface],
    )


def fixes_for(
    port: int,
    verdict: Verdict,
    clients: Sequence[ClientNetwork],
    service: ServiceRule | None,
    rules: Sequence[RuleHit],
    forwarded: Sequence[ForwardedService] = (),
    udp_timeout: int | None = None,
) -> tuple[Fix, ...]:
    """`udp_timeout`: nf_conntrack_udp_timeout as read (None: unreadable)."""
    fixes = _fixes(port, verdict, clients, service, rules, udp_timeout)
    notes = dnat_notes(clients, forwarded)
    return tuple(replace(f, detail=f.detail + notes.get(f.method, "")) for f in fixes)


def _fixes(
    port: int,
    verdict: Verdict,
    clients: Sequence[ClientNetwork],
    service: ServiceRule | None,
    rules: Sequence[RuleHit],
    udp_timeout: int | None,
) -> tuple[Fix, ...]:
    affected = [cn for cn in clients if not cn.ok]
    mixed = [cn for cn in affected if len(cn.addressed) > 1]
    single = bool(affected) and not mixed
    unseen = [cn for cn in affected if not cn.seen]
    # A route gives a network's replies one source: the clients of its on-link address
    # (their gateway) would break, and conntrack's short memory cannot rule them out.
    spared = [(cn, [a for a in cn.onlink if a not in cn.addressed]) for cn in affected if cn.seen]
    at_stake = [(cn, extra) for cn, extra in spared if extra]
    notrack = any(r.problem == PROBLEM_NOTRACK for r in rules)
    fixes: list[Fix] = [
        Fix(
            method="pktinfo",
            summary="Make the server answer from the address each request was sent to "
            "(IP_PKTINFO / IPV6_RECVPKTINFO).",
            detail="The root-cause fix, in the application: read each request's "
            "destination address with recvmsg() and IP_PKTINFO (IPV6_RECVPKTINFO for "
            "IPv6) and pass it back in sendmsg(). `ctfix serve --port "
            f"{port}` is a reference server that does this; its library is "
            "ctfix/pktinfo.py and docs/pktinfo.md explains it. Trade-off: a code change "
            "in the server; nothing to maintain on the host afterwards."
            + fix_note(clients, "pktinfo"),
            recommended=service is None,
        )
    ]
    if service is not None:
        first, rest = _first_sentence(service.fix)
        reference = f"\nReference: {service.reference}" if service.reference else ""
        # The summary says the fix's first sentence; the detail goes on from there.
        fixes.append(
            Fix(
                method="bind",
                summary=f"{service.name}: {first}",
                detail=f"{service.why.strip()}{' ' + rest if rest else ''}"
                f"{service.upgrade_advice()}{fix_note(clients, 'bind')}"
                f"{for_this_host(service.snippet, _snippet_values(port, clients))}{reference}",
                recommended=True,
            )
        )
    else:
        fixes.append(
            Fix(
                method="bind",
                summary="Bind the service to the address(es) clients use instead of the wildcard.",
                detail="A socket bound to one address always replies from it: run one "
                "socket per local address that clients use (or the single address they "
                f"should use). `ctfix fix {port} --method bind` prints the steps. "
                "Trade-off: an address added later needs a new socket (a restart), and "
                "the program must support several binds." + fix_note(clients, "bind"),
            )
        )
    if single and not unseen:
        routes = "; ".join(f"{cn.network} from {cn.addressed[0]}" for cn in affected)
        how = (
            "A policy rule `ip rule add ipproto udp sport "
            f"{port} table T` with routes `ip route add NETWORK dev IF src ADDRESS "
            "table T` makes the kernel choose the address clients use, with no change "
            "to the server and no per-flow state."
        )
        if at_stake:
            # On their link the other address is their gateway; beyond a router, only
            # another address of the host's.
            stake = " or ".join(
                f"{' or '.join(extra)} ({'the host' if remote else 'their gateway'})"
                for cn, extra in at_stake
                for remote in [cn.egress_gateway is not None or bool(cn.uplinks)]
            )
            only_if = "; ".join(
                f"clients in {cn.network} never address {' or '.join(extra)}"
                for cn, extra in at_stake
            )
            fixes.append(
                Fix(
                    method="policy-route",
                    summary=f"Only if {only_if}: route the port's replies from the address "
                    f"seen ({routes}).",
                    detail=f"{how} But it gives all replies to a network that one source: "
                    f"clients that address {stake} would be answered from it and stop "
                    f"getting answers. None was seen, but {conntrack_memory(udp_timeout)}, "
                    "so that is no proof. `ctfix fix "
                    f"{port} --method policy-route` refuses for this reason; add --force "
                    "only if you know those clients never use that address (snat-zone "
                    "serves both).",
                )
            )
        else:
            fixes.append(
                Fix(
                    method="policy-route",
                    summary="Route the port's replies from the one address each client "
                    f"network uses ({routes}).",
                    detail=f"{how} Right only when each client network addresses one "
                    "local address, as here. `ctfix fix "
                    f"{port} --method policy-route` shows the plan; add --apply, undo with "
                    "--revert.",
                    recommended=True,
                )
            )
    else:
        if mixed and mixed[0].seen:
            why_not = f"clients in {mixed[0].network} address {' and '.join(mixed[0].addressed)}"
        elif mixed:
            why_not = (
                f"clients in {mixed[0].network} may address "
                f"{' or '.join(mixed[0].addressed)}, and none has been seen yet"
            )
        else:
            why_not = "it is not known which single address each client network uses"
        fixes.append(
            Fix(
                method="policy-route",
                summary=f"Not right here: {why_not}.",
                detail="Policy routing by source port gives all replies to a network one "
                "source address: it fixes the clients of that address and breaks the "
                "clients of every other one. Use it only when each client network "
                "addresses exactly one local address.",
            )
        )
    fixes.append(
        Fix(
            method="snat-zone",
            summary="Rewrite wrong-source replies in netfilter, for mixed addressing.",
            detail="Remember each client (address, port) as its request arrives, move "
            "the server's reply to it into another conntrack zone, then SNAT it to the "
            "address the client sent to. The zone is what makes it work: an SNAT alone "
            "collides with the request's entry and is dropped. Works for clients of "
            "every address at once, with the server unchanged. Trade-off: a set entry "
            "and a conntrack entry per client, and rules to keep. `ctfix fix "
            f"{port} --method snat-zone` shows the plan; --apply, --status, --revert."
            + fix_note(clients, "snat-zone")
            + (
                " Remove the NOTRACK rule on the port first: NAT needs conntrack."
                if notrack
                else ""
            ),
            recommended=not single or bool(unseen) or bool(at_stake),
        )
    )
    if verdict == "ok":
        return ()
    return tuple(fixes)
