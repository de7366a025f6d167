"""Addresses as users read them: `192.0.2.1:53`, `[2001:db8::1]:53`, CIDRs.

Know before changing: these strings are part of the JSON output contract (watch's
`client`, `service`, `expected_source`, `actual_source`), so keep the format stable.
IPv4-mapped IPv6 addresses (`::ffff:192.0.2.3`, what a dual-stack socket sees) are
shown as the IPv4 address they carry, because that is what the client used.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Literal

#: an address family as ctfix names it everywhere (JSON, options, records)
Family = Literal["ipv4", "ipv6"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# Pure, and watch formats the same few addresses for every wrong-source reply:
# cached, bounded (an ipaddress parse costs about a microsecond).
@functools.lru_cache(maxsize=4096)
def unmap(address: str) -> str:
    """`::ffff:192.0.2.3` -> `192.0.2.3`; anything else unchanged."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return address


def endpoint(address: str, port: int) -> str:
    """Format address and port: `a.b.c.d:p`, `[v6]:p`."""
    address = unmap(address)
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """Inverse of `endpoint`; raises ValueError with a readable message."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected ADDRESS:PORT")
    ipaddress.ip_address(host)
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be 0-65535")
    return host, int(port)


def family_name(address: str) -> Family:
    """`ipv4` or `ipv6` (as the address was used: mapped addresses count as ipv4)."""
    return "ipv6" if ":" in unmap(address) else "ipv4"
