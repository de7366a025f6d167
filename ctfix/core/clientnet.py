"""The one definition of a client's network, used by watch's records, explain and the
metrics alike. Pure.

A client's network is the namespace's directly connected network that contains it
(the prefix of the local address on the link it is on: a /25 stays a /25). A routed
client (on no connected network) falls back to the largest block of at most /24
(IPv4) or /64 (IPv6) around it that overlaps no connected network: its /24 or /64
usually, narrower where a connected network shares that block (so a routed client
never lands in the same group as a connected one).

Not client networks: loopback (the interface `lo`, 127.0.0.0/8, ::1, host scope),
link-local addresses, and host prefixes (a /32 or /128, e.g. an anycast or VIP
address on `lo`, or the local end of a point-to-point link): nobody else is on them.

Know before changing: this is a contract shared by three outputs (watch's
`client_network`, explain's `clients[].network` and `evidence.wrong_source[]`, the
metrics' label); change it here only, and say so in docs/json.md.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ctfix.core.addr import unmap

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The fallback prefix for routed clients, per IP version.
ROUTED_PREFIX = {4: 24, 6: 64}

#: Bound on the per-address cache (watch asks about the same few clients).
_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class Connected:
    """One directly connected network of the namespace, and its interface."""

    network: str  # CIDR, e.g. "192.0.2.0/25"
    interface: str
    family: str  # "ipv4" | "ipv6"


def is_client_network(address: str, prefixlen: int, interface: str, scope: str = "global") -> bool:
    """Whether a local address's connected network can hold clients (module doc)."""
    if interface == "lo" or scope not in ("global", "site"):
        return False
    ip = ipaddress.ip_address(address)
    if ip.is_loopback or ip.is_link_local:
        return False
    return prefixlen < ip.max_prefixlen


def connected(
    addresses: Iterable[tuple[str, int, str, str]],
) -> tuple[Connected, ...]:
    """The connected client networks from (address, prefixlen, interface, scope) of the
    namespace's addresses, each once, in the order given."""
    found: list[Connected] = []
    seen: set[str] = set()
    for address, prefixlen, interface, scope in addresses:
        if not is_client_network(address, prefixlen, interface, scope):
            continue
        net = ipaddress.ip_interface(f"{address}/{prefixlen}").network
        text = str(net)
        if text not in seen:
            seen.add(text)
            found.append(Connected(text, interface, "ipv4" if net.version == 4 else "ipv6"))
    return tuple(found)


@dataclass(slots=True)
class ClientNetworks:
    """`of(client)` -> (network, interface or None) by the module's definition.

    Built from the namespace's connected networks; cheap to ask again for the same
    client (a bounded cache: watch asks once per wrong-source reply).
    """

    networks: Sequence[Connected] = ()
    _parsed: list[tuple[Network, Connected]] = field(default_factory=list, init=False)
    _cache: dict[str, tuple[str, str | None]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._parsed = [(ipaddress.ip_network(c.network), c) for c in self.networks]

    def of(self, client: str) -> tuple[str, str | None]:
        found = self._cache.get(client)
        if found is None:
            found = self._lookup(client)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[client] = found
        return found

    def network(self, client: str) -> str:
        return self.of(client)[0]

    def _lookup(self, client: str) -> tuple[str, str | None]:
        ip = ipaddress.ip_address(unmap(client))
        best: tuple[Network, Connected] | None = None
        for net, conn in self._parsed:
            # the most specific, as routing would pick
            if (
                net.version == ip.version
                and ip in net
                and (best is None or net.prefixlen > best[0].prefixlen)
            ):
                best = (net, conn)
        if best is not None:
            return best[1].network, best[1].interface
        return str(self._routed(ip)), None

    def _routed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Network:
        """The fallback block: at most /24 or /64, overlapping no connected network."""
        prefix = ROUTED_PREFIX[ip.version]
        while True:
            block = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
            if prefix >= ip.max_prefixlen or not any(
                net.version == ip.version and block.overlaps(net) for net, _c in self._parsed
            ):
                return block
            prefix += 1
