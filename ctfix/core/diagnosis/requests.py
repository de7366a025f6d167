"""Which requests reach the port, and which of the namespace's addresses and networks
exist: the ground every other part of a diagnosis stands on. Pure.

Also what the platform's collector asks before it looks anything up
(`probe_destinations`: one route lookup per client network) and which other port a
DNAT forwards this one to (`forwarded_to`).

Know before changing: a *request* is a remote client's entry whose original
destination port is the port, or whose reply source port is (a local DNAT forwarded
it here); its *addressed* address is the reply tuple's source, what the server must
answer from. The host's own clients are not requests.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ctfix.core.addr import family_name, unmap
from ctfix.core.clientnet import ClientNetworks, Connected, connected
from ctfix.core.decode import CtEntry
from ctfix.core.model import Family
from ctfix.core.snapshot import LocalAddress, NetfilterRule, Route

UDP = 17


@dataclass(frozen=True, slots=True)
class Request:
    client: str
    client_port: int
    addressed: str
    family: Family
    replied: bool
    #: what the client sent to (address, port): before DNAT, so another address or
    #: port than the server's when a DNAT forwarded it here (`forwarded`)
    service: tuple[str, int] = ("", 0)
    forwarded: bool = False


def usable_addresses(addresses: Iterable[LocalAddress], family: Family) -> list[str]:
    """Global local addresses of a family: what remote clients can address."""
    found: list[str] = []
    for addr in addresses:
        if addr.family != family or addr.loopback or addr.scope not in ("global", "site"):
            continue
        if addr.link_local:
            continue
        if addr.address not in found:
            found.append(addr.address)
    return found


def connected_networks(addresses: Iterable[LocalAddress]) -> list[tuple[str, str, str]]:
    """(network, interface, family) of each connected client network
    (ctfix.core.clientnet: not loopback, link-local, nor a host prefix such as a /32
    on lo)."""
    return [(c.network, c.interface, c.family) for c in _connected(addresses)]


def _connected(addresses: Iterable[LocalAddress]) -> tuple[Connected, ...]:
    return connected((a.address, a.prefixlen, a.interface, a.scope) for a in addresses)


def client_networks_of(addresses: Iterable[LocalAddress]) -> ClientNetworks:
    """The one client-network definition (ctfix.core.clientnet) for these addresses:
    what watch's detector groups by, and explain's client table."""
    return ClientNetworks(_connected(addresses))


def requests_to(flows: Iterable[CtEntry], port: int, local: set[str]) -> list[Request]:
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
            Request(
                client,
                orig.sport,
                addressed,
                family_name(client),
                entry.seen_reply,
                (unmap(orig.dst), orig.dport),
                (unmap(orig.dst), orig.dport) != (served, entry.reply.sport),
            )
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


def onlink(
    addresses: Iterable[LocalAddress], interface: str | None, family: Family
) -> list[str]:
    """The host's usable addresses on the interface a client network is reached by.

    Its clients can always address them (one is their gateway), whether or not the
    conntrack table, which forgets a flow after 30 s, shows one doing so right now.
    """
    if interface is None:
        return []
    return usable_addresses((a for a in addresses if a.interface == interface), family)


def network_of(client: str, networks: ClientNetworks) -> tuple[str, str | None]:
    """The client's network and the interface it is connected on (None: routed)."""
    return networks.of(client)


def probe_in(network: str, local: set[str]) -> str:
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
    port: int,
    addresses: Sequence[LocalAddress],
    flows: Iterable[CtEntry],
    routes: Sequence[Route] = (),
) -> dict[str, str]:
    """network -> the destination to ask the route lookup about.

    Every network explain may show: those of the clients seen for the port (a seen
    client), every directly connected network (a probe address in it), and on a host
    with two uplinks the internet (0.0.0.0/0, ::/0: see `internet_probe`).
    """
    local = {a.address for a in addresses}
    networks = client_networks_of(addresses)
    probes: dict[str, str] = {}
    for request in requests_to(flows, port, local):
        network, _iface = network_of(request.client, networks)
        probes.setdefault(network, request.client)
    for each in networks.networks:
        probes.setdefault(each.network, probe_in(each.network, local))
    for family, internet in (("ipv4", "0.0.0.0/0"), ("ipv6", "::/0")):
        probe = internet_probe(routes, family)
        if probe is not None:
            probes.setdefault(internet, probe)
    return probes


def waiting_clients(flows: Iterable[CtEntry], port: int, local: set[str]) -> set[tuple[str, int]]:
    """(address, port) of the clients whose requests to the port have no reply among
    `flows`: neither on their own entry nor as an entry sent to them. Their replies,
    if any, left from another port (TFTP's transfer ids) or started another flow: the
    collector looks them up by the client's tuple (a dump filtered by port cannot)."""
    flows = list(flows)
    answered = {(e.orig.dst, e.orig.dport) for e in flows if e.orig.proto == UDP}
    return {
        (r.client, r.client_port)
        for r in requests_to(flows, port, local)
        if not r.replied and (r.client, r.client_port) not in answered
    }



def uplink_interfaces(routes: Iterable[Route], family: str) -> list[str]:
    """Interfaces with a default route of the family (any table): the host's uplinks."""
    found: list[str] = []
    for route in routes:
        if (
            route.family == family
            and route.kind == "unicast"
            and route.destination in ("0.0.0.0/0", "::/0")
            and route.interface is not None
            and route.interface not in found
        ):
            found.append(route.interface)
    return found


#: Addresses that only a default route covers on any sane host (documentation
#: ranges): what explain asks the route lookup about for "a client on the internet".
#: A lookup sends nothing.
_INTERNET = {
    "ipv4": ("203.0.113.254", "198.51.100.254", "192.0.2.254"),
    "ipv6": ("2001:db8:ffff:ffff::fe", "2001:db8:fffe:ffff::fe"),
}


def internet_probe(routes: Sequence[Route], family: str) -> str | None:
    """On a host with two uplinks (default routes via two interfaces), an address
    that only a default route covers, standing for clients on the internet; None on
    other hosts (one uplink: its clients' replies have only one way out)."""
    if len(uplink_interfaces(routes, family)) < 2:
        return None
    specific = [
        ipaddress.ip_network(r.destination, strict=False)
        for r in routes
        if r.family == family and r.destination not in ("0.0.0.0/0", "::/0")
    ]
    for candidate in _INTERNET[family]:
        ip = ipaddress.ip_address(candidate)
        if not any(ip.version == net.version and ip in net for net in specific):
            return candidate
    return None
