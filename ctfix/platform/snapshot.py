"""Collect one Snapshot of a UDP port: sockets, addresses, routes, conntrack, rules.

Read-only: every call here only asks the kernel (netlink dumps and lookups, /proc,
the nftables ruleset, iptables-legacy tables that already exist).

Know before changing: everything reads the calling thread's network namespace, so
the command enters the namespace (`ctfix.commands.common.enter_netns`) before this
runs; and conntrack is asked with kernel-side filters (orig dport = port, orig
sport = port, reply sport = port for requests a DNAT forwarded to the port), so a
table of 250k entries costs a few filtered walks, not a copy. Only when requests are
left without a reply among those entries is the UDP table walked once more, for the
entries sent to those clients (a reply from another port, e.g. TFTP's): both are
ctfix.platform.port_flows. `--listen`'s live evidence is ctfix.platform.listen.

Two small exceptions to read-only, both in the namespace explained: whether a family
is tracked is probed with one datagram over loopback, to the probe's own socket (as
watch does), and `--listen` may have the command switch tracking on (`track`).
"""

from __future__ import annotations

import dataclasses
import glob
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctfix.core.decode import CtEntry, CtUsage
from ctfix.core.diagnosis import (
    forwarded_to,
    probe_destinations,
    reply_marks,
    requests_to,
    uplink_lookups,
    waiting_clients,
)
from ctfix.core.diagnosis.listeners import config_globs
from ctfix.core.model import Listener, WrongSourceReply
from ctfix.core.nat import Evaluator, NatRuleset
from ctfix.core.scan import FlowIndex
from ctfix.core.snapshot import (
    ConfigFile,
    FixRecord,
    LocalAddress,
    NetfilterRule,
    PolicyRule,
    Route,
    RouteChoice,
    Snapshot,
)
from ctfix.errors import CtfixError
from ctfix.platform import nat_rules, netfilter_read, routing, sockdiag

# `as listen`: handed on explicitly (commands/fix.py listens through this module).
from ctfix.platform.listen import listen as listen
from ctfix.platform.port_flows import conntrack_flows, replies_to

if TYPE_CHECKING:
    from ctfix.core.rules import KnowledgeBase
    from ctfix.core.unbound import UnboundTally

#: Bounds on what is read for the knowledge base's `fixed_if_config`.
CONFIG_MAX_FILES = 32
CONFIG_MAX_BYTES = 256 << 10


def tracking() -> dict[str, bool | None]:
    """Per family, whether conntrack tracks it in this namespace (None: cannot tell)."""
    from ctfix.platform import conntrack

    found: dict[str, bool | None] = {}
    for family, name in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        try:
            found[name] = conntrack.probe_tracking(family)
        except CtfixError:
            found[name] = None
    return found


def config_files(wanted: Sequence[tuple[int, str]]) -> tuple[ConfigFile, ...]:
    """Read the files a process sees at these globs (through /proc/PID/root, so a
    container's own files), bounded in number and size; unreadable ones are skipped."""
    found: list[ConfigFile] = []
    for pid, pattern in wanted:
        root = f"/proc/{pid}/root"
        for path in sorted(glob.glob(root + pattern)):
            if len(found) >= CONFIG_MAX_FILES:
                return tuple(found)
            try:
                with open(path, "rb") as fh:
                    text = fh.read(CONFIG_MAX_BYTES).decode("utf-8", "replace")
            except OSError:
                continue
            found.append(ConfigFile(pid, path[len(root) :], text))
    return tuple(found)


def fix_record(port: int, netns: str) -> FixRecord | None:
    """What `ctfix fix` recorded for the port in this namespace (None: nothing, or a
    record this user cannot read: explain then judges the rules alone)."""
    from ctfix.platform.fixstate import FixState

    try:
        fix = FixState.load(netns).fixes.get(port)
    except CtfixError:
        return None
    if fix is None or not fix.complete:
        return None
    return FixRecord(
        fix.method,
        fix.applied if fix.applied is not None else fix.started,
        tuple((str(c["service"]), str(c["target"])) for c in fix.covers),
    )


