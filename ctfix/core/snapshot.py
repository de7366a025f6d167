"""What explain collected about one UDP port in one namespace, as plain values.

`ctfix.platform.snapshot.collect()` fills a `Snapshot` from the kernel;
`ctfix.core.diagnosis.diagnose()` reads it without touching the system, so the
analysis is tested on hand-built snapshots.

Know before changing: a Snapshot holds *observations* only (what the kernel said),
never conclusions; anything that judges (is this affected, can this rule help)
belongs in ctfix/core/diagnosis/, so that tests can build any situation by hand.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from ctfix.core.decode import CtEntry, CtUsage
from ctfix.core.model import Family, Listener, NetfilterBackend, WrongSourceReply
from ctfix.core.nat import NatRuleset

#: rtm_scope as `ip addr` names it ("site" only for deprecated IPv6 site-locals)
AddressScope = Literal["global", "site", "link", "host", "nowhere"]


@dataclass(frozen=True, slots=True)
class LocalAddress:
    """An address configured on an interface of the namespace."""

    interface: str
    address: str
    prefixlen: int
    family: Family
    scope: AddressScope = "global"

    @property
    def network(self) -> str:
        return _network(self.address, self.prefixlen)

    @property
    def loopback(self) -> bool:
        return self.scope == "host" or _kind(self.address)[0]

    @property
    def link_local(self) -> bool:
        return _kind(self.address)[1]


# Pure, and asked again for every port scan diagnoses: cached, bounded.
@functools.lru_cache(maxsize=1024)
def _network(address: str, prefixlen: int) -> str:
    return str(ipaddress.ip_interface(f"{address}/{prefixlen}").network)


@functools.lru_cache(maxsize=1024)
def _kind(address: str) -> tuple[bool, bool]:
    """(loopback, link-local)"""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback, ip.is_link_local


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One `ip rule`, as `ip rule show` prints it, with what matters for a port."""

    family: Family
    priority: int
    text: str  # "100: from all ipproto udp sport 5353 lookup 100"
    table: int | None = None
    ipproto: int | None = None
    sport: tuple[int, int] | None = None  # inclusive range
    dport: tuple[int, int] | None = None
    fwmark: int | None = None  # `fwmark M[/MASK]`: packets whose mark & mask == M
    fwmask: int | None = None

    def matches_reply_from(self, port: int) -> bool:
        """True when the rule selects UDP replies sent from `port` specifically."""
        if self.sport is None or not self.sport[0] <= port <= self.sport[1]:
            return False
        return self.ipproto in (None, 17)


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The kernel's answer to `ip route get DEST ipproto udp sport PORT`, optionally
    `from SOURCE` or `mark M` (what a reply that already has a source, or that a
    netfilter rule marked, would get)."""

    destination: str
    source: str | None  # the source it would choose (RTA_PREFSRC), or the one given
    interface: str | None = None
    table: int | None = None
    error: str | None = None  # "Network is unreachable", ...
    gateway: str | None = None  # the next hop (RTA_GATEWAY); None: the client is on-link
    mark: int | None = None  # the lookup was asked with this fwmark
    from_address: str | None = None  # the lookup was asked with this source address


@dataclass(frozen=True, slots=True)
class Route:
    """One route of any table (`ip route show table all`), with its next hop.

    A multipath route is one Route per next hop (same destination, table, metric).
    """

    family: str  # "ipv4" | "ipv6"
    destination: str  # a CIDR; the default route is 0.0.0.0/0 or ::/0
    interface: str | None
    gateway: str | None = None
    table: int = 254
    metric: int = 0
    kind: str = "unicast"  # "unicast" | "blackhole" | "unreachable" | "prohibit"
    protocol: int = 0  # rtm_protocol: 2 kernel, 3 boot, 4 static, 199 ctfix, ...
    text: str = ""  # as `ip route` prints it

    def covers(self, address: str) -> bool:
        """The route's destination contains the address (same family)."""
        ip = ipaddress.ip_address(address)
        net = ipaddress.ip_network(self.destination, strict=False)
        return ip.version == net.version and ip in net


