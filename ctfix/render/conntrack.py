"""Conntrack entries printed the way `conntrack -L` / `conntrack -E` print them.

Know before changing: engineers compare these lines with what the conntrack tool
shows on their hosts, so keep its field order and the [UNREPLIED] marker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctfix.core.decode import CtEntry, CtTuple

_PROTO = {17: "udp", 6: "tcp", 1: "icmp", 58: "icmpv6"}


def _tuple(t: CtTuple) -> str:
    return f"src={t.src} dst={t.dst} sport={t.sport} dport={t.dport}"


def conntrack_line(entry: CtEntry) -> str:
    """`udp src=.. dst=.. sport=.. dport=.. [UNREPLIED] src=.. ...` (+ zone if not 0)."""
    proto = _PROTO.get(entry.proto, str(entry.proto))
    unreplied = "" if entry.seen_reply else " [UNREPLIED]"
    zone = f" zone={entry.zone}" if entry.zone else ""
    return f"{proto} {_tuple(entry.orig)}{unreplied} {_tuple(entry.reply)}{zone}"