def collect(
    port: int,
    netns: str,
    listen_seconds: float = 0.0,
    kb: KnowledgeBase | None = None,
    track: Callable[[Sequence[str]], tuple[str, ...]] | None = None,
) -> Snapshot:
    """Everything explain needs about the port, from the current namespace.

    `kb`: the knowledge base (which programs change ports, which config files to
    read); `track`: how `--listen` switches tracking on (see `listen`)."""
    addresses = routing.local_addresses()
    local = frozenset(a.address for a in addresses)
    listened = listen(port, listen_seconds, addresses, kb, track) if listen_seconds > 0 else None

    owned = sockdiag.listeners(port)
    flows: list[CtEntry] = []
    conntrack_error: str | None = None
    # Before the dump: entries are dated from their time left as of this moment, and
    # an earlier moment dates them earlier, never after the fact.
    taken_at = time.time()
    usage: dict[int, CtUsage] = {}
    try:
        flows = conntrack_flows(port, usage)
    except CtfixError as err:
        conntrack_error = err.one_line()

    ruleset = netfilter_read.read()
    netfilter, netfilter_errors = netfilter_read.rules_for_port(port, ruleset)
    if conntrack_error is None:
        # A port forwarded elsewhere on this host: its requests are answered from the
        # target port, so the replies (the evidence) are that port's flows.
        from ctfix.platform import conntrack

        for _address, target in forwarded_to(port, netfilter, flows, set(local)):
            flows.extend(conntrack.dump(proto=17, sport=target))
        # Requests still without a reply: their replies may have left from another
        # port (TFTP): look them up by the client's tuple.
        flows.extend(replies_to(waiting_clients(flows, port, set(local))))
    snap = _snapshot(
        port,
        netns,
        owned,
        _Namespace.read(addresses, conntrack_error, nat_rules.read(ruleset)),
        flows,
        conntrack_error,
        (netfilter, netfilter_errors),
        list(listened.findings) if listened else [],
        listen_seconds,
        usage,
    )
    listeners = [listener for listener, _uid in owned]
    return dataclasses.replace(
        snap,
        tracking_switched_on=listened.switched if listened else (),
        config_files=config_files(config_globs(listeners, kb, port)),
        # What dates the evidence, and the fix it is judged against (explain and fix).
        taken_at=taken_at,
        listened_since=listened.since if listened else None,
        udp_timeout=_udp_timeout(),
        fix=fix_record(port, netns),
        ended_unreplied=listened.ended if listened else (),
    )


def _udp_timeout() -> int | None:
    from ctfix.platform import ctstats

    return ctstats.udp_timeout()

@dataclass(frozen=True, slots=True)
class _Namespace:
    """What is the same for every port of the namespace."""

    addresses: list[LocalAddress]
    route_table: list[Route]
    policy_rules: list[PolicyRule]
    #: per family, whether conntrack tracks it (empty: the table could not be read)
    tracking: dict[str, bool | None]
    nat: NatRuleset  # the DNAT rules, as the stale-nat check reads them
    udp_timeout_stream: int | None  # nf_conntrack_udp_timeout_stream (None: unreadable)
    taken: float  # when this was read (epoch seconds)

    @classmethod
    def read(
        cls,
        addresses: list[LocalAddress],
        conntrack_error: str | None,
        nat: NatRuleset,
    ) -> _Namespace:
        from ctfix.platform import ctstats

        probed = tracking() if conntrack_error is None else {}
        return cls(
            addresses,
            routing.route_table(),
            routing.policy_rules(),
            probed,
            nat,
            ctstats.udp_timeout_stream(),
            time.time(),
        )


