"""Which uplink a reply leaves by, against the one its request came in by: for remote
clients, the local addresses they sent to that live on another interface than the
one their replies leave by. Pure.

Two uplinks (two providers, a VPN concentrator beside the internet link): a client
that sent to wan2's address is answered by a route lookup that picks wan1 (the
default route with the lower metric). Rewriting the reply's source (snat-zone) makes
the address right, but the packet still leaves by wan1, with wan2's address: wan1's
provider drops it (BCP 38 source address validation), and a stateful firewall on the
way drops a reply that does not come back the way its request went.

Know before changing (the definitions explain shows):
* On a host with two uplinks (default routes via two interfaces), when no client of a
  family was seen, the internet (0.0.0.0/0, ::/0, probed with an address only a
  default route covers) is an assumed client network too, addressing the addresses
  that live on the uplinks: what its clients can reach.
* Only *remote* client networks count (not a directly connected network: a neighbour
  gets its reply straight on its link, whatever uplink is the default).
* The *egress* is the interface and next hop of the same route lookup that predicts
  the reply's source (`ip route get CLIENT ipproto udp sport PORT`).
* An addressed address's own *uplink* is the interface it lives on (loopback
  excluded); it is *routed* when a route via that interface, in any table, covers the
  clients (its next hop is the uplink's gateway) or goes through a gateway at all. An
  interface with only its connected routes is a LAN, not an uplink: nothing is said.
* *Rerouted*: a netfilter rule on the port's replies sets a mark, and the lookup with
  that mark leaves by the uplink (ctfix's snat-zone reroute, or the same by hand).
  *Source-routed*: the lookup `from ADDRESS` leaves by the uplink (`ip rule from`),
  which is what a reply that already has that source (a bound or IP_PKTINFO server)
  gets; a wildcard server's reply has no source yet when it is routed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import replace

from ctfix.core.diagnosis.codes import reason
from ctfix.core.diagnosis.requests import (
    Request,
    client_networks_of,
    network_of,
    uplink_interfaces,
)
from ctfix.core.model import ClientNetwork, Reason, Uplink
from ctfix.core.snapshot import LocalAddress, NetfilterRule, Route, RouteChoice, Snapshot

#: Why a reply with the right source still fails when it leaves by the other uplink.
WHY_NOT_SOURCE_ALONE = (
    "Rewriting the source alone is not enough there: the reply would leave by the "
    "other provider with this provider's address, which providers drop (BCP 38 source "
    "address validation), and a stateful firewall on the way drops a reply that does "
    "not come back the way its request went."
)


def reply_marks(port: int, ruleset: Iterable[NetfilterRule]) -> list[int]:
    """The marks netfilter rules set on the port's replies (output path), in order."""
    marks: list[int] = []
    for rule in ruleset:
        if (
            rule.mark_to is not None
            and "mark" in rule.actions
            and rule.matches_sport
            and rule.hook in (None, "output")
            and rule.mark_to not in marks
        ):
            marks.append(rule.mark_to)
    return marks


_INTERNET = {"ipv4": "0.0.0.0/0", "ipv6": "::/0"}


def internet(
    snapshot: Snapshot, family: str, assumed: Sequence[str]
) -> list[tuple[str, str | None, list[str], bool]]:
    """The internet as an assumed client network (two uplinks only: see the module
    docstring): (network, None, addressed, seen=False), or nothing."""
    network = _INTERNET[family]
    if network not in snapshot.probes:
        return []
    on_uplinks = set(uplink_interfaces(snapshot.route_table, family))
    reachable = [
        a
        for a in assumed
        if any(la.address == a and la.interface in on_uplinks for la in snapshot.addresses)
    ]
    return [(network, None, reachable, False)] if reachable else []


