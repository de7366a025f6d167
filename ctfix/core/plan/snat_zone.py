"""The snat-zone method: remember each client as its request arrives, move the
server's wrong-source reply to it into a conntrack zone of its own, and SNAT it there
to the address the client sent to. Builders for nftables and iptables-legacy.

Pure. Know before changing: the order of steps is the order of safety: the reply zone
comes before the SNAT that needs it (an SNAT without the zone collides with the
request's conntrack entry and the reply is dropped), and undo runs in reverse. The
nftables table is one atomic batch; its `nft -f` text is rendered from that batch.
"""

from __future__ import annotations

import ipaddress

from ctfix.core.addr import endpoint, unmap
from ctfix.core.model import Diagnosis, Family
from ctfix.core.plan import Backend, Plan, PlanMethod, reroute, targets
from ctfix.core.plan.nft_syntax import NftCommand
from ctfix.core.plan.specs import (
    CLIENT_TIMEOUT,
    IpsetSpec,
    IptRuleSpec,
    NftTableSpec,
    Step,
    XtExtension,
    comment,
    ipset_name,
    nft_table_name,
)
from ctfix.errors import CtfixError

#: the conntrack zone the replies rewritten to the first target address live in (any
#: zone other than 0 works); the n-th address uses CT_ZONE + n. One zone per address,
#: because a NAT binding is made once per conntrack entry: if a client with a fixed
#: source port switched from one rewritten address to another within the same zone,
#: its replies would keep the first address's binding.
CT_ZONE = 51185


def _snat_targets(diagnosis: Diagnosis, force: bool) -> tuple[list[str], list[str]]:
    """(local addresses whose clients may get replies from another source, why other
    addressed ones are left alone)."""
    candidates: list[str] = []
    for cn in diagnosis.clients:
        predicted = unmap(cn.predicted_source) if cn.predicted_source else None
        for address in (unmap(a) for a in cn.addressed):
            if address != predicted and address not in candidates:
                candidates.append(address)
    if not candidates and force:
        candidates = [unmap(a) for a in diagnosis.local_addresses]
    usable: list[str] = []
    skipped: list[str] = []
    for address in candidates:
        ip = ipaddress.ip_address(address)
        # Loopback and link-local addresses are not what remote clients address.
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
            continue
        reason = targets.unexposed_reason(address, diagnosis.listeners)
        if reason is None:
            usable.append(address)
        elif reason not in skipped:
            skipped.append(reason)
    return usable, skipped


def build(
    diagnosis: Diagnosis,
    backend: Backend,
    *,
    force: bool,
    notes: tuple[str, ...],
    advice: tuple[str, ...],
    gateways: tuple[str, ...],
) -> Plan:
    """The steps for `backend`, or a CtfixError saying why there is nothing to fix."""
    del advice  # no advice of its own
    port = diagnosis.port
    addresses, skipped = _snat_targets(diagnosis, force)
    if not addresses:
        if skipped:
            raise CtfixError(
                f"nothing to fix on port {port}: {'; '.join(skipped)}",
                f"see `ctfix explain {port}`",
            )
        raise CtfixError(
            f"nothing to fix: no client of port {port} is known to address a local address "
            "other than the one its replies come from",
            f"see `ctfix explain {port}`, or pass --force to cover every local address",
        )
    # Two uplinks: replies that must leave by another uplink get a mark and a table.
    reroutes = reroute.reroutes(diagnosis, addresses, gateways)
    marks = reroute.marks(reroutes)
    if backend == "nftables":
        steps = _nft_steps(port, addresses, marks)
    elif backend == "iptables-legacy":
        steps = _ipt_steps(port, addresses, marks)
    else:  # make_plan checked it against METHOD.backends; never reached
        raise CtfixError(f"snat-zone needs nftables or iptables-legacy, not {backend}")
    steps = reroute.route_steps(port, reroutes) + steps
    notes = (*notes, *reroute.notes(reroutes), *(f"left alone: {why}" for why in skipped))
    checks = tuple(reroute.checks(reroutes))
    return Plan(port, "snat-zone", backend, tuple(steps), notes, checks)


# -- nftables ------------------------------------------------------------------------------

_NFT_FAMILY: dict[Family, str] = {"ipv4": "ip", "ipv6": "ip6"}
_NFT_ADDR: dict[Family, str] = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}


def _nft_set_name(family: Family, index: int) -> str:
    return f"clients{'6' if family == 'ipv6' else '4'}_{index}"


def _payload(protocol: str, field: str) -> NftCommand:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: object, right: object, op: str = "==") -> NftCommand:
    return {"match": {"op": op, "left": left, "right": right}}


