"""The conntrack entries of one UDP port, asked with kernel-side filters (orig dport,
reply sport, orig sport), and the entries sent to a set of clients. Read-only; the
calling thread's namespace.
"""

from __future__ import annotations

from ctfix.core.decode import CtEntry, CtUsage


def conntrack_flows(port: int, usage: dict[int, CtUsage] | None = None) -> list[CtEntry]:
    """Requests to the port, requests a DNAT forwarded to it, and flows the port
    started (its replies), both families, each entry once. usage: filled with the
    age and counters of the requests to the port (the stale-nat check shows them)."""
    from ctfix.platform import conntrack

    flows = list(conntrack.dump(proto=17, port=port, usage=usage))
    # A request DNAT'd from another port: orig dport is that port, reply sport is ours.
    flows.extend(e for e in conntrack.dump(proto=17, reply_sport=port) if e.orig.dport != port)
    flows.extend(e for e in conntrack.dump(proto=17, sport=port) if e.reply.sport != port)
    return flows


def replies_to(clients: set[tuple[str, int]]) -> list[CtEntry]:
    """Entries sent to these clients (orig dst:dport), from anywhere: a reply from
    another port than the service's. One walk of the UDP table, filtered here (the
    kernel's dump filter takes one port, and clients use many)."""
    from ctfix.platform import conntrack

    if not clients:
        return []
    return [e for e in conntrack.dump(proto=17) if (e.orig.dst, e.orig.dport) in clients]
