"""The snat-zone method: remember each client as its request arrives, move the
server's wrong-source reply to it into a conntrack zone of its own, and SNAT it there
to the address the client sent to. Builders for nftables and iptables-legacy.

Pure. Know before changing: the order of steps is the order of safety: the reply zone
comes before the SNAT that needs it (an SNAT without the zone collides with the
request's conntrack entry and the reply is dropped), and undo runs in reverse. The
nftables table is one atomic batch; its `nft -f` text is rendered from that batch.
"""

from __future__ import annotations

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
from ctfix.core.plan.targets import Target
from ctfix.core.zones import CT_ZONE as CT_ZONE  # re-exported: the plan's first zone
from ctfix.errors import CtfixError

# CT_ZONE (ctfix.core.zones): the conntrack zone the replies rewritten to the first
# target address live in (any zone other than 0 works); the n-th address uses
# CT_ZONE + n. One zone per address, because a NAT binding is made once per conntrack
# entry: if a client with a fixed source port switched from one rewritten address to
# another within the same zone, its replies would keep the first address's binding.
# ctfix.core.zones says which zones are ctfix's (explain tells the remedy's replies
# from the server's by them).


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
    chosen, skipped = targets.snat_targets(diagnosis, force)
    if not chosen:
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
    # Two uplinks: replies to clients of a local address that must leave by another
    # uplink get a mark and a table (reroute.py). Clients behind a DNAT are rewritten
    # to the service they sent to, which no uplink owns: not rerouted.
    direct = [t.address for t in chosen if not t.forwarded]
    reroutes = reroute.reroutes(diagnosis, direct, gateways)
    marks = reroute.marks(reroutes)
    if backend == "nftables":
        steps = _nft_steps(port, chosen, marks)
    elif backend == "iptables-legacy":
        steps = _ipt_steps(port, chosen, marks)
    else:  # make_plan checked it against METHOD.backends; never reached
        raise CtfixError(f"snat-zone needs nftables or iptables-legacy, not {backend}")
    steps = reroute.route_steps(port, reroutes) + steps
    notes = (*notes, *reroute.notes(reroutes), *(f"left alone: {why}" for why in skipped))
    checks = tuple(reroute.checks(reroutes))
    return Plan(port, "snat-zone", backend, tuple(steps), notes, checks, covers=tuple(chosen))


def _hooks(target: Target, chosen: list[Target]) -> tuple[str, ...]:
    """Where a target's clients are remembered: prerouting (other hosts' clients), and
    output too for a service DNAT'd in output (this host's own clients; explain judges
    the host's own direct clients answered right, so a local address needs no output
    rules)."""
    if target.forwarded and "output" in target.hooks:
        return ("prerouting", "output")
    return ("prerouting",)


def _own_clients(chosen: list[Target]) -> bool:
    """Does some target remember this host's own clients (in output)?

    Then prerouting only remembers requests from other hosts: this host's request to a
    ClusterIP comes back through prerouting on `lo` already DNAT'd to a local address,
    and would be remembered as a client of that address there, or forgotten as one
    that asked another local address (its reply then rewritten wrongly, or not).
    """
    return any("output" in _hooks(t, chosen) for t in chosen)


def _others(target: Target, chosen: list[Target]) -> list[Target]:
    """The services behind a DNAT, other than `target`, whose requests must make a
    client of `target` forgotten (requests to local addresses are matched as such)."""
    return [o for o in chosen if o is not target and o.forwarded and o.family == target.family]


def _zones(count: int) -> str:
    return f"zone {CT_ZONE}" if count == 1 else f"zones {CT_ZONE}-{CT_ZONE + count - 1}"


def _summary(port: int, chosen: list[Target], marks: dict[str, int]) -> str:
    dnat = any(t.forwarded for t in chosen)
    who = "; ".join(t.label if t.forwarded else t.address for t in chosen)
    forget = "another local address or service" if dnat else "another local address"
    return (
        f"remember the clients of {who} (and forget them when they ask {forget}); move "
        f"port {port}'s replies to them from another source into a conntrack zone of "
        f"their own ({_zones(len(chosen))}) and SNAT them there"
        + (
            f"; mark those to clients of {', '.join(marks)} so that they leave by their "
            "own uplink"
            if marks
            else ""
        )
    )


