"""Which clients a fix must cover, and the source their replies must have: shared by
the planners of every method.

Pure. Know before changing: only a wildcard socket answers from whatever source the
route picks; an address with a socket bound to it, or a family no wildcard serves, is
never a target (a fix there would rewrite correct replies). A *target* is a service
as its clients send to it (address, port) and the address the server must answer
them from: the same address for clients of a local address, the DNAT's target for
clients of a service a DNAT forwards here (a ClusterIP DNAT'd to the node). A
rewrite goes back to exactly what the client sent to, address and port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ctfix.core.addr import endpoint, unmap
from ctfix.core.model import ClientNetwork, Diagnosis, Family, ForwardedService, Listener

#: the DNAT hooks whose clients a fix can remember: "prerouting" (other hosts'
#: clients, e.g. pods), "output" (this host's own processes)
Hook = str


@dataclass(frozen=True, slots=True)
class Target:
    """Clients that send to `address:port`, whose replies must leave from `source`
    (and the server's port); `hooks` say where their requests arrive."""

    address: str
    port: int
    source: str
    server_port: int
    hooks: tuple[Hook, ...] = ("prerouting",)

    @property
    def family(self) -> Family:
        return family_of(self.address)

    @property
    def forwarded(self) -> bool:
        """Reached through a DNAT (address or port differ from the server's)."""
        return (self.address, self.port) != (self.source, self.server_port)

    @property
    def service(self) -> str:
        return endpoint(self.address, self.port)

    @property
    def label(self) -> str:
        """`198.51.100.13:53`, or `203.0.113.10:53, DNAT'd to 198.51.100.13:5353`."""
        if not self.forwarded:
            return self.service
        return f"{self.service}, DNAT'd to {endpoint(self.source, self.server_port)}"

    @property
    def reply_source(self) -> str:
        return endpoint(self.source, self.server_port)


def family_of(address: str) -> Family:
    return "ipv6" if ipaddress.ip_address(address).version == 6 else "ipv4"


def addressed(cn: ClientNetwork, listeners: tuple[Listener, ...]) -> list[str]:
    """Local addresses these clients sent to and a wildcard socket receives, unmapped,
    de-duplicated, in order."""
    seen: list[str] = []
    for address in cn.addressed:
        plain = unmap(address)
        if plain not in seen and unexposed_reason(plain, listeners) is None:
            seen.append(plain)
    return seen


def _serves(listener: Listener, family: Family) -> bool:
    """A wildcard socket that receives this family's datagrams."""
    if not listener.wildcard:
        return False
    if listener.family == "ipv4":
        return family == "ipv4"
    # An AF_INET6 wildcard gets IPv4 too unless IPV6_V6ONLY (unknown: Linux's default
    # net.ipv6.bindv6only=0, dual-stack).
    return family == "ipv6" or listener.v6only is not True


def unexposed_reason(address: str, listeners: tuple[Listener, ...]) -> str | None:
    """Why replies to clients of `address` cannot come from a wrong source, or None.

    Only a wildcard socket answers from whatever source the route picks. A socket
    bound to the address itself gets its datagrams (the kernel prefers the most
    specific bind) and answers from it. No socket at all (planned with --force): every
    address is assumed exposed.
    """
    if not listeners:
        return None
    port = listeners[0].port
    if any(
        lst.state == "listening" and not lst.wildcard and unmap(lst.address) == address
        for lst in listeners
    ):
        return (
            f"{address} has a UDP socket of its own on port {port}, bound to it, so its "
            "replies already leave from it"
        )
    family = family_of(address)
    if not any(_serves(lst, family) for lst in listeners):
        name = "IPv6" if family == "ipv6" else "IPv4"
        return (
            f"no {name} wildcard socket listens on port {port}, so nothing there "
            f"answers from the wrong source for {address}"
        )
    return None


def _usable(address: str) -> bool:
    """Loopback and link-local addresses are not what remote clients address."""
    ip = ipaddress.ip_address(address)
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified)


def snat_targets(diagnosis: Diagnosis, force: bool) -> tuple[list[Target], list[str]]:
    """(targets whose clients may get replies from another source, why the others are
    left alone): clients of local addresses first (those a network addresses besides
    its predicted source; every local address with --force), then the services a DNAT
    forwards here, which replace a local address's own target when they name it."""
    port = diagnosis.port
    candidates: list[str] = []
    for cn in diagnosis.clients:
        predicted = unmap(cn.predicted_source) if cn.predicted_source else None
        for address in (unmap(a) for a in cn.addressed):
            if address != predicted and address not in candidates:
                candidates.append(address)
    if not candidates and force:
        candidates = [unmap(a) for a in diagnosis.local_addresses]
    dnat = _forwarded(diagnosis.forwarded_from)
    taken = {(t.address, t.port) for t in dnat}
    found: list[Target] = []
    skipped: list[str] = []
    direct = [Target(a, port, a, port) for a in candidates if (a, port) not in taken]
    for target in (*direct, *dnat):
        if not _usable(target.address) or not _usable(target.source):
            continue
        why = unexposed_reason(target.source, diagnosis.listeners)
        if why is None:
            found.append(target)
        elif why not in skipped:
            skipped.append(why)
    skipped += [
        f"clients of {s.service} (DNAT'd to {s.target}): the DNAT matches no single "
        "address, so which one they send to is known only once conntrack shows them"
        for s in diagnosis.forwarded_from
        if not s.exact
    ]
    return found, skipped


def _forwarded(services: tuple[ForwardedService, ...]) -> list[Target]:
    """One target per service with a known address and port; a service conntrack alone
    shows (no rule read) counts as arriving in prerouting, where remote clients' do."""
    found: list[Target] = []
    for s in services:
        if s.address is None or s.port is None:
            continue
        address, source = unmap(s.address), unmap(s.target_address)
        if family_of(address) != family_of(source):
            continue
        if any((t.address, t.port) == (address, s.port) for t in found):
            continue  # one rewrite per service: its first target (a second is a tie-break)
        hooks = tuple(h for h in ("prerouting", "output") if h in s.hooks) or ("prerouting",)
        found.append(Target(address, s.port, source, s.target_port, hooks))
    return found
