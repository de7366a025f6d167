"""What `ctfix scan` needs beyond explain's diagnosis: which ports are services, and
each port's view cut from one whole-namespace conntrack dump. Pure.

Know before changing: a port's flows must be the entries explain's three filtered
dumps give, in the same order (orig dport = port; then reply sport = port, sent to
another port; then orig sport = port, answered from another port), so that scan and
`explain PORT` reach the same verdict from the same table; `flows_for_port` does
that from an index built in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ctfix.core.decode import IPS_SEEN_REPLY, CtEntry
from ctfix.core.detectors.wrong_source import WrongSourceDetector
from ctfix.core.diagnosis.requests import newest_last
from ctfix.core.model import Diagnosis, Listener, Verdict
from ctfix.core.zones import is_fix_zone

UDP = 17

#: how bad each verdict is, for worst-first order
_RANK: dict[Verdict, int] = {"broken": 0, "at-risk": 1, "unknown": 2, "ok": 3}


def service_ports(listeners: Iterable[Listener], ephemeral: tuple[int, int]) -> list[int]:
    """The ports a UDP service listens on, ascending.

    An unconnected socket serves its port. A connect()ed socket is a client's unless
    its local port is outside the ephemeral range (`ip_local_port_range`): then it is
    a server that connected to its first peer (netcat after its first datagram).
    """
    low, high = ephemeral
    ports = {
        lst.port
        for lst in listeners
        if lst.state == "listening" or not low <= lst.port <= high
    }
    return sorted(ports)


#: At most this many ports are looked at for a server gone after wrong-source replies
#: (`gone_server_ports`): each costs a filtered dump.
MAX_GONE_PORTS = 64


def gone_server_ports(
    host_flows: Iterable[CtEntry],
    ports: Iterable[int],
    local: set[str],
    ephemeral: tuple[int, int],
) -> list[int]:
    """Ports a server may have answered from before it went away (netcat exits on the
    ICMP error its wrong-source reply brings back): the source ports of unreplied
    flows this host started (`host_flows`: orig src local) to a remote client, outside
    the ephemeral range (a client's port) and not a service port already; not the
    snat-zone remedy's rewritten replies (ctfix.core.zones). Candidates only:
    `answered_wrongly` decides from each port's own flows. Ascending, at most
    MAX_GONE_PORTS."""
    known = set(ports)
    low, high = ephemeral
    found: set[int] = set()
    for entry in host_flows:
        orig = entry.orig
        if (
            orig.proto != UDP
            or entry.status & IPS_SEEN_REPLY
            or is_fix_zone(entry.zone)
            or orig.sport in known
            or low <= orig.sport <= high
            or orig.src not in local
            or orig.dst in local
        ):
            continue
        found.add(orig.sport)
    return sorted(found)[:MAX_GONE_PORTS]


def answered_wrongly(flows: Sequence[CtEntry], local: set[str]) -> bool:
    """Whether a port's flows (explain's dumps) show a wrong-source reply: what makes a
    port with no socket left a service to report (scan, check), as explain reports it."""
    detector = WrongSourceDetector(local_addresses=frozenset(local))
    detector.examine(newest_last(flows), 0.0)
    return bool(detector.found)


@dataclass(frozen=True, slots=True)
class FlowIndex:
    """A whole-namespace UDP conntrack dump, indexed by the three ports explain asks
    about; each list keeps the dump's order."""

    by_dport: dict[int, list[CtEntry]] = field(default_factory=dict)
    by_reply_sport: dict[int, list[CtEntry]] = field(default_factory=dict)
    by_sport: dict[int, list[CtEntry]] = field(default_factory=dict)


def index_flows(entries: Iterable[CtEntry], ports: Iterable[int]) -> FlowIndex:
    """One pass over the dump; only entries that touch one of `ports` are kept (and,
    through orig sport, every port: a DNAT may forward a service to any port)."""
    wanted = set(ports)
    index = FlowIndex()
    by_dport, by_reply_sport, by_sport = index.by_dport, index.by_reply_sport, index.by_sport
    for entry in entries:
        orig = entry.orig
        if orig.proto != UDP:
            continue
        if orig.dport in wanted:
            by_dport.setdefault(orig.dport, []).append(entry)
        reply_sport = entry.reply.sport
        if reply_sport in wanted and orig.dport != reply_sport:
            by_reply_sport.setdefault(reply_sport, []).append(entry)
        by_sport.setdefault(orig.sport, []).append(entry)
    return index


def flows_for_port(index: FlowIndex, port: int) -> list[CtEntry]:
    """The port's entries, as explain's filtered dumps give them."""
    return [
        *index.by_dport.get(port, ()),
        *index.by_reply_sport.get(port, ()),
        *(e for e in index.by_sport.get(port, ()) if e.reply.sport != port),
    ]


def flows_from_port(index: FlowIndex, port: int) -> list[CtEntry]:
    """Entries a service on `port` started (orig sport), as `dump(sport=port)` gives."""
    return list(index.by_sport.get(port, ()))


def severity(d: Diagnosis) -> int:
    """0 broken, 1 at-risk (or an outage), 2 unknown (ctfix cannot see), 3 ok: lower
    is worse."""
    rank = _RANK[d.verdict]
    return min(rank, 1) if d.service_down else rank


def healthy(d: Diagnosis) -> bool:
    """The port is fine: ok, and not an outage (nothing bound, clients unanswered),
    which the verdict (about wrong sources) would call ok. explain exits 0 only then."""
    return d.verdict == "ok" and not d.service_down


def verdict_counts(diagnoses: Iterable[Diagnosis]) -> dict[Verdict, int]:
    """Services per verdict, every verdict present, worst first (scan's `counts`)."""
    verdicts = [d.verdict for d in diagnoses]
    return {v: verdicts.count(v) for v in sorted(_RANK, key=_RANK.__getitem__)}


def worst_first(diagnoses: Sequence[Diagnosis]) -> list[Diagnosis]:
    """broken, then at-risk, then unknown (ctfix cannot see), then ok (an outage
    counts as at-risk); by port within."""
    return sorted(diagnoses, key=lambda d: (severity(d), d.port))
