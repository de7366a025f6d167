"""Collect one Snapshot of a UDP port: sockets, addresses, routes, conntrack, rules.

Read-only: every call here only asks the kernel (netlink dumps and lookups, /proc,
the nftables ruleset, iptables-legacy tables that already exist).

Know before changing: everything reads the calling thread's network namespace, so
the command enters the namespace (`ctfix.commands.common.enter_netns`) before this
runs; and conntrack is asked with kernel-side filters (orig dport = port, orig
sport = port, reply sport = port for requests a DNAT forwarded to the port), so a
table of 250k entries costs a few filtered walks, not a copy.
"""

from __future__ import annotations

import select
import time

from ctfix.core.decode import CtEntry, CtUsage
from ctfix.core.diagnosis import (
    forwarded_to,
    newest_last,
    probe_destinations,
    wrong_source_reply,
)
from ctfix.core.model import Listener, WrongSourceReply
from ctfix.core.snapshot import RouteChoice, Snapshot
from ctfix.errors import CtfixError
from ctfix.platform import nat_rules, netfilter_read, routing, sockdiag


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


def _ours(service: str, expected_source: str, port: int) -> bool:
    # A DNAT'd request names the port it was sent to; the server's port is expected.
    return service.endswith(f":{port}") or expected_source.endswith(f":{port}")


def listen(port: int, seconds: float, local: frozenset[str]) -> list[WrongSourceReply]:
    """Watch conntrack events for `seconds`; the wrong-source replies of the port."""
    from ctfix.core.detectors.wrong_source import WrongSourceDetector
    from ctfix.platform import conntrack

    detector = WrongSourceDetector(local_addresses=local)
    events = conntrack.EventSocket()
    # Only what happened during the listen is live; the first resync only teaches the
    # detector the requests already waiting, and its findings are the table's.
    seen_live: set[tuple[str, str, str]] = set()
    try:
        detector.resync(newest_last(conntrack_flows(port)), now=time.time())
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([events], [], [], min(left, 0.5))
            if not readable:
                continue
            try:
                batch = events.read()
            except conntrack.Overflow:
                found = detector.resync(newest_last(conntrack_flows(port)), now=time.time())
                seen_live.update(f.key for f, is_new in found if is_new)
                continue
            now = time.time()
            for event in batch:
                result = detector.feed(event, now)
                if result is not None:
                    seen_live.add(result[0].key)
    finally:
        events.close()
    return [
        wrong_source_reply(f)
        for f in detector.findings.values()
        if f.key in seen_live and _ours(f.service, f.expected_source, port)
    ]


def collect(port: int, netns: str, listen_seconds: float = 0.0) -> Snapshot:
    """Everything explain needs about the port, from the current namespace."""
    addresses = routing.local_addresses()
    local = frozenset(a.address for a in addresses)
    live: list[WrongSourceReply] = []
    if listen_seconds > 0:
        live = listen(port, listen_seconds, local)

    owned = sockdiag.listeners(port)
    listeners: tuple[Listener, ...] = tuple(listener for listener, _uid in owned)
    # Route lookups carry the owner's uid so `ip rule ... uidrange` counts too.
    uid = next((uid for listener, uid in owned if listener.state == "listening"), None)

    flows: list[CtEntry] = []
    conntrack_error: str | None = None
    usage: dict[int, CtUsage] = {}
    taken = time.time()
    try:
        flows = conntrack_flows(port, usage)
    except CtfixError as err:
        conntrack_error = err.one_line()

    netfilter, netfilter_errors = netfilter_read.rules_for_port(port)
    if conntrack_error is None:
        # A port forwarded elsewhere on this host: its requests are answered from the
        # target port, so the replies (the evidence) are that port's flows.
        from ctfix.platform import conntrack

        for _address, target in forwarded_to(port, netfilter, flows, set(local)):
            flows.extend(conntrack.dump(proto=17, sport=target))

    nat = nat_rules.read()
    probes = probe_destinations(port, addresses, flows)
    choices: list[RouteChoice] = [
        routing.reply_source(destination, port, uid=uid) for destination in probes.values()
    ]
    return Snapshot(
        port=port,
        netns=netns,
        listeners=listeners,
        addresses=tuple(addresses),
        routes=tuple(routing.routes()),
        policy_rules=tuple(routing.policy_rules()),
        route_choices=tuple(choices),
        flows=tuple(flows),
        conntrack_error=conntrack_error,
        netfilter=tuple(netfilter),
        netfilter_errors=tuple(netfilter_errors),
        live_findings=tuple(live),
        listened_seconds=listen_seconds,
        probes=probes,
        nat_rules=nat,
        nat_usage=usage,
        client_interfaces=client_interfaces(flows, port, local) if nat.matches_interfaces else {},
        udp_timeouts=_udp_timeouts(),
        taken=taken,
    )


def client_interfaces(flows: list[CtEntry], port: int, local: frozenset[str]) -> dict[str, str]:
    """The route's interface to each client whose entry to the port was never DNAT'd."""
    found: dict[str, str] = {}
    for entry in flows:
        orig, reply = entry.orig, entry.reply
        client = orig.src
        if (
            orig.dport != port
            or client in local
            or client in found
            or (reply.src, reply.sport) != (orig.dst, orig.dport)
        ):
            continue
        interface = routing.reply_source(client, port, dport=orig.sport).interface
        if interface is not None:
            found[client] = interface
    return found


def _udp_timeouts() -> tuple[int, int]:
    from ctfix.platform import conntrack

    return conntrack.udp_timeouts()
