"""Which client networks reach the port, what they address, and what they would get
back: the exposure of a wildcard server, network by network. Pure.

Know before changing (the definitions explain shows):
* *Client networks*, per family served: the networks of the clients seen in the
  conntrack table for the port (ctfix.core.clientnet: the connected network that
  contains the client, else a /24 or /64 fallback; the same definition as watch's);
  when none is seen for a family, each connected client network of that family
  (loopback, link-local and host prefixes such as a /32 on lo left out).
* *Addressed*: for a seen network, the local addresses its clients sent to. For an
  assumed network: every global local address of the family when an exposed
  wildcard socket serves it, else the specifically bound addresses.
* *On-link*: the host's own global addresses on the interface a network is reached
  by (its clients' gateway); they count like addressed ones for *ok*.
* *Predicted source*: the kernel's answer to `ip route get CLIENT ipproto udp sport
  PORT` for a client in the network (a seen client, else a probe address in it).
* *Answered*: the addressed addresses whose requests from the network conntrack
  shows answered from the right source. Evidence beats prediction: such an address
  is fine whatever routing predicts, and one that routing would not pick (nor a
  snat-zone rewrite, nor a specific bind explain) proves the program chooses its
  source (`observed_choice`): the family is not exposed.
* A network is *ok* when each address it addresses or has on-link would be answered
  from that address: it is the predicted source, or a socket is bound to it, or no
  serving socket of the family is exposed, or a working snat-zone rewrites to it, or
  it was answered (`wrong_for` lists the others); and, for remote clients, by that
  address's own uplink (see `uplinks`). A service a DNAT forwards here (`services`)
  counts by its target address, except that only a rewrite to the service itself
  (address and port, before DNAT) rescues its clients: a rewrite to the target is for
  the target's own clients; `wrong_for` names such a service by its `addr:port`.
"""

from __future__ import annotations

import ipaddress

from ctfix.core.addr import endpoint, family_name, unmap
from ctfix.core.diagnosis import uplinks
from ctfix.core.diagnosis.codes import reason
from ctfix.core.diagnosis.evidence import MAIN_TABLE
from ctfix.core.diagnosis.listeners import Listening, wild_for
from ctfix.core.diagnosis.netfilter import Rewrites
from ctfix.core.diagnosis.requests import (
    Request,
    client_networks_of,
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


def observed_choice(
    snapshot: Snapshot, evidence: Evidence, rewritten: Rewrites
) -> dict[Family, str]:
    """family -> what shows the server choosing the source of its replies there: a
    request answered from the right source, to an address that routing would not pick
    for its client's network, that no snat-zone rewrite covers and no socket is bound
    to (those would explain it otherwise). In words, for explain's reason."""
    networks = client_networks_of(snapshot.addresses)
    bound = {unmap(lst.address) for lst in snapshot.listeners if not lst.wildcard}
    found: dict[Family, str] = {}
    for client, addressed in evidence.right_answers:
        family = family_name(client)
        if family in found or rewritten.to(addressed) or addressed in bound:
            continue
        network, _iface = network_of(client, networks)
        choice = choice_for(snapshot, network)
        if choice is None or choice.source is None or unmap(choice.source) == addressed:
            continue
        found[family] = (
            f"requests from {network} to {addressed} from {addressed}, where routing "
            f"would answer from {unmap(choice.source)}"
        )
    return found


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
    rewritten: Rewrites,
    evidence: Evidence | None = None,
) -> list[ClientNetwork]:
    """Every client network of the port, with what it addresses and would get back."""
    serving, exposed = listening.serving, listening.exposed
    connected = connected_networks(snapshot.addresses)
    networks_of = client_networks_of(snapshot.addresses)
    answered: dict[str, set[str]] = {}
    for client, target in evidence.right_answers if evidence else ():
        answered.setdefault(network_of(client, networks_of)[0], set()).add(target)
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
        # network -> (service, the address it is forwarded to) of DNAT'd requests
        forwarded: dict[str, list[tuple[tuple[str, int], str]]] = {}
        reached: dict[str, set[str]] = {}  # network -> addresses its clients sent to
        for request in requests:
            if request.family != family:
                continue
            network, iface = network_of(request.client, networks_of)
            addressed = seen.setdefault(network, [])
            interfaces[network] = iface
            if request.addressed not in addressed:
                addressed.append(request.addressed)
            pair = (request.service, request.addressed)
            if not request.forwarded:
                reached.setdefault(network, set()).add(request.addressed)
            elif pair not in forwarded.setdefault(network, []):
                forwarded[network].append(pair)
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
            right = answered.get(network, set())
            dnat = forwarded.get(network, [])
            # An address reached only through a DNAT: a rewrite to it is no help to
            # those clients (only one to their service is).
            through_dnat = {a for _service, a in dnat} - reached.get(network, set())
            # `rewritten`: a working snat-zone setup gives those clients the right source;
            # `right`: conntrack shows them answered from it (evidence beats prediction).
            wrong = _wrong_for(
                tuple(a for a in (*addressed, *near) if a not in through_dnat),
                predicted,
                bool(exposed.get(family)),
                specific | right,
                rewritten,
                tuple(dnat),
            )
            ok = not wrong
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
                    answered=tuple(a for a in addressed if a in right),
                    wrong_for=wrong,
                    services=tuple(endpoint(*service) for service, _a in dnat),
                )
            )
    result.extend(_connected_peers(snapshot, requests, result, rewritten))
    return result