# -- nftables ------------------------------------------------------------------------------

_NFT_FAMILY: dict[Family, str] = {"ipv4": "ip", "ipv6": "ip6"}
_NFT_ADDR: dict[Family, str] = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}


def _nft_set_name(family: Family, index: int) -> str:
    return f"clients{'6' if family == 'ipv6' else '4'}_{index}"


def _payload(protocol: str, field: str) -> NftCommand:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: object, right: object, op: str = "==") -> NftCommand:
    return {"match": {"op": op, "left": left, "right": right}}


#: (name, type, hook, priority, priority name) of the table's chains; the last one
#: only when some service is DNAT'd in output (the host's own clients)
_NFT_CHAINS = (
    ("remember_clients", "filter", "prerouting", -300, "raw"),
    ("reply_zone", "filter", "output", -300, "raw"),
    ("reply_snat", "nat", "postrouting", 100, "srcnat"),
)
_NFT_OWN_CLIENTS = ("remember_own_clients", "filter", "output", -300, "raw")
#: where each hook's requests are remembered
_REMEMBER_CHAIN = {"prerouting": "remember_clients", "output": "remember_own_clients"}


def _nft_set(base: dict[str, str], name: str, family: Family) -> NftCommand:
    return {
        "add": {
            "set": {
                **base,
                "name": name,
                "type": [_NFT_ADDR[family], "inet_service"],
                # nft 1.0.6's JSON rejects "dynamic"; the kernel adds it for a set
                # that rules update.
                "flags": ["timeout"],
                "timeout": CLIENT_TIMEOUT,
            }
        }
    }


def _nft_remember(
    target: Target, name: str, port: int, others: list[Target]
) -> list[list[NftCommand]]:
    """Remember the target's clients as their requests arrive (before DNAT, so by
    what they sent to), and forget them when they ask another local address or
    another service on the port."""
    nf = _NFT_FAMILY[target.family]
    client_key = {"concat": [_payload(nf, "saddr"), _payload("udp", "sport")]}
    same_port = target.port == port
    rules: list[list[NftCommand]] = [
        [
            _match(_payload(nf, "daddr"), target.address),
            _match(_payload("udp", "dport"), target.port),
            {"set": {"op": "update", "elem": client_key, "set": f"@{name}"}},
        ],
        # A client that now asks another local address (a fixed source port: ntpd's
        # 123, SNMP, a port-keeping NAT) must get that address's replies untouched: it
        # stops being one of this target's clients at once.
        [
            *([_match(_payload(nf, "daddr"), target.address, "!=")] if same_port else []),
            _match(_payload("udp", "dport"), port),
            _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
            {"set": {"op": "delete", "elem": client_key, "set": f"@{name}"}},
        ],
    ]
    # ... or another service a DNAT forwards to the port (its address is not local).
    rules += [
        [
            _match(_payload(nf, "daddr"), other.address),
            _match(_payload("udp", "dport"), other.port),
            {"set": {"op": "delete", "elem": client_key, "set": f"@{name}"}},
        ]
        for other in others
    ]
    return rules


def _nft_from_elsewhere(hook: str, own: bool) -> list[NftCommand]:
    """In prerouting, when output remembers this host's own clients: other hosts only."""
    if hook != "prerouting" or not own:
        return []
    return [_match({"fib": {"result": "type", "flags": ["saddr"]}}, "local", "!=")]


def _nft_wrong_source(target: Target, name: str, port: int) -> list[NftCommand]:
    """The server's replies to the target's clients from another source than the one
    conntrack expects."""
    nf = _NFT_FAMILY[target.family]
    reply_key = {"concat": [_payload(nf, "daddr"), _payload("udp", "dport")]}
    return [
        _match(_payload(nf, "saddr"), target.source, "!="),
        _match(_payload("udp", "sport"), port),
        _match(reply_key, f"@{name}"),
    ]


