"""The NAT model's values: a namespace's DNAT rules as chains of rules whose matches
and actions ctfix understands. Pure. ctfix.core.nat.nft_json and ctfix.core.nat.legacy
build them from the rules as read; ctfix.core.nat.evaluate answers where a new flow
would go; ctfix.core.nat.paths lists the DNATs with the path to each.

Understood (see docs/runbooks/udp-stale-nat.md for the list users read):
- matches on the transport protocol, source and destination address (single,
  prefix, range, anonymous or named set) and port, concatenations of those,
  `fib daddr type` / `-m addrtype --dst-type`, `ct state new`; negation;
- statements `dnat to A[:P]` (address and port ranges too), `dnat to` a map keyed by
  understood fields (anonymous or named), `redirect` / REDIRECT (to a local address),
  `jump`, `goto`, `return`, `accept`, `drop`, `reject`, verdict maps keyed by
  understood fields (`ip daddr . udp dport vmap @services`, kube-proxy's nftables
  mode) or by `numgen random` (any of its entries), `-m statistic` (either way);
- counters, logs, marks and other statements that do not end the rule: ignored.

Know before changing: what a parser does not understand becomes a match taken both
ways (`keys` None, or the field "opaque") or an `Opaque` action, never a guess.
Addresses are ints (`address_int`) so that a match is an interval test; an IPv6
address never equals an IPv4 one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal, NamedTuple

from ctfix.core.addr import endpoint

Field = Literal[
    "l4proto",  # the transport protocol number
    "saddr",
    "daddr",
    "sport",
    "dport",
    "iifname",  # the interface the first packet came in by (unknown: both ways)
    "fib-daddr-type",  # "local", "unicast", "multicast", "broadcast"
    "ct-state",  # a NAT chain only sees the first packet: "new"
    "random",  # numgen random, -m statistic: any value
    "opaque",  # anything else: both ways
]

#: one element of a field's set: an inclusive interval of ints (addresses, ports,
#: protocols) or a name (interface pattern with a trailing `*`, fib type, ct state)
Elem = tuple[int, int] | str
#: one element of a (possibly concatenated) key: one Elem per field
Key = tuple[Elem, ...]

#: IPv6 addresses are kept apart from IPv4 ones in the same int space
_V6_BIT = 1 << 130


def address_int(text: str) -> int:
    """An address as an int that never equals an address of the other family."""
    ip = ipaddress.ip_address(text)
    return int(ip) | (_V6_BIT if ip.version == 6 else 0)


def address_interval(low: str, high: str | None = None) -> tuple[int, int]:
    return address_int(low), address_int(high if high is not None else low)


def network_interval(cidr: str) -> tuple[int, int]:
    net = ipaddress.ip_network(cidr, strict=False)
    return address_interval(str(net.network_address), str(net.broadcast_address))


class Flow(NamedTuple):
    """The original tuple of a connection's first packet, and where it came from."""

    family: int  # socket.AF_INET / AF_INET6
    proto: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    local: bool = False  # sent by this namespace itself (nat output), not received
    iif: str | None = None  # the interface it came in by, when known