def _wrong_for(
    addresses: tuple[str, ...],
    predicted: str | None,
    exposed: bool,
    right: set[str],
    rewritten: Rewrites,
    dnat: tuple[tuple[tuple[str, int], str], ...] = (),
) -> tuple[str, ...]:
    """Those of the addresses that would not be answered from themselves: not the
    predicted source, not bound to or seen answered (`right`), not rewritten by a
    working snat-zone setup; none when no exposed socket serves the family. And the
    services of `dnat` ((service, the address it is DNAT'd to)) whose address is not
    answered so, unless the rewrite goes to the service itself."""
    if not exposed:
        return ()
    wrong = [a for a in addresses if a != predicted and a not in right and not rewritten.to(a)]
    wrong += [
        endpoint(*service)
        for service, a in dnat
        if a != predicted and a not in right and not rewritten.to(*service)
    ]
    return tuple(dict.fromkeys(wrong))


def _connected_peers(
    snapshot: Snapshot, requests: list[Request], known: list[ClientNetwork], rewritten: Rewrites
) -> list[ClientNetwork]:
    """Networks served only by a connect()ed socket (netcat after its first datagram).

    Its replies leave from its local address, which the kernel fixed at connect() by
    routing: the peer's network is affected if the peer sent to another address.
    """
    networks = client_networks_of(snapshot.addresses)
    covered = {cn.network for cn in known}
    found: list[ClientNetwork] = []
    for listener in snapshot.listeners:
        if listener.state != "connected" or not listener.peer:
            continue
        peer = unmap(listener.peer.rsplit(":", 1)[0].strip("[]"))
        network, iface = network_of(peer, networks)
        if network in covered:
            continue
        covered.add(network)
        source = unmap(listener.address)
        addressed = sorted({r.addressed for r in requests if r.client == peer}) or [source]
        near = tuple(onlink(snapshot.addresses, iface, family_name(peer)))
        wrong = _wrong_for((*addressed, *near), source, True, set(), rewritten)
        found.append(
            ClientNetwork(
                network=network,
                addressed=tuple(addressed),
                predicted_source=source,
                ok=not wrong,
                interface=iface,
                seen=True,
                onlink=near,
                wrong_for=wrong,
            )
        )
    return found


def exposure_reasons(
    clients: list[ClientNetwork],
    snapshot: Snapshot,
    evidence: Evidence,
    listening: Listening,
    rewritten: Rewrites,
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
        if cn.ok or not cn.wrong_for:
            continue  # answered from the right source (a wrong uplink is said above)
        extra = [a for a in cn.onlink if a not in cn.addressed]
        others = list(cn.wrong_for)
        how = "send to" if cn.seen else "may send to"
        source = cn.predicted_source or "an address routing picks"
        # The same addresses as the client table's "clients send to" column.
        also = (
            f" and may address {', '.join(extra)} (the host's own address on "
            f"{cn.interface}, their gateway)"
            if extra
            else ""
        )
        dnat = f" (also as {', '.join(cn.services)}, through DNAT)" if cn.services else ""
        answered = (
            f" (conntrack shows those of {', '.join(cn.answered)} answered from it)"
            if cn.answered
            else ""
        )
        reasons.append(
            reason(
                "client-network-exposed",
                f"Clients in {cn.network} {how} {', '.join(cn.addressed)}{dnat}{also}"
                f"{answered}; replies to them leave from {source}, so those that address "
                f"{', '.join(others)} get no answer.",
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
    untried = _untried(clients, snapshot, listening, rewritten)
    if not evidence.wrong_source and clients and all(cn.ok for cn in clients) and untried:
        reasons.append(
            reason(
                "only-matching-clients-seen",
                "Every client seen so far addressed the address its replies come from; "
                + "; ".join(
                    f"a client in {network} that sends to {' or '.join(addresses)} would "
                    "not get an answer"
                    for network, addresses in untried.items()
                )
                + " (no such request was seen, nor answered).",
            )
        )
    return reasons


def _untried(
    clients: list[ClientNetwork], snapshot: Snapshot, listening: Listening, rewritten: Rewrites
) -> dict[str, list[str]]:
    """Seen network -> the local addresses its clients have not used, that nothing would
    answer them from (routing picks another, no rewrite, no socket bound to it): what
    the only-matching reason may claim, and nothing else."""
    bound = {unmap(lst.address) for lst in snapshot.listeners if not lst.wildcard}
    found: dict[str, list[str]] = {}
    for cn in clients:
        family = family_name(cn.network.split("/", 1)[0])
        if not cn.seen or not listening.exposed.get(family):
            continue
        others = [
            a
            for a in usable_addresses(snapshot.addresses, family)
            if a != cn.predicted_source
            and a not in cn.addressed
            and not rewritten.to(a)
            and a not in bound
        ]
        if others:
            found[cn.network] = others
    return found
