"""Which client networks reach the port, what they address, and what they would get
back: the exposure of a wildcard server, network by network. Pure.

Know before changing (the definitions explain shows):
* *Client networks*, per family served: the networks of the clients seen in the
  conntrack table for the port (the directly connected network that contains the
  client, else its /24 or /64); when none is seen for a family, each directly
  connected network of that family (loopback and link-local left out).
* *Addressed*: for a seen network, the local addresses its clients sent to. For an
  assumed network: every global local address of the family when an exposed
  wildcard socket serves it, else the specifically bound addresses.
* *On-link*: the host's own global addresses on the interface a network is reached
  by (its clients' gateway); they count like addressed ones for *ok*.
* *Predicted source*: the kernel's answer to `ip route get CLIENT ipproto udp sport
  PORT` for a client in the network (a seen client, else a probe address in it).
* A network is *ok* when each address it addresses or has on-link would be answered
  from that address: it is the predicted source, or a socket is bound to it, or no
  serving socket of the family is exposed, or a working snat-zone rewrites to it;
  and, for remote clients, by that address's own uplink (see `uplinks`).
"""

from __future__ import annotations

import ipaddress

from ctfix.core.addr import family_name, unmap
from ctfix.core.diagnosis import uplinks
from ctfix.core.diagnosis.codes import reason
from ctfix.core.diagnosis.evidence import MAIN_TABLE
from ctfix.core.diagnosis.listeners import Listening, wild_for
from ctfix.core.diagnosis.requests import (
    Request,
    connected_networks,
    network_of,
    onlink,
    usable_addresses,
)
from ctfix.core.model import ClientNetwork, Evidence, Family, Reason
from ctfix.core.snapshot import RouteChoice, Snapshot

_FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")


def choice_for(snapshot: Snapshot, network: str) -> RouteChoice | None:
    """The plain lookup for the network's probe (no mark, no source given)."""
    probe = snapshot.probes.get(network)
    for choice in snapshot.route_choices:
        if choice.destination == probe and choice.mark is None and choice.from_address is None:
            return choice
    return None


def answering_from(
    listening: Listening, family: Family, addresses: tuple[str, ...] | list[str]
) -> set[str]:
    """Those of `addresses` whose replies already leave from them: bound to by a
    socket, or served by no exposed socket of the family."""
    if not listening.exposed.get(family):
        return set(addresses)
    return {
        unmap(listener.address)
        for listener in listening.serving.get(family, ())
        if not wild_for(listener, family)
    } & set(addresses)


def client_networks(
    snapshot: Snapshot,
    requests: list[Request],
    listening: Listening,
    rewritten: set[str],
) -> list[ClientNetwork]:
    """Every client network of the port, with what it addresses and would get back."""
    serving, exposed = listening.serving, listening.exposed
    connected = connected_networks(snapshot.addresses)
    result: list[ClientNetwork] = []
    for family in _FAMILIES:
        listeners = serving.get(family)
        if not listeners:
            continue
        wildcard = any(wild_for(listener, family) for listener in listeners)
        specific = {
            unmap(listener.address) for listener in listeners if not wild_for(listener, family)
        }
        seen: dict[str, list[str]] = {}
        interfaces: dict[str, str | None] = {}
        for request in requests:
            if request.family != family:
                continue
            network, iface = network_of(request.client, connected)
            addressed = seen.setdefault(network, [])
            interfaces[network] = iface
            if request.addressed not in addressed:
                addressed.append(request.addressed)
        if seen:
            networks = [(net, interfaces[net], sorted(addr), True) for net, addr in seen.items()]
        else:
            assumed = (
                usable_addresses(snapshot.addresses, family)
                if wildcard and exposed.get(family)
                else sorted(a for a in specific if not ipaddress.ip_address(a).is_loopback)
            )
            if wildcard and not exposed.get(family) and not assumed:
                assumed = usable_addresses(snapshot.addresses, family)
            networks = [
                (net, iface, assumed, False) for net, iface, fam in connected if fam == family
            ]
            networks += uplinks.internet(snapshot, family, assumed)  # two uplinks
        for network, iface, addressed, was_seen in networks:
            choice = choice_for(snapshot, network)
            if wildcard:
                predicted = choice.source if choice is not None else None
            elif len(specific) == 1:
                predicted = next(iter(specific))
            else:
                predicted = None
            interface = iface or (choice.interface if choice else None)
            near = tuple(onlink(snapshot.addresses, interface, family))
            ok = _right_source(
                (*addressed, *near), predicted, bool(exposed.get(family)), specific, rewritten
            )
            # Remote clients: does each address's reply leave by its own uplink?
            other = uplinks.uplinks_for(
                snapshot, network, addressed, choice, iface,
                answering_from(listening, family, addressed),
            )
            ok = ok and all(u.ok for u in other)
            result.append(
                ClientNetwork(
                    network=network,
                    addressed=tuple(addressed),
                    predicted_source=predicted,
                    ok=ok,
                    interface=interface,
                    seen=was_seen,
                    onlink=near,
                    egress=choice.interface if choice else None,
                    egress_gateway=choice.gateway if choice else None,
                    uplinks=other,
                    probe=snapshot.probes.get(network),
                )
            )
    result.extend(_connected_peers(snapshot, requests, result, rewritten))
    return result