@dataclass(frozen=True, slots=True)
class Match:
    """One condition of a rule: the flow's value of `fields` (one, or a concatenation)
    is (or, negated, is not) one of `keys`. `keys` None: a set whose contents are
    not known (dynamic, unreadable), so the match goes both ways."""

    fields: tuple[Field, ...]
    keys: tuple[Key, ...] | None
    negated: bool = False
    #: the transport protocol a port match implies (`udp dport` needs UDP)
    proto: int | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a DNAT sends a flow: an address interval (None: the local address of
    the interface, as `redirect` does) and a port interval (None: the original
    destination port)."""

    address: tuple[int, int] | None
    port: tuple[int, int] | None
    text: str  # as the rule writes it: "198.51.100.21:5140", "198.51.100.50-198.51.100.52"

    def covers(self, address: str, port: int, flow: Flow, local: frozenset[str]) -> bool:
        """Would this DNAT send the flow to address:port?"""
        if self.port is None:
            if port != flow.dport:
                return False
        elif not self.port[0] <= port <= self.port[1]:
            return False
        if self.address is None:
            return address in local
        value = address_int(address)
        return self.address[0] <= value <= self.address[1]

    def describe(self, flow: Flow) -> str:
        """The target as an endpoint for this flow: `198.51.100.22:5140`."""
        if self.address is None:
            where = "local"
        elif self.address[0] == self.address[1]:
            where = int_address(self.address[0])
        else:
            where = f"{int_address(self.address[0])}-{int_address(self.address[1])}"
        if self.port is None:
            port = str(flow.dport)
        elif self.port[0] == self.port[1]:
            port = str(self.port[0])
        else:
            port = f"{self.port[0]}-{self.port[1]}"
        if self.address is not None and self.address[0] == self.address[1] and port.isdigit():
            return endpoint(where, int(port))
        return f"[{where}]:{port}" if ":" in where else f"{where}:{port}"


def int_address(value: int) -> str:
    if value & _V6_BIT:
        return str(ipaddress.IPv6Address(value & ~_V6_BIT))
    return str(ipaddress.IPv4Address(value))


# -- what a rule does -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Nat:
    """`dnat to ...`, `redirect`, `-j DNAT`, `-j REDIRECT`."""

    target: Target


@dataclass(frozen=True, slots=True)
class NatMap:
    """`dnat to <fields> map {...}`: the target looked up by the flow's key; no
    element matches: the rule does nothing (the kernel breaks off the rule)."""

    fields: tuple[Field, ...]
    entries: tuple[tuple[Key, Target], ...] | None  # None: unknown contents


VerdictKind = Literal["accept", "drop", "return", "continue", "jump", "goto"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """`accept`, `drop`, `return`, `continue` (a statement that does not end the
    rule's effect on NAT), or `jump`/`goto` to a chain of the same table."""

    kind: VerdictKind
    chain: str | None = None


@dataclass(frozen=True, slots=True)
class VerdictMap:
    """`<fields> vmap {...}`: the verdict looked up by the flow's key; no element
    matches: go on with the next rule."""

    fields: tuple[Field, ...]
    entries: tuple[tuple[Key, Verdict], ...] | None


@dataclass(frozen=True, slots=True)
class Opaque:
    """A statement ctfix cannot follow that may decide the flow's fate (an xt target,
    `queue`, a NAT to an expression): the answer becomes undetermined."""

    what: str


Action = Nat | NatMap | Verdict | VerdictMap | Opaque


@dataclass(frozen=True, slots=True)
class NatRule:
    matches: tuple[Match, ...]
    action: Action
    text: str  # the rule as its own tool prints it


@dataclass(frozen=True, slots=True)
class NatChain:
    """A chain of a table that holds NAT base chains (nft family ip/ip6/inet; legacy
    tables are family ip or ip6)."""

    backend: Literal["nftables", "iptables-legacy"]
    family: str  # "ip", "ip6", "inet"
    table: str
    name: str
    rules: tuple[NatRule, ...]
    hook: str | None = None  # base chains: "prerouting", "output", ...
    priority: int = 0
    policy: Literal["accept", "drop"] = "accept"
    nat: bool = False  # a base chain of type nat

    @property
    def where(self) -> str:
        return f"{self.backend} {self.family} {self.table} {self.name}"


@dataclass(frozen=True, slots=True)
class NatRuleset:
    """Every NAT-relevant chain of the namespace, and what could not be read (then
    nothing is judged: a rule ctfix did not see may be the one that forwards)."""

    chains: tuple[NatChain, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def matches_interfaces(self) -> bool:
        """Some rule matches on the input interface (which conntrack does not record)."""
        return any(
            "iifname" in m.fields for c in self.chains for r in c.rules for m in r.matches
        )
