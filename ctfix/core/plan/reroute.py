"""Replies out by the uplink their requests came in by (two uplinks). Pure.

A snat-zone fix rewrites a wrong-source reply's address after routing, so on a host
with two uplinks the reply to a client of wan2's address still leaves by wan1 (the
default route), now with wan2's address: wan1's provider drops it (BCP 38) and a
stateful firewall drops the asymmetric reply. For each such uplink this module adds
to the snat-zone plan (ctfix/core/plan/snat_zone.py calls it):

* a routing table T with a default route via that uplink's gateway (from the host's
  routes: the diagnosis's `Uplink.route`, any table; or `fix --gateway ADDR`),
* `ip rule add fwmark T ipproto udp sport PORT lookup T`,
* a netfilter rule that marks the same wrong-source replies the SNAT rewrites with T
  (nftables: a `type route hook output priority mangle` chain, `reroute`, in the
  fix's table; iptables-legacy: `mangle OUTPUT -j MARK`). Both make the kernel look
  the route up again when they change the mark, now through T.

and it gives policy-route's routes the next hop of the uplink they must leave by.

Know before changing: tables and marks are ctfix's (specs.reroute_table: the port in
the low 16 bits, in 0xC7F00000-0xC7FFFFFF; routes and rules protocol 199, netfilter
rules commented `ctfix:<port>`). The routes and rules come before the netfilter rules
that mark (they are inert until then), so undo removes the marking first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ctfix.core.addr import unmap
from ctfix.core.model import ClientNetwork, Diagnosis, Family, Uplink
from ctfix.core.plan.nft_syntax import NftCommand
from ctfix.core.plan.probes import probe_address
from ctfix.core.plan.specs import (
    IptRuleSpec,
    RouteCheck,
    RouteSpec,
    RuleSpec,
    Step,
    XtExtension,
    reroute_table,
)
from ctfix.core.plan.targets import family_of
from ctfix.errors import CtfixError

#: the nftables chain that marks the replies: (name, type, hook, priority, its name)
NFT_CHAIN = ("reroute", "route", "output", -150, "mangle")
_DEFAULT: dict[Family, str] = {"ipv4": "0.0.0.0/0", "ipv6": "::/0"}


@dataclass(frozen=True, slots=True)
class Gateway:
    """`fix --gateway ADDR[%IFACE]`: the router of the uplink ADDR is on-link with."""

    address: str
    interface: str | None = None

    def matches(self, uplink: Uplink) -> bool:
        ip = ipaddress.ip_address(self.address)
        if ip.version != ipaddress.ip_address(unmap(uplink.address)).version:
            return False
        if self.interface is not None:
            return self.interface == uplink.interface
        try:
            return ip in ipaddress.ip_network(uplink.network, strict=False)
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.address}%{self.interface}" if self.interface else self.address


def parse_gateways(texts: Iterable[str]) -> list[Gateway]:
    """`--gateway` values, checked; a CtfixError says what is wrong."""
    found: list[Gateway] = []
    for text in texts:
        address, _, interface = text.partition("%")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise CtfixError(
                f"--gateway {text}: not an IP address", "--gateway 192.0.2.1"
            ) from None
        if ip.is_link_local and not interface:
            raise CtfixError(
                f"--gateway {text}: a link-local gateway needs its interface",
                f"--gateway {address}%IFACE",
            )
        found.append(Gateway(str(ip), interface or None))
    return found


def _given(gateways: Sequence[Gateway], uplink: Uplink) -> str | None:
    return next((g.address for g in gateways if g.matches(uplink)), None)


def needs_reroute(uplink: Uplink, gateways: Sequence[Gateway]) -> bool:
    """Replies to this uplink's clients must be sent out by it: they leave by another
    uplink now, or `--gateway` names it (an uplink the routes do not show)."""
    return not uplink.rerouted and (not uplink.ok or _given(gateways, uplink) is not None)


def next_hop(uplink: Uplink, gateways: Sequence[Gateway]) -> str | None:
    """The router on the uplink toward its clients (None: a device route such as
    `default dev ppp0` needs none); a CtfixError naming --gateway when unknown."""
    given = _given(gateways, uplink)
    if given is not None:
        return given
    if uplink.route is None:
        raise CtfixError(
            f"replies to clients of {uplink.address} must leave by {uplink.interface}, the "
            f"uplink their requests come in by, but no route via {uplink.interface} covers "
            "them, so its gateway is unknown",
            f"pass --gateway ADDR: the router on {uplink.interface} "
            f"({uplink.network or 'its network'}) toward those clients",
        )
    return uplink.gateway


def checked_gateways(diagnosis: Diagnosis, texts: Sequence[str]) -> list[Gateway]:
    """The --gateway values; refused when malformed or on no uplink the diagnosis found."""
    gateways = parse_gateways(texts)
    uplinks = [u for cn in diagnosis.clients for u in cn.uplinks]
    for gateway in gateways:
        if not any(gateway.matches(u) for u in uplinks):
            known = ", ".join(sorted({f"{u.interface} ({u.network})" for u in uplinks}))
            raise CtfixError(
                f"--gateway {gateway}: it is on no uplink whose clients' replies leave by "
                "another interface"
                + (f" (those uplinks: {known})" if known else " (there is none)"),
                f"see `ctfix explain {diagnosis.port}`",
            )
    return gateways


@dataclass(frozen=True, slots=True)
class Reroute:
    """Replies to clients of `addresses` leave by `interface` through `gateway`: a
    table (`table`, also the fwmark) and a rule of their own."""

    family: Family
    interface: str
    gateway: str | None
    addresses: tuple[str, ...]
    table: int
    probes: tuple[str, ...]  # a client of each network, for the after-apply check
    route: str | None  # the host's route it was found in (None: from --gateway)

    @property
    def mark(self) -> int:
        return self.table


def reroutes(diagnosis: Diagnosis, addresses: Sequence[str], gateway_texts: Sequence[str]) -> (
    list[Reroute]
):
    """The uplinks the replies to clients of `addresses` must be sent out by, or a
    CtfixError (an uplink whose gateway is unknown, a --gateway that fits none)."""
    gateways = checked_gateways(diagnosis, gateway_texts)
    found: dict[tuple[Family, str, str | None], dict[str, list[str]]] = {}
    routes: dict[tuple[Family, str, str | None], str | None] = {}
    for cn in diagnosis.clients:
        for uplink in cn.uplinks:
            address = unmap(uplink.address)
            if address not in addresses or not needs_reroute(uplink, gateways):
                continue
            gateway = next_hop(uplink, gateways)
            key = (family_of(address), uplink.interface, gateway)
            group = found.setdefault(key, {"addresses": [], "probes": []})
            routes.setdefault(key, None if _given(gateways, uplink) else uplink.route)
            if address not in group["addresses"]:
                group["addresses"].append(address)
            probe = probe_address(cn, diagnosis)
            if probe not in group["probes"]:
                group["probes"].append(probe)
    result: list[Reroute] = []
    index: dict[Family, int] = {"ipv4": 0, "ipv6": 0}
    for (family, interface, gateway), group in found.items():
        table = reroute_table(diagnosis.port, index[family])
        index[family] += 1
        result.append(
            Reroute(
                family,
                interface,
                gateway,
                tuple(group["addresses"]),
                table,
                tuple(group["probes"]),
                routes[(family, interface, gateway)],
            )
        )
    return result


def marks(reroutes: Sequence[Reroute]) -> dict[str, int]:
    """address -> the mark its clients' wrong-source replies get."""
    return {address: r.mark for r in reroutes for address in r.addresses}


