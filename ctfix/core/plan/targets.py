"""Which local addresses a fix must cover: shared by the planners of every method.

Pure. Know before changing: only a wildcard socket answers from whatever source the
route picks; an address with a socket bound to it, or a family no wildcard serves, is
never a target (a fix there would rewrite correct replies).
"""

from __future__ import annotations

import ipaddress

from ctfix.core.addr import unmap
from ctfix.core.model import ClientNetwork, Family, Listener


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