def _right_source(
    addresses: tuple[str, ...],
    predicted: str | None,
    exposed: bool,
    specific: set[str],
    rewritten: set[str],
) -> bool:
    """Each address is answered from itself: the predicted source, bound to, or served
    by no exposed socket; `rewritten`: a working snat-zone setup gives those clients
    the right source."""
    return all(
        not exposed or a == predicted or a in specific or a in rewritten for a in addresses
    )


def _connected_peers(
    snapshot: Snapshot, requests: list[Request], known: list[ClientNetwork], rewritten: set[str]
) -> list[ClientNetwork]:
    """Networks served only by a connect()ed socket (netcat after its first datagram).

    Its replies leave from its local address, which the kernel fixed at connect() by
    routing: the peer's network is affected if the peer sent to another address.
    """
    connected = connected_networks(snapshot.addresses)
    covered = {cn.network for cn in known}
    found: list[ClientNetwork] = []
    for listener in snapshot.listeners:
        if listener.state != "connected" or not listener.peer:
            continue
        peer = unmap(listener.peer.rsplit(":", 1)[0].strip("[]"))
        network, iface = network_of(peer, connected)
        if network in covered:
            continue
        covered.add(network)
        source = unmap(listener.address)
        addressed = sorted({r.addressed for r in requests if r.client == peer}) or [source]
        near = tuple(onlink(snapshot.addresses, iface, family_name(peer)))
        found.append(
            ClientNetwork(
                network=network,
                addressed=tuple(addressed),
                predicted_source=source,
                ok=all(a == source or a in rewritten for a in (*addressed, *near)),
                interface=iface,
                seen=True,
                onlink=near,
            )
        )
    return found


def exposure_reasons(
    clients: list[ClientNetwork],
    snapshot: Snapshot,
    evidence: Evidence,
    listening: Listening,
    rewritten: set[str],
) -> list[Reason]:
    """Each exposed client network (and a policy rule that makes it so), each address
    whose replies leave by another uplink, or that the clients seen so far happen to
    be served right."""
    reasons: list[Reason] = []
    other_uplink: list[Reason] = []  # said after who is exposed
    for cn in clients:
        family = family_name(cn.network.split("/")[0])
        other_uplink += uplinks.uplink_reasons(
            cn, answering_from(listening, family, cn.addressed)
        )
        everyone = (*cn.addressed, *cn.onlink)
        if cn.ok or _right_source(
            everyone,
            cn.predicted_source,
            bool(listening.exposed.get(family)),
            answering_from(listening, family, everyone),
            rewritten,
        ):
            continue  # answered from the right source (a wrong uplink is said above)
        extra = [a for a in cn.onlink if a not in cn.addressed]
        others = [a for a in (*cn.addressed, *extra) if a != cn.predicted_source]
        how = "send to" if cn.seen else "may send to"
        source = cn.predicted_source or "an address routing picks"
        # The same addresses as the client table's "clients send to" column.
        also = (
            f" and may address {', '.join(extra)} (the host's own address on "
            f"{cn.interface}, their gateway)"
            if extra
            else ""
        )
        reasons.append(
            reason(
                "client-network-exposed",
                f"Clients in {cn.network} {how} {', '.join(cn.addressed)}{also}; replies to "
                f"them leave from {source}, so those that address {', '.join(others)} get no "
                "answer.",
            )
        )
        choice = choice_for(snapshot, cn.network)
        if choice is not None and choice.table not in (None, MAIN_TABLE):
            policy = [r.text for r in snapshot.policy_rules if r.matches_reply_from(snapshot.port)]
            if policy:
                reasons.append(
                    reason(
                        "policy-rule-wrong",
                        f"The policy rule `{policy[0]}` sends these replies through table "
                        f"{choice.table}: right for clients of {source}, wrong for clients "
                        f"of {', '.join(others)}.",
                    )
                )
    reasons += other_uplink
    if (
        not evidence.wrong_source
        and any(listening.exposed.values())
        and clients
        and all(cn.ok for cn in clients)
        and any(cn.seen for cn in clients)
    ):
        reasons.append(
            reason(
                "only-matching-clients-seen",
                "Every client seen so far addressed the address its replies come from; a "
                "client that sends to another local address would not get an answer.",
            )
        )
    return reasons