def _nft_steps(port: int, addresses: list[str], marks: dict[str, int]) -> list[Step]:
    table = nft_table_name(port)
    tag = comment(port)
    base = {"family": "inet", "table": table}
    batch: list[NftCommand] = [{"add": {"table": {"family": "inet", "name": table}}}]
    chains = [
        ("remember_clients", "filter", "prerouting", -300, "raw"),
        ("reply_zone", "filter", "output", -300, "raw"),
        ("reply_snat", "nat", "postrouting", 100, "srcnat"),
    ]
    rules: list[NftCommand] = []
    creates = [f"table inet {table}"]
    indexes: dict[Family, int] = {"ipv4": 0, "ipv6": 0}
    for number, address in enumerate(addresses):
        family = targets.family_of(address)
        index = indexes[family]
        indexes[family] += 1
        name = _nft_set_name(family, index)
        nf = _NFT_FAMILY[family]
        zone = CT_ZONE + number
        creates.append(f"set {name}: clients that sent to {endpoint(address, port)}")
        batch.append(
            {
                "add": {
                    "set": {
                        **base,
                        "name": name,
                        "type": [_NFT_ADDR[family], "inet_service"],
                        # nft 1.0.6's JSON rejects "dynamic"; the kernel adds it for
                        # a set that rules update.
                        "flags": ["timeout"],
                        "timeout": CLIENT_TIMEOUT,
                    }
                }
            }
        )
        client_key = {"concat": [_payload(nf, "saddr"), _payload("udp", "sport")]}
        reply_key = {"concat": [_payload(nf, "daddr"), _payload("udp", "dport")]}
        wrong_source = [
            _match(_payload(nf, "saddr"), address, "!="),
            _match(_payload("udp", "sport"), port),
            _match(reply_key, f"@{name}"),
        ]
        by_chain: list[tuple[str, list[NftCommand]]] = [
            (
                "remember_clients",
                [
                    _match(_payload(nf, "daddr"), address),
                    _match(_payload("udp", "dport"), port),
                    {"set": {"op": "update", "elem": client_key, "set": f"@{name}"}},
                ],
            ),
            # A client that now asks another local address (a fixed source port:
            # ntpd's 123, SNMP, a port-keeping NAT) must get that address's replies
            # untouched: it stops being one of this address's clients at once.
            (
                "remember_clients",
                [
                    _match(_payload(nf, "daddr"), address, "!="),
                    _match(_payload("udp", "dport"), port),
                    _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
                    {"set": {"op": "delete", "elem": client_key, "set": f"@{name}"}},
                ],
            ),
            (
                "reply_zone",
                [*wrong_source, {"mangle": {"key": {"ct": {"key": "zone"}}, "value": zone}}],
            ),
            (
                "reply_snat",
                [*wrong_source, {"snat": {"family": nf, "addr": address, "port": port}}],
            ),
        ]
        for chain, expr in by_chain:
            rules.append({"add": {"rule": {**base, "chain": chain, "expr": expr, "comment": tag}}})
        if address in marks:  # two uplinks: out by its own (reroute.py)
            rules.append(reroute.nft_rule(base, tag, wrong_source, marks[address]))
    if marks:
        chains.append(reroute.NFT_CHAIN)
    for name, kind, hook, prio, prio_name in chains:
        batch.append(
            {
                "add": {
                    "chain": {
                        **base,
                        "name": name,
                        "type": kind,
                        "hook": hook,
                        "prio": prio,
                        "policy": "accept",
                    }
                }
            }
        )
        creates.append(f"chain {name} ({kind} hook {hook} priority {prio_name})")
    batch.extend(rules)
    spec = NftTableSpec("inet", table, tuple(batch))
    return [
        Step(
            spec,
            f"remember the clients of {', '.join(addresses)} (and forget them when they ask "
            f"another local address); move port {port}'s replies to them from another "
            f"source into a conntrack zone of their own ({_zones(len(addresses))}) and SNAT "
            "them there"
            + (
                f"; mark those to clients of {', '.join(marks)} so that they leave by their "
                "own uplink"
                if marks
                else ""
            ),
            tuple(creates),
            (f"nft -f - <<'EOF'\n{spec.text}EOF",),
            (f"nft delete table inet {table}",),
        )
    ]


def _zones(count: int) -> str:
    return f"zone {CT_ZONE}" if count == 1 else f"zones {CT_ZONE}-{CT_ZONE + count - 1}"


# -- iptables-legacy + ipset ------------------------------------------------------------------