def _snapshot(
    port: int,
    netns: str,
    owned: list[tuple[Listener, int]],
    namespace: _Namespace,
    flows: list[CtEntry],
    conntrack_error: str | None,
    netfilter: tuple[list[NetfilterRule], list[str]],
    live: list[WrongSourceReply],
    listen_seconds: float,
    usage: dict[int, CtUsage] | None = None,
) -> Snapshot:
    """One port's snapshot: its route lookups made, everything else as gathered."""
    listeners: tuple[Listener, ...] = tuple(listener for listener, _uid in owned)
    # Route lookups carry the owner's uid so `ip rule ... uidrange` counts too.
    uid = next((uid for listener, uid in owned if listener.state == "listening"), None)
    addresses = namespace.addresses
    local = {a.address for a in addresses}
    probes = probe_destinations(port, addresses, flows, namespace.route_table)
    choices: list[RouteChoice] = [
        routing.reply_source(destination, port, uid=uid) for destination in probes.values()
    ]
    # Remote clients: where a reply from the address they sent to, or one a netfilter
    # rule marked, would leave (two uplinks).
    choices += [
        routing.reply_source(destination, port, uid=uid, mark=mark, source=source)
        for destination, mark, source in uplink_lookups(
            probes,
            requests_to(flows, port, local),
            addresses,
            reply_marks(port, netfilter[0]),
        )
    ]
    return Snapshot(
        port=port,
        netns=netns,
        listeners=listeners,
        addresses=tuple(addresses),
        routes=tuple(route.text for route in namespace.route_table),
        route_table=tuple(namespace.route_table),
        policy_rules=tuple(namespace.policy_rules),
        route_choices=tuple(choices),
        flows=tuple(flows),
        conntrack_error=conntrack_error,
        netfilter=tuple(netfilter[0]),
        netfilter_errors=tuple(netfilter[1]),
        live_findings=tuple(live),
        listened_seconds=listen_seconds,
        probes=probes,
        tracking=namespace.tracking,
        nat_rules=namespace.nat,
        nat_usage=usage or {},
        client_interfaces=(
            client_interfaces(flows, port, local) if namespace.nat.matches_interfaces else {}
        ),
        udp_timeout_stream=namespace.udp_timeout_stream,
        taken_at=namespace.taken,
    )


def client_interfaces(flows: list[CtEntry], port: int, local: set[str]) -> dict[str, str]:
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


def collect_services(netns: str, unbound: UnboundTally | None = None) -> list[Snapshot]:
    """A snapshot of every UDP service port of the current namespace (scan), gathered
    at the cost of about one: sockets, addresses, routes, policy rules, netfilter and
    ONE conntrack dump are read once, and each port's view is cut from them; only the
    route lookups are per port (policy rules may select by source port).

    `unbound`: also count, from that same dump, the requests to ports with nothing
    bound (scan's summary, ctfix.core.unbound); the dump is taken for it even when
    there is no service."""
    from ctfix.core import scan

    owned = sockdiag.listeners(None)
    ports = scan.service_ports((listener for listener, _uid in owned), ephemeral_ports())
    addresses = routing.local_addresses()
    local = {a.address for a in addresses}
    # The ports the DNAT rules forward are services too, socket or not (a Docker
    # published port, a Service): their stale NAT entries make them broken.
    ruleset = netfilter_read.read()
    nat = nat_rules.read(ruleset)
    ports = sorted(set(ports) | (Evaluator(nat, local).forwarded_ports() or frozenset()))
    # A server gone after answering from the wrong source (netcat dies on the ICMP
    # error) leaves no socket, only its evidence: explain reports it, so scan does.
    ports = sorted(set(ports) | set(_gone_servers(ports, addresses)))
    if unbound is not None:
        unbound.begin(local, (listener.port for listener, _uid in owned), ports)
    if not ports:
        if unbound is not None:
            _count_unbound_alone(unbound, local)
        return []
    rules, rule_errors = netfilter_read.rules_for_ports(ports, ruleset)
    index = scan.FlowIndex()
    conntrack_error: str | None = None
    try:
        index = _flow_index(ports, rules, local, unbound)
    except CtfixError as err:
        conntrack_error = err.one_line()
        if unbound is not None:
            unbound.error = conntrack_error
    namespace = _Namespace.read(addresses, conntrack_error, nat)
    per_port: dict[int, list[CtEntry]] = {}
    for port in ports:
        flows = per_port[port] = scan.flows_for_port(index, port)
        if conntrack_error is None:
            for _address, target in forwarded_to(port, rules[port], flows, local):
                flows.extend(scan.flows_from_port(index, target))
    if conntrack_error is None:
        _add_replies_from_other_ports(per_port, local)
    snapshots = []
    for port, flows in per_port.items():
        snapshots.append(
            _snapshot(
                port,
                netns,
                [(listener, uid) for listener, uid in owned if listener.port == port],
                namespace,
                flows,
                conntrack_error,
                (rules[port], rule_errors),
                [],
                0.0,
            )
        )
    return snapshots