def route_steps(port: int, reroutes: Sequence[Reroute]) -> list[Step]:
    """Each uplink's table (a default route via its gateway), then its fwmark rules."""
    steps: list[Step] = []
    for r in reroutes:
        ip = "ip -6" if r.family == "ipv6" else "ip"
        spec = RouteSpec(
            r.family, _DEFAULT[r.family], r.interface, r.addresses[0], r.table, gateway=r.gateway
        )
        via = f"via {r.gateway} " if r.gateway else ""
        found = f" (the host's route: `{r.route}`)" if r.route else " (--gateway)"
        steps.append(
            Step(
                spec,
                f"table {r.table} ({r.table:#x}): replies to clients of "
                f"{', '.join(r.addresses)} leave by "
                f"{r.interface}, the uplink their requests come in by{found}",
                (f"route default {via}dev {r.interface} src {r.addresses[0]} in table "
                 f"{r.table}",),
                (f"{ip} route add {spec.words}",),
                (f"{ip} route del {spec.words}",),
            )
        )
    for r in reroutes:
        ip = "ip -6" if r.family == "ipv6" else "ip"
        rule = RuleSpec(r.family, port, r.table, fwmark=r.mark)
        steps.append(
            Step(
                rule,
                f"{r.family} UDP replies from port {port} marked {r.mark:#x} consult table "
                f"{r.table}",
                (f"{r.family} rule {rule.priority}: fwmark {r.mark:#x} ipproto udp sport "
                 f"{port} lookup {r.table}",),
                (f"{ip} rule add {rule.words}",),
                (f"{ip} rule del {rule.words}",),
            )
        )
    return steps


def checks(reroutes: Sequence[Reroute]) -> list[RouteCheck]:
    """After apply: a marked reply to a client of each uplink leaves by it."""
    return [
        RouteCheck(probe, r.addresses[0], r.interface, r.mark)
        for r in reroutes
        for probe in r.probes
    ]


def notes(reroutes: Sequence[Reroute]) -> list[str]:
    return [
        f"replies to clients of {', '.join(r.addresses)} are also sent out by "
        f"{r.interface}" + (f" via {r.gateway}" if r.gateway else "")
        + " (two uplinks: a reply must leave by the uplink its request came in by)"
        for r in reroutes
    ]


def nft_rule(base: dict[str, str], tag: str, wrong_source: list[NftCommand], mark: int) -> (
    NftCommand
):
    """The `reroute` chain's rule: the same replies the SNAT rewrites get the mark."""
    expr = [*wrong_source, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}}]
    return {"add": {"rule": {**base, "chain": NFT_CHAIN[0], "expr": expr, "comment": tag}}}


def ipt_rule(zone_rule: IptRuleSpec, mark: int) -> IptRuleSpec:
    """`mangle OUTPUT -j MARK` for the same replies the zone rule matches (mangle OUTPUT
    looks the route up again when it changes the mark)."""
    return IptRuleSpec(
        zone_rule.family,
        "mangle",
        "OUTPUT",
        zone_rule.protocol,
        zone_rule.source,
        zone_rule.destination,
        zone_rule.matches,
        XtExtension("MARK", (("set-mark", f"{mark:#x}"),)),
    )


def policy_next_hop(
    cn: ClientNetwork, source: str, gateways: Sequence[Gateway]
) -> tuple[str | None, str | None]:
    """(interface, gateway) for policy-route's route to `cn` from `source`: the
    source's own uplink when its replies would leave by another one, else the egress
    and its router for clients beyond one, else the network's interface, on-link."""
    for uplink in cn.uplinks:
        if unmap(uplink.address) == source and needs_reroute(uplink, gateways):
            return uplink.interface, next_hop(uplink, gateways)
    if cn.egress_gateway and cn.egress == cn.interface:
        return cn.interface, cn.egress_gateway
    return cn.interface, None