def uplink_lookups(
    probes: dict[str, str],
    requests: Sequence[Request],
    addresses: Sequence[LocalAddress],
    marks: Sequence[int],
) -> list[tuple[str, int | None, str | None]]:
    """(destination, mark, source) of the extra route lookups the collector makes for
    remote client networks (seen ones, and the internet on a host with two uplinks):
    from each address their clients sent (or may send) to, and with each mark the
    port's replies get. The destination is the network's probe."""
    networks = client_networks_of(addresses)
    remote: list[tuple[str, str]] = []  # (probe, addressed)
    for request in requests:
        network, iface = network_of(request.client, networks)
        probe = probes.get(network)
        if iface is None and probe is not None:
            remote.append((probe, request.addressed))
    seen = {request.family for request in requests}
    for family, network in _INTERNET.items():
        if network in probes and family not in seen:  # assumed only while none is seen
            remote += [
                (probes[network], a.address)
                for a in addresses
                if a.family == family and not a.loopback and a.scope == "global"
            ]
    wanted: list[tuple[str, int | None, str | None]] = []
    for probe, addressed in remote:
        for lookup in ((probe, None, addressed), *((probe, m, None) for m in marks)):
            if lookup not in wanted:
                wanted.append(lookup)
    return wanted


def _lookup(
    choices: Iterable[RouteChoice], destination: str, *, mark: int | None, source: str | None
) -> RouteChoice | None:
    for choice in choices:
        if (
            choice.destination == destination
            and choice.mark == mark
            and choice.from_address == source
            and choice.error is None
        ):
            return choice
    return None


def covering_route(routes: Iterable[Route], interface: str, destination: str) -> Route | None:
    """The host's best unicast route via `interface`, in any table, that covers the
    destination: the most specific, then the lowest metric, then the main table."""
    candidates = [
        r
        for r in routes
        if r.interface == interface and r.kind == "unicast" and r.covers(destination)
    ]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda r: (
            -ipaddress.ip_network(r.destination, strict=False).prefixlen,
            r.metric,
            r.table != 254,
        ),
    )


def _leads_to_a_router(routes: Iterable[Route], interface: str, family: str) -> bool:
    return any(
        r.interface == interface and r.family == family and r.gateway is not None
        for r in routes
    )


def uplinks_for(
    snapshot: Snapshot,
    network: str,
    addressed: Sequence[str],
    choice: RouteChoice | None,
    connected_interface: str | None,
    answers_from: set[str],
) -> tuple[Uplink, ...]:
    """The addressed addresses of a remote client network whose own interface is not
    the one the reply leaves by (see the module docstring). `answers_from`: those whose
    replies already leave from them (see `leaves_wrong`)."""
    if connected_interface is not None or choice is None or choice.interface is None:
        return ()
    probe = snapshot.probes.get(network)
    if probe is None:
        return ()
    marks = reply_marks(snapshot.port, snapshot.netfilter)
    family = "ipv6" if ipaddress.ip_address(probe).version == 6 else "ipv4"
    found: list[Uplink] = []
    for address in addressed:
        local = next(
            (a for a in snapshot.addresses if a.address == address and not a.loopback), None
        )
        if local is None or local.interface in (choice.interface, "lo"):
            continue
        interface = local.interface
        route = covering_route(
            (r for r in snapshot.route_table if r.family == family), interface, probe
        )
        routed = route is not None or _leads_to_a_router(
            snapshot.route_table, interface, family
        )
        rerouted = any(
            (marked := _lookup(snapshot.route_choices, probe, mark=m, source=None)) is not None
            and marked.interface == interface
            for m in marks
        )
        sourced = _lookup(snapshot.route_choices, probe, mark=None, source=address)
        uplink = Uplink(
            address=address,
            interface=interface,
            network=local.network,
            gateway=route.gateway if route is not None else None,
            route=route.text if route is not None else None,
            routed=routed,
            rerouted=rerouted,
            source_routed=None if sourced is None else sourced.interface == interface,
        )
        found.append(replace(uplink, ok=not leaves_wrong(uplink, address in answers_from)))
    return tuple(found)


