"""Snapshot (+ knowledge base) -> Diagnosis: verdict, reasons, evidence, fixes. Pure.

Definitions (the contract of `ctfix explain`; keep this docstring in step with them):

* A *serving* socket is an unconnected UDP socket on the port. It serves IPv4 if it
  is AF_INET, or AF_INET6 without v6only and bound to `::`; IPv6 if AF_INET6.
  A *connected* socket on the port (netcat connect()s to its first client) serves
  only its peer; it is listed, and named in the reasons, but serves no network.
* A wildcard socket is *exposed* unless the knowledge base says its program answers
  from the request's destination (`affected` is False, matched by process name or
  command line, not by port alone) or it is ctfix's own `ctfix serve`; evidence
  beats that claim: when conntrack shows wrong-source replies for a family it
  serves, it is exposed (it may not be the real program, or its config differs).
* *Requests*: remote clients' entries whose original destination port is the port,
  or whose reply tuple's source port is (a local DNAT forwarded them here). Their
  *addressed* address is the reply tuple's source: what the server must answer from.
* *Client networks*, per family served: the networks of the clients seen in the
  conntrack table for the port (the directly connected network that contains the
  client, else its /24 or /64); when none is seen for a family, each directly
  connected network of that family (loopback and link-local left out).
* *Addressed*: for a seen network, the local addresses its clients sent to. For an
  assumed network: every global local address of the family when an exposed
  wildcard socket serves it (a client on a connected network can reach any local
  address: the host routes between its own addresses), else the specifically bound
  addresses.
* *On-link*: the host's own global addresses on the interface a network is reached
  by (its clients' gateway). Its clients may address them at any time: conntrack
  forgets a flow after 30 s, so not seeing such a client is no evidence there is
  none. They count like addressed ones for *ok* (and for the policy-route advice).
* *Predicted source*: the kernel's answer to `ip route get CLIENT ipproto udp sport
  PORT` for a client in the network (a seen client, else a probe address in it).
* A network is *ok* when each address it addresses or has on-link would be answered
  from that address: it is the predicted source, or a socket is bound to it
  specifically, or no serving socket of the family is exposed.
* Verdict: `broken` when the conntrack table (or `--listen`) shows a wrong-source
  reply, unless a remedy now in place covers it: a working snat-zone SNAT to the
  address the server had to answer from, or a policy rule on the port through which
  the route lookup for the client's network now gives that address. Such a recorded
  reply predates the change and is reported as such; one seen live (`--listen`) is
  never discounted. Else `at-risk` when some client network is not ok; else `ok`.
* *Service down*: nothing bound, no DNAT forwarding the port elsewhere on the host,
  and requests without any reply. The verdict (about wrong sources) stays `ok`;
  the headline, the reasons and the exit status (1) say it.

Know before changing: this module only reads the Snapshot; anything it needs from the
system must be collected by ctfix.platform.snapshot first (which asks
`probe_destinations` what to look up), so the analysis stays testable by hand.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctfix.core.addr import endpoint, family_name, parse_endpoint, unmap
from ctfix.core.decode import CtEntry
from ctfix.core.model import (
    ClientNetwork,
    Diagnosis,
    Evidence,
    Fix,
    Listener,
    RuleHit,
    Verdict,
    WrongSourceReply,
)
from ctfix.core.snapshot import LocalAddress, NetfilterRule, RouteChoice, Snapshot

if TYPE_CHECKING:
    from ctfix.core.detect import Finding
    from ctfix.core.rules import KnowledgeBase, ServiceRule

UDP = 17
MAIN_TABLE = 254

# -- what cannot work, and why (shown with each rule, and in the runbook) --------------

PROBLEM_SNAT_REPLY = (
    "SNAT/MASQUERADE of the reply cannot work alone: the rewritten reply has the same "
    "tuple as the request's conntrack entry, so it is dropped when its entry is "
    "confirmed (conntrack -S: insert_failed rises) and the server's sendto() fails "
    "with EPERM. It needs the reply in another conntrack zone first (snat-zone)."
)
PROBLEM_NOTRACK = (
    "NOTRACK takes the port's packets out of connection tracking: no NAT can rewrite "
    "untracked replies, and conntrack-based tools (ctfix watch) see nothing."
)
PROBLEM_DNAT_REPLY = (
    "DNAT/REDIRECT on the reply path changes where the reply goes, not the source "
    "address it leaves with: the client still sees the wrong source."
)
PROBLEM_ZONE_ALONE = (
    "a conntrack zone alone changes nothing on the wire: the reply still leaves from "
    "the routing source. It only helps together with an SNAT of the zoned replies "
    "(snat-zone)."
)
PROBLEM_SNAT_REQUEST = (
    "SNAT/MASQUERADE of the requests changes the address the server sees as the "
    "client, not the source it answers from."
)
PROBLEM_DROP_REPLY = "drops the server's replies from the port."

_NAT_SOURCE = frozenset({"snat", "masquerade"})


@dataclass(frozen=True, slots=True)
class _Request:
    client: str
    client_port: int
    addressed: str
    family: str
    replied: bool


# -- helpers shared with the platform's collector ---------------------------------------


def usable_addresses(addresses: Iterable[LocalAddress], family: str) -> list[str]:
    """Global local addresses of a family: what remote clients can address."""
    found: list[str] = []
    for addr in addresses:
        if addr.family != family or addr.loopback or addr.scope not in ("global", "site"):
            continue
        if ipaddress.ip_address(addr.address).is_link_local:
            continue
        if addr.address not in found:
            found.append(addr.address)
    return found


def connected_networks(addresses: Iterable[LocalAddress]) -> list[tuple[str, str, str]]:
    """(network, interface, family) of each directly connected, non-loopback network."""
    found: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for addr in addresses:
        if addr.loopback or addr.scope not in ("global", "site"):
            continue
        if ipaddress.ip_address(addr.address).is_link_local:
            continue
        if addr.network not in seen:
            seen.add(addr.network)
            found.append((addr.network, addr.interface, addr.family))
    return found


def _requests(flows: Iterable[CtEntry], port: int, local: set[str]) -> list[_Request]:
    """Remote clients' requests to the port, or forwarded to it by a local DNAT.

    `addressed` is the address the server must answer from for conntrack to deliver
    the reply: the request's destination after DNAT (the reply tuple's source), which
    is the address the client sent to when there is no DNAT.
    """
    requests = []
    seen: set[tuple[str, int, str, int]] = set()
    for entry in flows:
        orig = entry.orig
        if orig.proto != UDP:
            continue
        served = unmap(entry.reply.src)
        forwarded_here = entry.reply.sport == port and served in local
        if orig.dport != port and not forwarded_here:
            continue
        client = unmap(orig.src)
        if client in local or ipaddress.ip_address(client).is_loopback:
            continue  # the host's own clients are answered from what they addressed
        key = (client, orig.sport, orig.dst, orig.dport)
        if key in seen:
            continue  # the same entry from two dumps (orig dport and reply sport)
        seen.add(key)
        addressed = served if served in local else unmap(orig.dst)
        requests.append(
            _Request(client, orig.sport, addressed, family_name(client), entry.seen_reply)
        )
    return requests


def newest_last(flows: Iterable[CtEntry]) -> list[CtEntry]:
    """The entries oldest first, as far as the table tells: by time left, ascending.

    A dump comes in hash-table order; the detector calls the last client it pairs the
    latest. Entries of one kind start with the same timeout, so the newest has the
    most left (entries without a timeout first; ties keep the dump's order).
    """
    return sorted(flows, key=lambda e: -1 if e.timeout is None else e.timeout)


_DNAT_TO = re.compile(
    r"(?:\bdnat (?:ip6? )?to|--to-destination)\s+(\[[^\]]+\]|[0-9.]+)(?::(\d+))?(?![:\w])"
)


def forwarded_to(
    port: int, ruleset: Iterable[NetfilterRule], flows: Iterable[CtEntry], local: set[str]
) -> list[tuple[str, int]]:
    """(address, port) on this host that a DNAT sends the port's requests to, when the
    port differs: from the rules (`dnat to A:P`, `--to-destination A:P`) and from the
    conntrack entries of requests already forwarded."""
    found: list[tuple[str, int]] = []
    for rule in ruleset:
        if "dnat" not in rule.actions or not rule.matches_dport:
            continue
        match = _DNAT_TO.search(rule.rule)
        if match is None or match.group(2) is None:
            continue
        address, target = unmap(match.group(1).strip("[]")), int(match.group(2))
        if target != port and address in local and (address, target) not in found:
            found.append((address, target))
    for entry in flows:
        served = unmap(entry.reply.src)
        if entry.orig.proto != UDP or entry.orig.dport != port or served not in local:
            continue
        forward = (served, entry.reply.sport)
        if entry.reply.sport != port and forward not in found:
            found.append(forward)
    return found


def _onlink(addresses: Iterable[LocalAddress], interface: str | None, family: str) -> list[str]:
    """The host's usable addresses on the interface a client network is reached by.

    Its clients can always address them (one is their gateway), whether or not the
    conntrack table, which forgets a flow after 30 s, shows one doing so right now.
    """
    if interface is None:
        return []
    return usable_addresses((a for a in addresses if a.interface == interface), family)


def _network_of(client: str, connected: Sequence[tuple[str, str, str]]) -> tuple[str, str | None]:
    ip = ipaddress.ip_address(client)
    for network, interface, _family in connected:
        net = ipaddress.ip_network(network)
        if ip.version == net.version and ip in net:
            return network, interface
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False)), None


def _probe_in(network: str, local: set[str]) -> str:
    """An address in the network that is not local (a local one would answer `local`)."""
    net = ipaddress.ip_network(network)
    first = int(net.network_address)
    candidate = int(net.broadcast_address) - 1 if net.num_addresses > 2 else first

    def text(value: int) -> str:
        return str(
            ipaddress.IPv4Address(value) if net.version == 4 else ipaddress.IPv6Address(value)
        )

    while text(candidate) in local and candidate > first:
        candidate -= 1
    return text(candidate)


def probe_destinations(
    port: int, addresses: Sequence[LocalAddress], flows: Iterable[CtEntry]
) -> dict[str, str]:
    """network -> the destination to ask the route lookup about.

    Every network explain may show: those of the clients seen for the port (a seen
    client) and every directly connected network (a probe address in it).
    """
    local = {a.address for a in addresses}
    connected = connected_networks(addresses)
    probes: dict[str, str] = {}
    for request in _requests(flows, port, local):
        network, _iface = _network_of(request.client, connected)
        probes.setdefault(network, request.client)
    for network, _iface, _family in connected:
        probes.setdefault(network, _probe_in(network, local))
    return probes


# -- the analysis -----------------------------------------------------------------------


def _is_ctfix_serve(listener: Listener) -> bool:
    words = [w.rsplit("/", 1)[-1] for w in listener.cmdline]
    if "--broken" in words:  # its deliberate recvfrom/sendto twin
        return False
    return "serve" in words and any(w in ("ctfix", "ctfix.cli", "-mctfix") for w in words)


@dataclass(frozen=True, slots=True)
class _Known:
    rule: ServiceRule | None
    port_only: bool
    correct: bool  # answers from the request's destination even on a wildcard
    label: str | None


def _recognise(listener: Listener, kb: KnowledgeBase | None, port: int) -> _Known:
    if _is_ctfix_serve(listener):
        return _Known(None, False, True, "ctfix serve (IP_PKTINFO reference server)")
    if kb is None:
        return _Known(None, False, False, None)
    match = kb.match(listener.process, listener.cmdline, port)
    if match is None:
        return _Known(None, False, False, None)
    verdict = match.rule.affected(listener.family, listener.cmdline)
    correct = verdict is False and not match.port_only
    return _Known(match.rule, match.port_only, correct, match.rule.name)


def _serves(listener: Listener) -> tuple[str, ...]:
    if listener.state != "listening":
        return ()
    if listener.family == "ipv4":
        return ("ipv4",)
    if listener.address == "::" and not listener.v6only:
        return ("ipv4", "ipv6")
    if listener.address.startswith("::ffff:"):
        return ("ipv4",)
    return ("ipv6",)


def _who(listener: Listener) -> str:
    name = listener.process or "an unknown process"
    pid = f" (pid {listener.pid})" if listener.pid is not None else ""
    ref = listener.container
    unit = f" in container {ref.name}" if ref else f" in {listener.unit}" if listener.unit else ""
    return f"{name}{pid}{unit}"


def _bind_text(listener: Listener) -> str:
    where = endpoint(listener.address, listener.port)
    if listener.address == "0.0.0.0":
        return f"{where} (every IPv4 address)"
    if listener.address == "::":
        scope = "every IPv6 address" if listener.v6only else "every IPv6 and IPv4 address"
        return f"[::]:{listener.port} ({scope})"
    return where


def wrong_source_reply(finding: Finding) -> WrongSourceReply:
    """watch's detector finding as explain's evidence record."""
    return WrongSourceReply(
        client=finding.client,
        service=finding.service,
        expected_source=finding.expected_source,
        actual_source=finding.actual_source,
        mismatch=finding.mismatch,
        count=finding.count,
        clients=finding.clients,
        client_network=finding.client_network,
    )


def wrong_text(wrong: WrongSourceReply) -> str:
    """A wrong-source record in the words watch uses for a finding."""
    from ctfix.core.detect import wrong_source_text

    return wrong_source_text(
        service=wrong.service,
        expected_source=wrong.expected_source,
        actual_source=wrong.actual_source,
        mismatch=wrong.mismatch,
        count=wrong.count,
        clients=wrong.clients,
        client_network=wrong.client_network,
        client=wrong.client,
    )


def _evidence(snapshot: Snapshot, requests: list[_Request], local: set[str]) -> Evidence:
    """Wrong-source findings, and the port's requests that were answered or not.

    The detector keeps only remote clients' flows to local addresses as requests
    (ctfix.core.detect), so the server's own outgoing flows, including the snat-zone
    remedy's zoned replies, are never paired as client and reply. A request is
    answered when its entry saw a reply, or when another entry answered its client: a
    wrong-source reply (counted in `wrong_source`, not as unanswered) or a zoned reply
    that left from the right source (healthy).
    """
    from ctfix.core.detect import Detector

    detector = Detector(local_addresses=frozenset(local), track_answers=True)
    detector.resync(newest_last(snapshot.flows), now=0.0)
    answered = detector.answered or {}
    merged: dict[tuple[str, str, str], WrongSourceReply] = {}
    for finding in detector.findings.values():
        merged[finding.key] = wrong_source_reply(finding)
    for live in snapshot.live_findings:
        key = _key(live)
        # --listen resyncs from the table first: its count includes the table's.
        if key not in merged or live.count > merged[key].count:
            merged[key] = live
    wrong = tuple(sorted(merged.values(), key=lambda w: (w.service, w.actual_source, w.client)))
    healthy = unanswered = 0
    for r in requests:
        wrongly = answered.get((r.client, r.client_port))
        if r.replied or wrongly is False:
            healthy += 1
        elif wrongly is None:
            unanswered += 1
    return Evidence(wrong_source=wrong, healthy=healthy, unanswered=unanswered)


def _key(wrong: WrongSourceReply) -> tuple[str, str, str]:
    """The detector's aggregation key of a wrong-source record."""
    from ctfix.core.detect import client_network

    network = wrong.client_network or client_network(unmap(parse_endpoint(wrong.client)[0]))
    return (wrong.service, wrong.actual_source, network)


def rule_problem(rule: NetfilterRule, ruleset: Sequence[NetfilterRule]) -> str | None:
    """Why a rule that mentions the port cannot fix wrong-source replies (None: fine)."""
    same_backend = [r for r in ruleset if r.backend == rule.backend]
    zoned = any("zone" in r.actions and r.matches_sport for r in same_backend)
    snatted = any(
        r.actions & _NAT_SOURCE and (r.matches_sport or r.matches_mark or r.to_port)
        for r in same_backend
    )
    if "notrack" in rule.actions:
        return PROBLEM_NOTRACK
    if rule.actions & _NAT_SOURCE:
        if rule.matches_sport or (rule.to_port and not rule.matches_dport):
            return None if zoned else PROBLEM_SNAT_REPLY
        if rule.matches_dport:
            return PROBLEM_SNAT_REQUEST
    if rule.actions & {"dnat", "redirect"} and rule.matches_sport:
        return PROBLEM_DNAT_REPLY
    if "zone" in rule.actions and rule.matches_sport and not snatted:
        return PROBLEM_ZONE_ALONE
    if rule.actions & {"drop", "reject"} and rule.matches_sport:
        return PROBLEM_DROP_REPLY
    return None


def _choice_for(snapshot: Snapshot, network: str) -> RouteChoice | None:
    probe = snapshot.probes.get(network)
    for choice in snapshot.route_choices:
        if choice.destination == probe:
            return choice
    return None


def _clients(
    snapshot: Snapshot,
    requests: list[_Request],
    serving: dict[str, list[Listener]],
    exposed: dict[str, bool],
    rewritten: set[str],
) -> list[ClientNetwork]:
    connected = connected_networks(snapshot.addresses)
    result: list[ClientNetwork] = []
    for family in ("ipv4", "ipv6"):
        listeners = serving.get(family)
        if not listeners:
            continue
        wildcard = any(_wild_for(listener, family) for listener in listeners)
        specific = {
            unmap(listener.address) for listener in listeners if not _wild_for(listener, family)
        }
        seen: dict[str, list[str]] = {}
        interfaces: dict[str, str | None] = {}
        for request in requests:
            if request.family != family:
                continue
            network, iface = _network_of(request.client, connected)
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
        for network, iface, addressed, was_seen in networks:
            choice = _choice_for(snapshot, network)
            if wildcard:
                predicted = choice.source if choice is not None else None
            elif len(specific) == 1:
                predicted = next(iter(specific))
            else:
                predicted = None
            interface = iface or (choice.interface if choice else None)
            onlink = tuple(_onlink(snapshot.addresses, interface, family))
            # `rewritten`: a working snat-zone setup gives those clients the right source.
            ok = all(
                not exposed.get(family) or a == predicted or a in specific or a in rewritten
                for a in (*addressed, *onlink)
            )
            result.append(
                ClientNetwork(
                    network=network,
                    addressed=tuple(addressed),
                    predicted_source=predicted,
                    ok=ok,
                    interface=interface,
                    seen=was_seen,
                    onlink=onlink,
                )
            )
    result.extend(_connected_peers(snapshot, requests, result, rewritten))
    return result


def _connected_peers(
    snapshot: Snapshot, requests: list[_Request], known: list[ClientNetwork], rewritten: set[str]
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
        network, iface = _network_of(peer, connected)
        if network in covered:
            continue
        covered.add(network)
        source = unmap(listener.address)
        addressed = sorted({r.addressed for r in requests if r.client == peer}) or [source]
        onlink = tuple(_onlink(snapshot.addresses, iface, family_name(peer)))
        found.append(
            ClientNetwork(
                network=network,
                addressed=tuple(addressed),
                predicted_source=source,
                ok=all(a == source or a in rewritten for a in (*addressed, *onlink)),
                interface=iface,
                seen=True,
                onlink=onlink,
            )
        )
    return found


def _remedy_for(
    wrong: WrongSourceReply, snapshot: Snapshot, rewritten: set[str], expected: str
) -> str | None:
    """The remedy now in place that answers this record's clients from the right
    source, in words; None when there is none (the record is the present).

    Only a change on the host counts, never a claim: a working snat-zone rewrite to
    the address the server had to answer from, or a policy rule on the port through
    which the route lookup for the client's network now gives that address. A
    knowledge-base entry or a network that merely looks ok proves nothing.
    """
    if expected in rewritten:
        return f"the snat-zone rewrite to {expected}"
    policy = [r.text for r in snapshot.policy_rules if r.matches_reply_from(snapshot.port)]
    if not policy:
        return None
    client = ipaddress.ip_address(unmap(parse_endpoint(wrong.client)[0]))
    for network, probe in snapshot.probes.items():
        net = ipaddress.ip_network(network)
        if net.version != client.version or client not in net:
            continue
        choice = next((c for c in snapshot.route_choices if c.destination == probe), None)
        if (
            choice is not None
            and choice.table not in (None, MAIN_TABLE)
            and choice.source is not None
            and unmap(choice.source) == expected
        ):
            return f"the policy rule `{policy[0]}` (replies to {network} from {expected})"
    return None


def _wild_for(listener: Listener, family: str) -> bool:
    return listener.wildcard or (family == "ipv4" and listener.address == "::ffff:0.0.0.0")


def diagnose(snapshot: Snapshot, kb: KnowledgeBase | None = None) -> Diagnosis:
    """Judge the snapshot: see the module docstring for every definition used."""
    port = snapshot.port
    local = {a.address for a in snapshot.addresses}
    requests = _requests(snapshot.flows, port, local)
    evidence = _evidence(snapshot, requests, local)
    reasons: list[str] = []

    known = {id(listener): _recognise(listener, kb, port) for listener in snapshot.listeners}
    # Evidence beats a claim: a program the knowledge base trusts that was caught
    # answering from the wrong source is judged like any other wildcard server.
    caught = {family_name(unmap(parse_endpoint(w.client)[0])) for w in evidence.wrong_source}
    contradicted: set[int] = set()
    for listener in snapshot.listeners:
        info = known[id(listener)]
        if info.correct and any(f in caught and _wild_for(listener, f) for f in _serves(listener)):
            contradicted.add(id(listener))
            known[id(listener)] = _Known(info.rule, info.port_only, False, info.label)
    serving: dict[str, list[Listener]] = {}
    for listener in snapshot.listeners:
        for family in _serves(listener):
            serving.setdefault(family, []).append(listener)
    exposed = {
        family: any(_wild_for(lst, family) and not known[id(lst)].correct for lst in listeners)
        for family, listeners in serving.items()
    }
    rewritten = {
        unmap(r.nat_to)
        for r in snapshot.netfilter
        if r.nat_to
        and r.actions & _NAT_SOURCE
        and (r.matches_sport or r.to_port)
        and rule_problem(r, snapshot.netfilter) is None
    }
    clients = _clients(snapshot, requests, serving, exposed, rewritten)
    forwards = forwarded_to(port, snapshot.netfilter, snapshot.flows, local)

    # Who is on the port.
    service_down = False
    if not snapshot.listeners and forwards:
        targets = ", ".join(endpoint(a, p) for a, p in forwards)
        first = forwards[0][1]
        reasons.append(
            f"Nothing is bound to UDP port {port} here, and none needs to be: it is "
            f"forwarded by DNAT to {targets}. The server is there: run `ctfix explain "
            f"{first}` for its sockets, client networks and fixes."
        )
    elif not snapshot.listeners and evidence.unanswered:
        service_down = True
        reasons.append(
            f"NOTHING ANSWERS: nothing is bound to UDP port {port} in this namespace, yet "
            f"clients sent {evidence.unanswered} request{'s' if evidence.unanswered > 1 else ''} "
            "to it that got no reply: is the service down? (The host answers such "
            "requests with ICMP port unreachable.) The verdict speaks only of "
            "wrong-source replies; the exit status is 1 all the same."
        )
    elif not snapshot.listeners:
        reasons.append(
            f"Nothing is bound to UDP port {port} in this namespace: check the port "
            "(`ss -ulpn`), or pass --netns for a service that runs in another namespace "
            "(a container: --netns container:NAME or pid:PID)."
        )
    for listener in snapshot.listeners:
        info = known[id(listener)]
        if listener.state == "connected":
            reasons.append(
                f"{_who(listener)} has a socket on {endpoint(listener.address, port)} "
                f"connect()ed to {listener.peer}: it accepts datagrams from that peer only "
                "(netcat does this after its first datagram); other clients get ICMP port "
                "unreachable."
            )
            continue
        line = f"{_who(listener)} listens on {_bind_text(listener)}"
        if listener.wildcard and info.correct:
            line += (
                f"; it is {info.label}, which answers from the address each request was sent to."
            )
        elif id(listener) in contradicted:
            line += (
                f": the knowledge base says {info.label} answers from the address each "
                "request was sent to, but conntrack caught this one answering from another "
                "address (below). It behaves unlike that entry: it may not be the real "
                f"{listener.process or 'program'}, or its configuration differs. The "
                "evidence wins: it is judged as a server that lets routing pick its reply "
                "source, and the knowledge base's advice is not offered."
            )
        elif listener.wildcard:
            line += (
                ": it does not choose the source of its replies, so the kernel picks it by "
                "routing toward the client, whatever address the client sent to."
            )
            if info.rule is not None:
                hedge = "probably " if info.port_only else ""
                affected_now = info.rule.affected(listener.family, listener.cmdline)
                line += f" It is {hedge}{info.label}" + (
                    " (affected in this configuration)."
                    if affected_now
                    else " (affected or not depending on its configuration)."
                )
        else:
            line += ": replies always leave from the bound address."
        reasons.append(line)
    if snapshot.listeners:
        for address, target in forwards:
            reasons.append(
                f"A DNAT forwards UDP port {port} to {endpoint(address, target)}: that "
                "is another port; `ctfix explain "
                f"{target}` judges the server that answers those requests."
            )
    dnat_here = sorted(
        {
            endpoint(unmap(e.orig.dst), e.orig.dport)
            for e in snapshot.flows
            if e.orig.proto == UDP
            and e.orig.dport != port
            and e.reply.sport == port
            and unmap(e.reply.src) in local
        }
    )
    if dnat_here:
        reasons.append(
            f"Requests to {', '.join(dnat_here)} are forwarded here by DNAT: the server "
            "must answer them from the address the DNAT sent them to, or conntrack cannot "
            "translate the reply back."
        )

    # What the evidence shows.
    live = {_key(w) for w in snapshot.live_findings}
    for wrong in evidence.wrong_source:
        when = " (seen live, during --listen)" if _key(wrong) in live else ""
        reasons.append(
            f"Conntrack shows wrong-source replies{when}: {wrong_text(wrong)}. A connect()ed "
            "client drops such a reply and answers ICMP port unreachable."
        )
    if snapshot.listened_seconds and not snapshot.live_findings:
        reasons.append(
            f"No wrong-source reply was seen during {snapshot.listened_seconds:g} s of listening."
        )

    # Which client networks are exposed.
    for cn in clients:
        if cn.ok:
            continue
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
            f"Clients in {cn.network} {how} {', '.join(cn.addressed)}{also}; replies to them "
            f"leave from {source}, so those that address {', '.join(others)} get no answer."
        )
        choice = _choice_for(snapshot, cn.network)
        if choice is not None and choice.table not in (None, MAIN_TABLE):
            policy = [r.text for r in snapshot.policy_rules if r.matches_reply_from(port)]
            if policy:
                reasons.append(
                    f"The policy rule `{policy[0]}` sends these replies through table "
                    f"{choice.table}: right for clients of {source}, wrong for clients "
                    f"of {', '.join(others)}."
                )
    if (
        not evidence.wrong_source
        and any(exposed.values())
        and clients
        and all(cn.ok for cn in clients)
        and any(cn.seen for cn in clients)
    ):
        reasons.append(
            "Every client seen so far addressed the address its replies come from; a client "
            "that sends to another local address would not get an answer."
        )

    rules = tuple(
        RuleHit(
            backend=r.backend,
            table=f"{r.family} {r.table}" if r.backend == "nftables" else r.table,
            chain=r.chain,
            rule=r.rule,
            problem=rule_problem(r, snapshot.netfilter),
        )
        for r in snapshot.netfilter
    )
    if rewritten:
        reasons.append(
            f"Replies to clients of {', '.join(sorted(rewritten))} that leave from another "
            "address are rewritten by SNAT in a separate conntrack zone (snat-zone): those "
            "clients get the right source."
        )
    doomed = [r for r in rules if r.problem]
    if doomed:
        reasons.append(
            f"{len(doomed)} netfilter rule{'s' if len(doomed) > 1 else ''} on the port cannot "
            "fix this (see the rules and their problems)."
        )
    if snapshot.conntrack_error:
        reasons.append(f"No conntrack evidence: {snapshot.conntrack_error}.")

    # Recorded evidence is history only when a remedy now in place covers its clients;
    # what --listen saw happened during this run and is never discounted.
    current: list[WrongSourceReply] = []
    history: dict[str, int] = {}
    for wrong in evidence.wrong_source:
        expected = unmap(parse_endpoint(wrong.expected_source)[0])
        remedy = None if _key(wrong) in live else _remedy_for(wrong, snapshot, rewritten, expected)
        if remedy is None:
            current.append(wrong)
        else:
            history[remedy] = history.get(remedy, 0) + wrong.count
    for remedy, replies in history.items():
        reasons.append(
            f"The {replies} wrong-source repl{'ies' if replies > 1 else 'y'} in the "
            f"conntrack table went to clients that {remedy} now answers from the right "
            "source: they predate the change and expire with their entries (30 s for "
            "unreplied UDP)."
        )

    verdict: Verdict
    if current:
        verdict = "broken"
    elif any(not cn.ok for cn in clients):
        verdict = "at-risk"
    else:
        verdict = "ok"

    recognised = [known[id(lst)] for lst in snapshot.listeners if known[id(lst)].rule]
    service_rule = recognised[0].rule if recognised else None
    # Advice for the program it claims to be ("nothing to do") would be wrong for it.
    advice_rule = None if contradicted else service_rule
    # A forwarded port's fixes belong to the port it is forwarded to (`ctfix explain` there).
    wanted = verdict != "ok" and not (forwards and not snapshot.listeners)
    fixes = _fixes(port, verdict, clients, advice_rule, rules) if wanted else ()
    return Diagnosis(
        port=port,
        netns=snapshot.netns,
        verdict=verdict,
        reasons=tuple(reasons),
        listeners=snapshot.listeners,
        clients=tuple(clients),
        evidence=evidence,
        rules=rules,
        fixes=recommended_first(fixes),
        local_addresses=tuple(
            a.address for a in snapshot.addresses if not a.loopback and a.scope != "link"
        ),
        service=service_rule.name if service_rule else None,
        service_down=service_down,
        forwarded_to=tuple(endpoint(a, p) for a, p in forwards),
    )


def recommended_first(fixes: Iterable[Fix]) -> tuple[Fix, ...]:
    """The order every output lists fixes in: recommended first, then as diagnosed."""
    return tuple(sorted(fixes, key=lambda f: not f.recommended))


# -- the fixes --------------------------------------------------------------------------


def _fixes(
    port: int,
    verdict: Verdict,
    clients: Sequence[ClientNetwork],
    service: ServiceRule | None,
    rules: Sequence[RuleHit],
) -> tuple[Fix, ...]:
    affected = [cn for cn in clients if not cn.ok]
    mixed = [cn for cn in affected if len(cn.addressed) > 1]
    single = bool(affected) and not mixed
    unseen = [cn for cn in affected if not cn.seen]
    # A route gives a network's replies one source: the clients of its on-link address
    # (their gateway) would break, and conntrack's 30 s memory cannot rule them out.
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
            "in the server; nothing to maintain on the host afterwards.",
            recommended=service is None,
        )
    ]
    if service is not None:
        snippet = f"\n{service.snippet.rstrip()}" if service.snippet else ""
        reference = f"\nReference: {service.reference}" if service.reference else ""
        fixes.append(
            Fix(
                method="bind",
                summary=f"{service.name}: {service.fix.strip().split('. ')[0].rstrip('.')}.",
                detail=f"{service.why.strip()}\n{service.fix.strip()}{snippet}{reference}",
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
                "the program must support several binds.",
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
                    "clients that address the host's own address on their link (their "
                    "gateway) would stop getting answers. None was seen, but conntrack "
                    "forgets a flow after 30 s, so that is no proof. `ctfix fix "
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