def _nft_reply(
    target: Target, name: str, port: int, zone: int
) -> list[tuple[str, list[NftCommand]]]:
    """Those replies into the target's zone, then SNAT to what the client sent to."""
    nf = _NFT_FAMILY[target.family]
    wrong_source = _nft_wrong_source(target, name, port)
    zoned = {"mangle": {"key": {"ct": {"key": "zone"}}, "value": zone}}
    snat = {"snat": {"family": nf, "addr": target.address, "port": target.port}}
    return [("reply_zone", [*wrong_source, zoned]), ("reply_snat", [*wrong_source, snat])]


def _nft_steps(port: int, chosen: list[Target], marks: dict[str, int]) -> list[Step]:
    table = nft_table_name(port)
    tag = comment(port)
    base = {"family": "inet", "table": table}
    batch: list[NftCommand] = [{"add": {"table": {"family": "inet", "name": table}}}]
    chains = list(_NFT_CHAINS)
    own = _own_clients(chosen)
    if own:
        chains.append(_NFT_OWN_CLIENTS)
    rules: list[NftCommand] = []
    creates = [f"table inet {table}"]
    indexes: dict[Family, int] = {"ipv4": 0, "ipv6": 0}
    for number, target in enumerate(chosen):
        index = indexes[target.family]
        indexes[target.family] += 1
        name = _nft_set_name(target.family, index)
        creates.append(f"set {name}: clients that sent to {target.label}")
        batch.append(_nft_set(base, name, target.family))
        remember = _nft_remember(target, name, port, _others(target, chosen))
        by_chain = [
            (_REMEMBER_CHAIN[hook], [*_nft_from_elsewhere(hook, own), *expr])
            for hook in _hooks(target, chosen)
            for expr in remember
        ]
        by_chain += _nft_reply(target, name, port, CT_ZONE + number)
        for chain, expr in by_chain:
            rules.append({"add": {"rule": {**base, "chain": chain, "expr": expr, "comment": tag}}})
        if not target.forwarded and target.address in marks:  # two uplinks (reroute.py)
            wrong_source = _nft_wrong_source(target, name, port)
            rules.append(reroute.nft_rule(base, tag, wrong_source, marks[target.address]))
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
            _summary(port, chosen, marks),
            tuple(creates),
            (f"nft -f - <<'EOF'\n{spec.text}EOF",),
            (f"nft delete table inet {table}",),
        )
    ]


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
            if value.startswith("! "):  # negated: iptables wants `! --option value`
                words += ["!", f"--{option}", *_quoted(value[2:])]
            else:
                words += [f"--{option}", *_quoted(value)]
    words += ["-j", spec.target.name]
    for option, value in spec.target.options:
        words += [f"--{option}", *_quoted(value)]
    return " ".join(words)


def _quoted(value: str) -> list[str]:
    return value.split() if value else []


_IPT_REMEMBER_CHAIN = {"prerouting": "PREROUTING", "output": "OUTPUT"}


def _ipt_remember(
    target: Target, name: str, port: int, others: list[Target], hook: str, own: bool
) -> list[Step]:
    """As `_nft_remember`: remember by what the client sent to (raw comes before
    DNAT), forget on a request to another local address or service on the port."""
    tag = XtExtension("comment", (("comment", comment(port)),))
    forget = XtExtension("SET", (("del-set", f"{name} src,src"),))
    same_port = target.port == port
    chain = _IPT_REMEMBER_CHAIN[hook]
    # As `_nft_from_elsewhere`: in prerouting, other hosts only, when output remembers.
    elsewhere = (
        (XtExtension("addrtype", (("src-type", "! LOCAL"),)),)
        if hook == "prerouting" and own
        else ()
    )

    def rule(destination: str | None, matches: tuple[XtExtension, ...], action: XtExtension) -> (
        IptRuleSpec
    ):
        return IptRuleSpec(
            target.family, "raw", chain, "udp", None, destination, (*elsewhere, *matches), action
        )

    def dport(value: int) -> XtExtension:
        return XtExtension("udp", (("dport", str(value)),))

    return [
        _ipt_step(
            rule(
                target.address,
                (dport(target.port), tag),
                XtExtension("SET", (("add-set", f"{name} src,src"), ("exist", ""))),
            ),
            f"remember clients that send to {target.service}",
            port,
        ),
        _ipt_step(
            # A client with a fixed source port that now asks another local address
            # must get that address's replies untouched.
            rule(
                f"!{target.address}" if same_port else None,
                (dport(port), XtExtension("addrtype", (("dst-type", "LOCAL"),)), tag),
                forget,
            ),
            f"forget them when they send to another local address on port {port}",
            port,
        ),
        *(
            _ipt_step(
                rule(other.address, (dport(other.port), tag), forget),
                f"forget them when they send to {other.service} (DNAT'd here)",
                port,
                f" (requests to {other.service})",
            )
            for other in others
        ),
    ]