def _gone_servers(ports: list[int], addresses: Sequence[LocalAddress]) -> list[int]:
    """Ports without a socket whose conntrack flows show wrong-source replies
    (ctfix.core.scan.gone_server_ports, then answered_wrongly on explain's dumps of
    each). Nothing when the table cannot be read: the main dump says why."""
    from ctfix.core import scan
    from ctfix.platform import conntrack

    local = {a.address for a in addresses}
    try:
        host_flows = [
            entry
            for a in addresses
            if not a.loopback
            for entry in conntrack.dump(
                family=socket.AF_INET6 if a.family == "ipv6" else socket.AF_INET,
                proto=17,
                src=a.address,
            )
        ]
        return [
            port
            for port in scan.gone_server_ports(host_flows, ports, local, ephemeral_ports())
            if scan.answered_wrongly(conntrack_flows(port), local)
        ]
    except CtfixError:
        return []


def _add_replies_from_other_ports(per_port: dict[int, list[CtEntry]], local: set[str]) -> None:
    """Each port's requests left without a reply may have been answered from another
    port (TFTP): one more walk of the table, for all ports at once, by client tuple."""
    waiting = {port: waiting_clients(flows, port, local) for port, flows in per_port.items()}
    found = replies_to(set().union(*waiting.values()))
    for port, clients in waiting.items():
        per_port[port].extend(e for e in found if (e.orig.dst, e.orig.dport) in clients)


def _count_unbound_alone(unbound: UnboundTally, local: set[str]) -> None:
    """No service port: the one dump is taken for the unbound count alone."""
    try:
        _flow_index([], {}, local, unbound)
    except CtfixError as err:
        unbound.error = err.one_line()


def _flow_index(
    ports: list[int],
    rules: dict[int, list[NetfilterRule]],
    local: set[str],
    unbound: UnboundTally | None = None,
) -> FlowIndex:
    """ONE dump of the UDP table, decoding only the entries that touch a service port
    or a port a DNAT forwards one to (named by a rule); a target only the flows name
    gets a filtered dump of its own (rare: something usually listens there).
    `unbound`: the unreplied entries are counted there too (most without being built)."""
    from ctfix.core import scan
    from ctfix.platform import conntrack

    targets = {t for port in ports for _a, t in forwarded_to(port, rules[port], (), local)}
    touching = frozenset(ports) | targets
    sink = unbound.count_raw if unbound is not None else None
    dumped = conntrack.dump(proto=17, touching=touching, unreplied=sink)
    if unbound is not None:
        dumped = unbound.tee(dumped, touching)
    index = scan.index_flows(dumped, ports)
    fetched = set(touching)
    for port in ports:
        flows = scan.flows_for_port(index, port)
        for _address, target in forwarded_to(port, (), flows, local):
            if target not in fetched:
                fetched.add(target)
                index.by_sport[target] = list(conntrack.dump(proto=17, sport=target))
    return index


def ephemeral_ports() -> tuple[int, int]:
    """net.ipv4.ip_local_port_range of the current namespace (the kernel's default
    when it cannot be read): the ports clients' sockets get."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low, high = (int(word) for word in fh.read().split())
    except (OSError, ValueError):
        return (32768, 60999)
    return low, high