@dataclass(frozen=True, slots=True)
class NetfilterRule:
    """A netfilter rule that mentions the port, with what it does to packets.

    `actions` are the statements it applies, normalised across backends:
    "snat", "masquerade", "dnat", "redirect", "notrack", "zone", "mark", "set-add",
    "accept", "drop", "reject", "log", "other". `matches_sport`/`matches_dport` say
    on which side the port appears (sport: the server's replies; dport: requests).
    """

    backend: NetfilterBackend
    family: str  # "ip", "ip6", "inet", ... (nft) | "ipv4" | "ipv6" (legacy)
    table: str
    chain: str
    rule: str
    actions: frozenset[str] = frozenset()
    matches_sport: bool = False
    matches_dport: bool = False
    to_port: bool = False  # the port appears only in a NAT target (`to :P`)
    hook: str | None = None  # "prerouting", "output", "postrouting", ... when known
    matches_mark: bool = False
    nat_to: str | None = None  # the address a snat/dnat statement rewrites to
    nat_port: int | None = None  # and the port, when it names one
    mark_to: int | None = None  # the value a mark statement sets (`meta mark set M`)


@dataclass(frozen=True, slots=True)
class FixRecord:
    """What `ctfix fix` recorded for the port (its state file: a hint, not the truth;
    the rules themselves are read from the kernel)."""

    method: str
    applied_at: float  # seconds since the epoch
    #: (service the clients sent to, address:port the server answers them from) per
    #: target the fix remembers clients of: equal for clients of a local address
    covers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A configuration file of a process on the port, as that process sees its path
    (read through /proc/PID/root), for the knowledge base's `fixed_if_config`."""

    pid: int
    path: str
    text: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything explain observed, for one port, in one namespace."""

    port: int
    netns: str
    listeners: tuple[Listener, ...] = ()
    addresses: tuple[LocalAddress, ...] = ()
    routes: tuple[str, ...] = ()  # `ip route show table all` style lines, for the record
    #: the same routes as values (local and broadcast routes left out): where each
    #: interface leads, and through which gateway
    route_table: tuple[Route, ...] = ()
    policy_rules: tuple[PolicyRule, ...] = ()
    # One entry per destination asked: seen clients and a probe in each network; and
    # for remote clients, the lookups from the address they sent to and with each mark
    # a netfilter rule sets on the port's replies (`mark`, `from_address` say which).
    route_choices: tuple[RouteChoice, ...] = ()
    # Conntrack entries of the port: requests to it (orig dport) and flows it started
    # (orig sport: its wrong-source replies), as ctfix.platform.conntrack.dump gives.
    flows: tuple[CtEntry, ...] = ()
    conntrack_error: str | None = None  # why there is no conntrack evidence, if so
    netfilter: tuple[NetfilterRule, ...] = ()
    netfilter_errors: tuple[str, ...] = ()
    # Wrong-source replies reported live (`--listen`) by the watch detector.
    live_findings: tuple[WrongSourceReply, ...] = ()
    listened_seconds: float = 0.0
    # The destination asked for each client network (diagnose.probe_destinations).
    probes: dict[str, str] = field(default_factory=dict)  # network CIDR -> probe address
    # When the snapshot was taken and when --listen began (seconds since the epoch).
    taken_at: float = 0.0
    listened_since: float | None = None
    # net.netfilter.nf_conntrack_udp_timeout: how long an unreplied entry lives after
    # its last packet (dates a wrong-source reply from its time left); None: unknown.
    udp_timeout: int | None = None
    fix: FixRecord | None = None
    # The namespace's NAT rules, as the stale-nat check reads them (None: not read),
    # the age and counters of the port's entries by conntrack id, and
    # net.netfilter.nf_conntrack_udp_timeout_stream (an ASSURED entry's; None: unknown).
    nat_rules: NatRuleset | None = None
    nat_usage: dict[int, CtUsage] = field(default_factory=dict)
    # Client address -> the interface the route to it leaves by, for the clients whose
    # entries to the port were never DNAT'd (the stale-nat check's arrival interface).
    client_interfaces: dict[str, str] = field(default_factory=dict)
    udp_timeout_stream: int | None = None
    # Per family ("ipv4", "ipv6"): whether conntrack tracked it while the evidence was
    # gathered (a probe datagram over loopback); None = could not tell. Empty: not
    # probed (hand-built snapshots), taken as tracked.
    tracking: dict[str, bool | None] = field(default_factory=dict)
    # Families --listen switched tracking on for (a temporary nftables table).
    tracking_switched_on: tuple[str, ...] = ()
    # Configuration files of the port's processes that the knowledge base names.
    config_files: tuple[ConfigFile, ...] = ()
    # Requests of the port whose entries ended without a reply during `--listen`
    # (DESTROY events).
    ended_unreplied: tuple[CtEntry, ...] = ()