def _ipt_reply(
    target: Target, name: str, port: int, zone: int
) -> list[tuple[IptRuleSpec, str]]:
    """As `_nft_reply`: zone, then SNAT to exactly what the client sent to."""
    matches = (
        XtExtension("udp", (("sport", str(port)),)),
        XtExtension("set", (("match-set", f"{name} dst,dst"),)),
        XtExtension("comment", (("comment", comment(port)),)),
    )
    wrong = f"!{target.source}"
    return [
        (
            IptRuleSpec(
                target.family, "raw", "OUTPUT", "udp", wrong, None, matches,
                XtExtension("CT", (("zone", str(zone)),)),
            ),
            f"replies to them from another source go to conntrack zone {zone}",
        ),
        (
            IptRuleSpec(
                target.family, "nat", "POSTROUTING", "udp", wrong, None, matches,
                XtExtension("SNAT", (("to-source", target.service),)),
            ),
            f"and leave from {target.service}",
        ),
    ]


def _ipt_step(spec: IptRuleSpec, summary: str, port: int, detail: str = "") -> Step:
    """`detail` tells apart objects that would read alike in --status and --revert
    (which print one object per line)."""
    where = f"{spec.table} {spec.chain}"
    action = " ".join([spec.target.name, *(f"--{o} {v}".strip() for o, v in spec.target.options)])
    return Step(
        spec,
        summary,
        (f"{spec.family} {where} rule `{comment(port)}`{detail} -j {action}",),
        (_ipt_argv(spec, "-I"),),
        (_ipt_argv(spec, "-D"),),
    )


def _ipt_steps(port: int, chosen: list[Target], marks: dict[str, int]) -> list[Step]:
    own = _own_clients(chosen)
    ipsets: list[Step] = []
    remember: list[Step] = []
    zone: list[Step] = []
    snat: list[Step] = []
    marked: list[Step] = []
    indexes: dict[Family, int] = {"ipv4": 0, "ipv6": 0}
    for number, target in enumerate(chosen):
        family = target.family
        index = indexes[family]
        indexes[family] += 1
        name = ipset_name(port, family, index)
        inet = "inet6" if family == "ipv6" else "inet"
        who = target.address if not target.forwarded else target.label
        ipsets.append(
            Step(
                IpsetSpec(name, family),
                f"a set for the clients (address, port) that send to {who}",
                (f"ipset {name} (hash:ip,port, {inet}, timeout {CLIENT_TIMEOUT}s)",),
                (f"ipset create {name} hash:ip,port family {inet} timeout {CLIENT_TIMEOUT}",),
                (f"ipset destroy {name}",),
            )
        )
        others = _others(target, chosen)
        for hook in _hooks(target, chosen):
            remember += _ipt_remember(target, name, port, others, hook, own)
        (zoned, zone_summary), (snatted, snat_summary) = _ipt_reply(
            target, name, port, CT_ZONE + number
        )
        zone.append(_ipt_step(zoned, zone_summary, port))
        snat.append(_ipt_step(snatted, snat_summary, port))
        if not target.forwarded and target.address in marks:  # two uplinks (reroute.py)
            mark = marks[target.address]
            marked.append(_ipt_step(
                reroute.ipt_rule(zoned, mark),
                f"and are marked {mark:#x}, so that they leave by {target.address}'s uplink",
                port,
            ))
    return ipsets + remember + zone + snat + marked


METHOD = PlanMethod(
    "snat-zone", ("nftables", "iptables-legacy"), changes_host=True, build=build
)