def leaves_wrong(uplink: Uplink, answers_from_it: bool) -> bool:
    """Replies to clients of `uplink.address` leave by another uplink than theirs.

    `answers_from_it`: the reply already leaves from the address (a socket bound to
    it, a server that answers from the destination): then source routing decides.
    Otherwise the reply's source is picked (or rewritten) after routing, and only a
    reroute by mark sends it out by its uplink.
    """
    if not uplink.routed:
        return False
    if answers_from_it:
        return uplink.source_routed is False
    return not uplink.rerouted


def _gateway_text(uplink: Uplink) -> str:
    if uplink.route is None:
        return (
            f"no route via {uplink.interface} covers these clients, so ctfix cannot tell "
            "its gateway; `ctfix fix --gateway ADDR` names it"
        )
    if uplink.gateway is None:
        return f"reached without a gateway: `{uplink.route}`"
    return f"gateway {uplink.gateway}: `{uplink.route}`"


def uplink_reasons(cn: ClientNetwork, answers_from: set[str]) -> list[Reason]:
    """`reply-leaves-other-uplink` for each address of the network whose replies leave
    by another uplink; `reroute-in-place` for those a reroute already sends right."""
    reasons: list[Reason] = []
    egress = cn.egress or "another interface"
    via = f" (gateway {cn.egress_gateway})" if cn.egress_gateway else ""
    for uplink in cn.uplinks:
        if uplink.rerouted and uplink.address not in answers_from:
            reasons.append(
                reason(
                    "reroute-in-place",
                    f"Replies to clients in {cn.network} of {uplink.address} are marked and "
                    f"routed out by {uplink.interface}, the uplink their requests came in "
                    f"by, instead of {egress}{via}.",
                )
            )
            continue
        if uplink.ok:
            continue
        answers_from_it = uplink.address in answers_from
        if answers_from_it:
            how = (
                f"Replies from {uplink.address} (the server answers from it) are routed by "
                f"their destination like any other: this host has no source-based rule "
                f"(`ip rule add from {uplink.address} lookup T`) that sends them out by "
                f"{uplink.interface}."
            )
        else:
            routed_by_source = (
                f" The host routes {uplink.address}'s own traffic out by "
                f"{uplink.interface} (a lookup from it does), but a wildcard server's "
                "reply has no source yet when it is routed, so that rule never sees it."
                if uplink.source_routed
                else ""
            )
            how = (
                f"{WHY_NOT_SOURCE_ALONE}{routed_by_source} `ctfix fix --method snat-zone` "
                f"also marks these replies and routes them out by {uplink.interface}."
            )
        reasons.append(
            reason(
                "reply-leaves-other-uplink",
                f"Clients in {cn.network} send to {uplink.address}, which lives on "
                f"{uplink.interface} ({_gateway_text(uplink)}), but replies to them leave "
                f"by {egress}{via}: another uplink than the one their requests came in "
                f"by. {how}",
            )
        )
    return reasons




def fix_note(clients: Iterable[ClientNetwork], method: str) -> str:
    """What a fix's advice must add on a host whose replies leave by another uplink
    (empty when none does)."""
    wrong = [u for cn in clients for u in cn.uplinks if not u.ok]
    if not wrong:
        return ""
    names = ", ".join(dict.fromkeys(f"{u.address} (by {u.interface})" for u in wrong))
    if method == "snat-zone":
        return (
            f" On this host it also sends the replies to clients of {names} out by their "
            "own uplink (a mark, a rule and a table): the rewrite alone would leave by the "
            "other provider, which drops them."
        )
    unrouted = [u for u in wrong if u.source_routed is not True]
    if not unrouted:
        return ""
    first = unrouted[0]
    return (
        f" Two uplinks: a reply that leaves from the right address is still routed by its "
        f"destination, so the host also needs a source rule per uplink, e.g. `ip rule add "
        f"from {first.address} lookup T` with `ip route add default via "
        f"{first.gateway or 'GATEWAY'} dev {first.interface} table T`."
    )
