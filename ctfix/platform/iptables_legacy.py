"""iptables-legacy (x_tables) as seen from the current network namespace.

Know before changing: opening a legacy table with libiptc (python-iptables) makes
the kernel create it if it is not there yet, after which Debian's `iptables`
(nf_tables) warns "iptables-legacy tables present". Read-only code must therefore
only open the tables listed in /proc/thread-self/net/ip{,6}_tables_names (the
calling thread's namespace, also inside `netns.entered()`).
"""

from __future__ import annotations

FAMILY_FILES = {
    "ipv4": "/proc/thread-self/net/ip_tables_names",
    "ipv6": "/proc/thread-self/net/ip6_tables_names",
}


def loaded_tables(family: str = "ipv4") -> list[str]:
    """Names of the legacy tables that exist in this namespace (nothing is created)."""
    try:
        with open(FAMILY_FILES[family]) as fh:
            return [line.strip() for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def in_use() -> bool:
    """True when this namespace holds any iptables-legacy table (v4 or v6)."""
    return bool(loaded_tables("ipv4") or loaded_tables("ipv6"))