def _ipt_argv(spec: IptRuleSpec, action: str) -> str:
    tool = "ip6tables-legacy" if spec.family == "ipv6" else "iptables-legacy"
    words = [tool, "-w", "-t", spec.table, action, spec.chain, "-p", spec.protocol]
    for flag, value in (("-s", spec.source), ("-d", spec.destination)):
        if value:
            words += ["!", flag, value[1:]] if value.startswith("!") else [flag, value]
    for ext in spec.matches:
        words += ["-m", ext.name]
        for option, value in ext.options:
            words += [f"--{option}", *_quoted(value)]
    words += ["-j", spec.target.name]
    for option, value in spec.target.options:
        words += [f"--{option}", *_quoted(value)]
    return " ".join(words)


def _quoted(value: str) -> list[str]:
    return value.split() if value else []


def _ipt_steps(port: int, addresses: list[str], marks: dict[str, int]) -> list[Step]:
    tag = comment(port)
    ipsets: list[Step] = []
    remember: list[Step] = []
    zone: list[Step] = []
    snat: list[Step] = []
    marked: list[Step] = []
    indexes: dict[Family, int] = {"ipv4": 0, "ipv6": 0}
    for number, address in enumerate(addresses):
        family = targets.family_of(address)
        index = indexes[family]
        indexes[family] += 1
        name = ipset_name(port, family, index)
        zone_id = str(CT_ZONE + number)
        inet = "inet6" if family == "ipv6" else "inet"
        ipsets.append(
            Step(
                IpsetSpec(name, family),
                f"a set for the clients (address, port) that send to {address}",
                (f"ipset {name} (hash:ip,port, {inet}, timeout {CLIENT_TIMEOUT}s)",),
                (f"ipset create {name} hash:ip,port family {inet} timeout {CLIENT_TIMEOUT}",),
                (f"ipset destroy {name}",),
            )
        )
        udp = XtExtension("udp", (("dport", str(port)),))
        udp_reply = XtExtension("udp", (("sport", str(port)),))
        tagged = XtExtension("comment", (("comment", tag),))
        in_set = XtExtension("set", (("match-set", f"{name} dst,dst"),))
        snat_to = f"[{address}]:{port}" if family == "ipv6" else f"{address}:{port}"
        specs = [
            (
                remember,
                IptRuleSpec(
                    family,
                    "raw",
                    "PREROUTING",
                    "udp",
                    None,
                    address,
                    (udp, tagged),
                    XtExtension("SET", (("add-set", f"{name} src,src"), ("exist", ""))),
                ),
                f"remember clients that send to {endpoint(address, port)}",
            ),
            (
                # A client with a fixed source port that now asks another local
                # address must get that address's replies untouched.
                remember,
                IptRuleSpec(
                    family,
                    "raw",
                    "PREROUTING",
                    "udp",
                    None,
                    f"!{address}",
                    (udp, XtExtension("addrtype", (("dst-type", "LOCAL"),)), tagged),
                    XtExtension("SET", (("del-set", f"{name} src,src"),)),
                ),
                f"forget them when they send to another local address on port {port}",
            ),
            (
                zone,
                IptRuleSpec(
                    family,
                    "raw",
                    "OUTPUT",
                    "udp",
                    f"!{address}",
                    None,
                    (udp_reply, in_set, tagged),
                    XtExtension("CT", (("zone", zone_id),)),
                ),
                f"replies to them from another source go to conntrack zone {zone_id}",
            ),
            (
                snat,
                IptRuleSpec(
                    family,
                    "nat",
                    "POSTROUTING",
                    "udp",
                    f"!{address}",
                    None,
                    (udp_reply, in_set, tagged),
                    XtExtension("SNAT", (("to-source", snat_to),)),
                ),
                f"and leave from {endpoint(address, port)}",
            ),
        ]
        if address in marks:  # two uplinks: out by its own (reroute.py)
            zone_rule = next(spec for bucket, spec, _ in specs if bucket is zone)
            mark = marks[address]
            specs.append(
                (marked, reroute.ipt_rule(zone_rule, mark),
                 f"and are marked {mark:#x}, so that they leave by {address}'s uplink")
            )
        for bucket, spec, summary in specs:
            where = f"{spec.table} {spec.chain}"
            action = " ".join(
                [spec.target.name, *(f"--{o} {v}".strip() for o, v in spec.target.options)]
            )
            bucket.append(
                Step(
                    spec,
                    summary,
                    (f"{spec.family} {where} rule `{tag}` -j {action}",),
                    (_ipt_argv(spec, "-I"),),
                    (_ipt_argv(spec, "-D"),),
                )
            )
    return ipsets + remember + zone + snat + marked


METHOD = PlanMethod(
    "snat-zone", ("nftables", "iptables-legacy"), changes_host=True, build=build
)
