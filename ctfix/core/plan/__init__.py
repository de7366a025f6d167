"""Diagnosis + method -> Plan: the ordered, reversible steps of `ctfix fix`.

Pure: no sockets, no subprocess, no kernel. Every step names the objects it creates
(all recognisably ctfix's: rule protocol 199 and priority 32100, routing table
0xC7F00000+port, nftables table `inet ctfix_<port>`, iptables comment `ctfix:<port>`,
ipsets `ctfix-<port>-v4-<n>`), the equivalent command lines, and how to undo it.

Know before changing: a step's spec is what the state file records and what
`--revert` undoes, possibly by a later ctfix version after a crash; so specs must
stay serialisable (`step_to_dict`/`step_from_dict`) and undo must need nothing but
the spec. The order of steps is the order of safety: for snat-zone, the reply zone
comes before the SNAT that needs it (an SNAT without the zone collides with the
request's conntrack entry and the reply is dropped), and undo runs in reverse.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ctfix.core.addr import endpoint, unmap
from ctfix.core.model import ClientNetwork, Diagnosis, Listener
from ctfix.errors import CtfixError

Method = Literal["policy-route", "snat-zone", "bind"]
Backend = Literal["iproute2", "nftables", "iptables-legacy", "none"]
METHODS: tuple[Method, ...] = ("policy-route", "snat-zone", "bind")

#: rtm_protocol / FRA_PROTOCOL of every route and rule ctfix makes (unassigned in
#: /etc/iproute2/rt_protos), so `ip rule`/`ip route` show `proto 199` and revert
#: can never mistake somebody else's object for ours.
RT_PROTO = 199
#: ctfix's rule priority: after the `local` rule, before `main` (32766).
RULE_PRIORITY = 32100
#: table id = RT_TABLE_BASE + port: one table per fixed port, in a range nobody uses.
RT_TABLE_BASE = 0xC7F00000
#: the conntrack zone the replies rewritten to the first target address live in (any
#: zone other than 0 works); the n-th address uses CT_ZONE + n. One zone per address,
#: because a NAT binding is made once per conntrack entry: if a client with a fixed
#: source port switched from one rewritten address to another within the same zone,
#: its replies would keep the first address's binding.
CT_ZONE = 51185
#: how long a client (address, port) is remembered after its last request, seconds.
#: Longer than conntrack's UDP stream timeout (120 s), so a remembered reply path
#: never outlives its memory.
CLIENT_TIMEOUT = 180


def table_id(port: int) -> int:
    return RT_TABLE_BASE + port


def nft_table_name(port: int) -> str:
    return f"ctfix_{port}"


def comment(port: int) -> str:
    return f"ctfix:{port}"


def ipset_name(port: int, family: str, index: int) -> str:
    return f"ctfix-{port}-{'v6' if family == 'ipv6' else 'v4'}-{index}"


def _family(address: str) -> str:
    return "ipv6" if ipaddress.ip_address(address).version == 6 else "ipv4"


# -- step specs (what is recorded and undone) -------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """`ip route add NETWORK dev IFACE src SOURCE table T proto 199`."""

    family: str
    network: str
    interface: str
    source: str
    table: int
    protocol: int = RT_PROTO
    kind: Literal["route"] = "route"


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """`ip rule add priority P ipproto udp sport PORT lookup T protocol 199`."""

    family: str
    port: int
    table: int
    priority: int = RULE_PRIORITY
    protocol: int = RT_PROTO
    kind: Literal["rule"] = "rule"


@dataclass(frozen=True, slots=True)
class NftTableSpec:
    """A whole nftables table of ctfix's own, created in one atomic batch."""

    family: str  # "inet"
    name: str
    batch: str  # JSON list of libnftables commands (json.dumps), applied atomically
    text: str  # the same table in nft syntax, for people and `nft -f`
    kind: Literal["nft-table"] = "nft-table"


@dataclass(frozen=True, slots=True)
class IpsetSpec:
    """`ipset create NAME hash:ip,port family inet|inet6 timeout T`."""

    name: str
    family: str
    set_type: str = "hash:ip,port"
    timeout: int = CLIENT_TIMEOUT
    kind: Literal["ipset"] = "ipset"


@dataclass(frozen=True, slots=True)
class XtExtension:
    """An iptables match or target: name and its options in iptables' order."""

    name: str
    options: tuple[tuple[str, str], ...] = ()  # ("match-set", "NAME dst,dst")


@dataclass(frozen=True, slots=True)
class IptRuleSpec:
    """One iptables-legacy rule, inserted first in its chain, marked `ctfix:<port>`."""

    family: str
    table: str
    chain: str
    protocol: str
    source: str | None  # "198.51.100.13" or "!198.51.100.13"
    destination: str | None
    matches: tuple[XtExtension, ...]
    target: XtExtension
    kind: Literal["iptables-rule"] = "iptables-rule"


Spec = RouteSpec | RuleSpec | NftTableSpec | IpsetSpec | IptRuleSpec


@dataclass(frozen=True, slots=True)
class Step:
    spec: Spec
    summary: str
    creates: tuple[str, ...]
    commands: tuple[str, ...]  # equivalent shell commands that apply the step
    undo: tuple[str, ...]  # equivalent shell commands that remove it


@dataclass(frozen=True, slots=True)
class RouteCheck:
    """After apply: a reply from the port to `destination` must leave from `source`."""

    destination: str
    source: str


@dataclass(frozen=True, slots=True)
class Plan:
    port: int
    method: Method
    backend: Backend
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()
    checks: tuple[RouteCheck, ...] = ()
    advice: tuple[str, ...] = ()  # method "bind": what to change in the application
    #: what the plan knowingly breaks (only with --force): printed before applying.
    warnings: tuple[str, ...] = ()


# -- serialisation (state file, --json) ---------------------------------------------------

_SPECS: dict[str, type[Any]] = {
    "route": RouteSpec,
    "rule": RuleSpec,
    "nft-table": NftTableSpec,
    "ipset": IpsetSpec,
    "iptables-rule": IptRuleSpec,
}


def step_to_dict(step: Step) -> dict[str, Any]:
    return asdict(step)


def step_from_dict(data: dict[str, Any]) -> Step:
    """Inverse of `step_to_dict`; raises CtfixError on a record it cannot read."""
    try:
        raw = dict(data["spec"])
        cls = _SPECS[raw["kind"]]
        if cls is IptRuleSpec:
            raw["matches"] = tuple(_xt(m) for m in raw["matches"])
            raw["target"] = _xt(raw["target"])
        spec = cls(**raw)
        return Step(
            spec=spec,
            summary=str(data["summary"]),
            creates=tuple(data["creates"]),
            commands=tuple(data["commands"]),
            undo=tuple(data["undo"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CtfixError(f"unreadable step in the state file ({err})") from None


def _xt(raw: dict[str, Any]) -> XtExtension:
    return XtExtension(str(raw["name"]), tuple((str(k), str(v)) for k, v in raw["options"]))


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "port": plan.port,
        "method": plan.method,
        "backend": plan.backend,
        "notes": list(plan.notes),
        "warnings": list(plan.warnings),
        "advice": list(plan.advice),
        "checks": [asdict(c) for c in plan.checks],
        "steps": [step_to_dict(s) for s in plan.steps],
    }


# -- planning ---------------------------------------------------------------------------


def make_plan(
    diagnosis: Diagnosis,
    method: Method,
    backend: Backend = "nftables",
    *,
    force: bool = False,
    notes: tuple[str, ...] = (),
    advice: tuple[str, ...] = (),
) -> Plan:
    """The steps that fix `diagnosis.port` by `method`, or a CtfixError saying why not.

    `backend` matters only for snat-zone ("nftables" or "iptables-legacy");
    policy-route always uses iproute2, bind changes nothing.
    """
    port = diagnosis.port
    if method not in METHODS:
        raise CtfixError(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")
    if method == "bind":
        return Plan(port, "bind", "none", (), notes, advice=advice)
    if not diagnosis.listeners and not diagnosis.evidence.wrong_source and not force:
        raise CtfixError(
            f"no UDP socket on port {port} and no evidence of wrong-source replies",
            f"check the port (`ctfix explain {port}`), or pass --force to plan anyway",
        )
    if method == "policy-route":
        return _policy_route(diagnosis, notes, force)
    if backend not in ("nftables", "iptables-legacy"):
        raise CtfixError(f"snat-zone needs nftables or iptables-legacy, not {backend}")
    return _snat_zone(diagnosis, backend, force, notes)


def _broken_networks(diagnosis: Diagnosis) -> list[ClientNetwork]:
    """Client networks that send to an exposed address other than the reply source."""
    broken = []
    for cn in diagnosis.clients:
        predicted = unmap(cn.predicted_source) if cn.predicted_source else None
        if not cn.ok and any(a != predicted for a in _addressed(cn, diagnosis.listeners)):
            broken.append(cn)
    return broken


def _addressed(cn: ClientNetwork, listeners: tuple[Listener, ...]) -> list[str]:
    """Local addresses these clients sent to and a wildcard socket receives, unmapped,
    de-duplicated, in order."""
    seen: list[str] = []
    for address in cn.addressed:
        plain = unmap(address)
        if plain not in seen and _unexposed_reason(plain, listeners) is None:
            seen.append(plain)
    return seen


def _serves(listener: Listener, family: str) -> bool:
    """A wildcard socket that receives this family's datagrams."""
    if not listener.wildcard:
        return False
    if listener.family == "ipv4":
        return family == "ipv4"
    # An AF_INET6 wildcard gets IPv4 too unless IPV6_V6ONLY (unknown: Linux's default
    # net.ipv6.bindv6only=0, dual-stack).
    return family == "ipv6" or listener.v6only is not True


def _unexposed_reason(address: str, listeners: tuple[Listener, ...]) -> str | None:
    """Why replies to clients of `address` cannot come from a wrong source, or None.

    Only a wildcard socket answers from whatever source the route picks. A socket
    bound to the address itself gets its datagrams (the kernel prefers the most
    specific bind) and answers from it. No socket at all (planned with --force): every
    address is assumed exposed.
    """
    if not listeners:
        return None
    port = listeners[0].port
    if any(
        lst.state == "listening" and not lst.wildcard and unmap(lst.address) == address
        for lst in listeners
    ):
        return (
            f"{address} has a UDP socket of its own on port {port}, bound to it, so its "
            "replies already leave from it"
        )
    family = _family(address)
    if not any(_serves(lst, family) for lst in listeners):
        name = "IPv6" if family == "ipv6" else "IPv4"
        return (
            f"no {name} wildcard socket listens on port {port}, so nothing there "
            f"answers from the wrong source for {address}"
        )
    return None


def _probe_address(cn: ClientNetwork, diagnosis: Diagnosis) -> str:
    """An address in the client network to ask the route lookup about.

    A client actually seen is best; otherwise the network's last host address, which
    is rarely a local one (asking about a local address would answer `local`).
    """
    net = ipaddress.ip_network(cn.network, strict=False)
    for reply in diagnosis.evidence.wrong_source:
        client = unmap(reply.client.rsplit(":", 1)[0].strip("[]"))
        try:
            if ipaddress.ip_address(client) in net:
                return client
        except ValueError:
            continue
    local = {unmap(a) for a in diagnosis.local_addresses}
    first = net.network_address
    candidate = net.broadcast_address - 1 if net.num_addresses > 2 else first
    while str(candidate) in local and candidate != first:
        candidate = candidate - 1
    return str(candidate)


def _policy_route(diagnosis: Diagnosis, notes: tuple[str, ...], force: bool) -> Plan:
    port = diagnosis.port
    broken = _broken_networks(diagnosis)
    seen = [cn for cn in broken if cn.seen]
    if broken and not seen:
        raise CtfixError(
            f"no client of port {port} has been seen yet, so which local address each "
            "network sends to is unknown; a route can give a network only one source",
            "let clients send requests first (conntrack remembers them), or use "
            "--method snat-zone",
        )
    if len(seen) < len(broken):
        skipped = ", ".join(cn.network for cn in broken if not cn.seen)
        notes = (*notes, f"no client seen from {skipped}: left alone")
    broken = seen
    if not broken:
        raise CtfixError(
            f"nothing to route: every known client network of port {port} already gets "
            "replies from the address it sends to",
            f"see `ctfix explain {port}`; use --method snat-zone to cover clients not seen "
            "yet",
        )
    table = table_id(port)
    steps: list[Step] = []
    checks: list[RouteCheck] = []
    families: list[str] = []
    warnings: list[str] = []
    #: (who would get no answer, the --force condition): refused after the loop, so
    #: that the refusal names every network, not just the first one.
    breaks: list[tuple[str, str]] = []
    for cn in broken:
        addressed = _addressed(cn, diagnosis.listeners)
        if len(addressed) != 1:
            raise CtfixError(
                f"clients in {cn.network} send to {' and '.join(addressed) or 'no known address'}"
                ": a route can give their replies only one source",
                "use --method snat-zone",
            )
        if cn.interface is None:
            raise CtfixError(
                f"the interface of client network {cn.network} is unknown",
                "use --method snat-zone",
            )
        source = addressed[0]
        stranded = [
            a
            for a in (unmap(o) for o in cn.onlink)
            if a != source and _unexposed_reason(a, diagnosis.listeners) is None
        ]
        if stranded:
            who = (
                f"clients in {cn.network} that address {' or '.join(stranded)} (the host's "
                f"own address on {cn.interface}, their gateway)"
            )
            breaks.append((who, f"in {cn.network} ever addresses {' or '.join(stranded)}"))
            warnings.append(
                f"--force: replies to {cn.network} will leave from {source}; {who} will "
                "get no answer until --revert"
            )
        family = _family(source)
        if _family(cn.network.split("/")[0]) != family:
            raise CtfixError(f"clients in {cn.network} address {source} of another family")
        if family not in families:
            families.append(family)
        ip = "ip -6" if family == "ipv6" else "ip"
        where = f"{cn.network} dev {cn.interface} src {source} table {table} proto {RT_PROTO}"
        steps.append(
            Step(
                RouteSpec(family, cn.network, cn.interface, source, table),
                f"replies to {cn.network} leave from {source}",
                (f"route {cn.network} dev {cn.interface} src {source} in table {table}",),
                (f"{ip} route add {where}",),
                (f"{ip} route del {where}",),
            )
        )
        checks.append(RouteCheck(_probe_address(cn, diagnosis), source))
    if breaks and not force:
        raise CtfixError(
            f"policy-route would break {' and '.join(who for who, _ in breaks)}: none was "
            "seen, but conntrack forgets a flow after 30 s, so that is no proof there are "
            "none",
            "use --method snat-zone (it serves both), or add --force if no client "
            + ", and none ".join(unless for _, unless in breaks),
        )
    for family in families:
        ip = "ip -6" if family == "ipv6" else "ip"
        rule = (
            f"priority {RULE_PRIORITY} ipproto udp sport {port} lookup {table} "
            f"protocol {RT_PROTO}"
        )
        steps.append(
            Step(
                RuleSpec(family, port, table),
                f"{family} UDP replies from port {port} consult table {table}",
                (f"{family} rule {RULE_PRIORITY}: ipproto udp sport {port} lookup {table}",),
                (f"{ip} rule add {rule}",),
                (f"{ip} rule del {rule}",),
            )
        )
    if any(len(_addressed(cn, diagnosis.listeners)) > 1 for cn in diagnosis.clients if cn.ok):
        notes = (
            *notes,
            "some client networks address several local addresses; they are left alone",
        )
    return Plan(
        port, "policy-route", "iproute2", tuple(steps), notes, tuple(checks),
        warnings=tuple(warnings),
    )


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
        reason = _unexposed_reason(address, diagnosis.listeners)
        if reason is None:
            usable.append(address)
        elif reason not in skipped:
            skipped.append(reason)
    return usable, skipped


def _snat_zone(
    diagnosis: Diagnosis, backend: Backend, force: bool, notes: tuple[str, ...]
) -> Plan:
    port = diagnosis.port
    targets, skipped = _snat_targets(diagnosis, force)
    if not targets:
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
    steps = _nft_steps(port, targets) if backend == "nftables" else _ipt_steps(port, targets)
    notes = (*notes, *(f"left alone: {why}" for why in skipped))
    return Plan(port, "snat-zone", backend, tuple(steps), notes)


# -- nftables ------------------------------------------------------------------------------

_NFT_FAMILY = {"ipv4": "ip", "ipv6": "ip6"}
_NFT_ADDR = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}


def _nft_set_name(family: str, index: int) -> str:
    return f"clients{'6' if family == 'ipv6' else '4'}_{index}"


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _nft_steps(port: int, targets: list[str]) -> list[Step]:
    table = nft_table_name(port)
    tag = comment(port)
    base = {"family": "inet", "table": table}
    batch: list[dict[str, Any]] = [{"add": {"table": {"family": "inet", "name": table}}}]
    chains = [
        ("remember_clients", "filter", "prerouting", -300, "raw"),
        ("reply_zone", "filter", "output", -300, "raw"),
        ("reply_snat", "nat", "postrouting", 100, "srcnat"),
    ]
    sets_text: list[str] = []
    rules_text: dict[str, list[str]] = {name: [] for name, *_ in chains}
    rules_json: list[dict[str, Any]] = []
    creates = [f"table inet {table}"]
    indexes = {"ipv4": 0, "ipv6": 0}
    for number, address in enumerate(targets):
        family = _family(address)
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
                        "flags": ["timeout"],
                        "timeout": CLIENT_TIMEOUT,
                    }
                }
            }
        )
        sets_text.append(
            f"\tset {name} {{\n\t\ttype {_NFT_ADDR[family]} . inet_service\n"
            f"\t\tflags dynamic,timeout\n\t\ttimeout {CLIENT_TIMEOUT}s\n\t}}\n"
        )
        client_key = {"concat": [_payload(nf, "saddr"), _payload("udp", "sport")]}
        reply_key = {"concat": [_payload(nf, "daddr"), _payload("udp", "dport")]}
        wrong_source = [
            _match(_payload(nf, "saddr"), address, "!="),
            _match(_payload("udp", "sport"), port),
            _match(reply_key, f"@{name}"),
        ]
        snat_to = f"[{address}]:{port}" if family == "ipv6" else f"{address}:{port}"
        rules = {
            "remember_clients": (
                [
                    _match(_payload(nf, "daddr"), address),
                    _match(_payload("udp", "dport"), port),
                    {"set": {"op": "update", "elem": client_key, "set": f"@{name}"}},
                ],
                f"{nf} daddr {address} udp dport {port} "
                f"update @{name} {{ {nf} saddr . udp sport }}",
            ),
            # A client that now asks another local address (a fixed source port:
            # ntpd's 123, SNMP, a port-keeping NAT) must get that address's replies
            # untouched: it stops being one of this address's clients at once.
            "forget_clients": (
                [
                    _match(_payload(nf, "daddr"), address, "!="),
                    _match(_payload("udp", "dport"), port),
                    _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
                    {"set": {"op": "delete", "elem": client_key, "set": f"@{name}"}},
                ],
                f"{nf} daddr != {address} udp dport {port} fib daddr type local "
                f"delete @{name} {{ {nf} saddr . udp sport }}",
            ),
            "reply_zone": (
                [*wrong_source, {"mangle": {"key": {"ct": {"key": "zone"}}, "value": zone}}],
                f"{nf} saddr != {address} udp sport {port} {nf} daddr . udp dport @{name} "
                f"ct zone set {zone}",
            ),
            "reply_snat": (
                [*wrong_source, {"snat": {"family": nf, "addr": address, "port": port}}],
                f"{nf} saddr != {address} udp sport {port} {nf} daddr . udp dport @{name} "
                f"snat {nf} to {snat_to}",
            ),
        }
        for rule_name, (expr, text) in rules.items():
            chain = "remember_clients" if rule_name == "forget_clients" else rule_name
            rules_json.append(
                {"add": {"rule": {**base, "chain": chain, "expr": expr, "comment": tag}}}
            )
            rules_text[chain].append(f'\t\t{text} comment "{tag}"\n')
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
    batch.extend(rules_json)
    text = f"table inet {table} {{\n" + "".join(sets_text)
    for name, kind, hook, _prio, prio_name in chains:
        text += (
            f"\tchain {name} {{\n\t\ttype {kind} hook {hook} priority {prio_name}; "
            "policy accept;\n" + "".join(rules_text[name]) + "\t}\n"
        )
    text += "}\n"
    addresses = ", ".join(targets)
    return [
        Step(
            NftTableSpec("inet", table, json.dumps(batch, sort_keys=True), text),
            f"remember the clients of {addresses} (and forget them when they ask another "
            f"local address); move port {port}'s replies to them from another source "
            f"into a conntrack zone of their own ({_zones(len(targets))}) and SNAT them there",
            tuple(creates),
            (f"nft -f - <<'EOF'\n{text}EOF",),
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


def _ipt_steps(port: int, targets: list[str]) -> list[Step]:
    tag = comment(port)
    ipsets: list[Step] = []
    remember: list[Step] = []
    zone: list[Step] = []
    snat: list[Step] = []
    indexes = {"ipv4": 0, "ipv6": 0}
    for number, address in enumerate(targets):
        family = _family(address)
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
    return ipsets + remember + zone + snat


# -- bind advice -------------------------------------------------------------------------

def pktinfo_advice(port: int) -> tuple[str, ...]:
    """The generic application fix, for any program."""
    return (
        "The lasting fix is in the application: answer each datagram from the address it "
        "was sent to.",
        "Either bind one socket per local address (and per address added later), or keep "
        "the wildcard socket and enable IP_PKTINFO / IPV6_RECVPKTINFO: read the "
        "destination address with recvmsg() and pass it back as the source in sendmsg()'s "
        "IP_PKTINFO / IPV6_PKTINFO control message.",
        f"`ctfix serve --port {port}` is a reference echo server that does exactly this "
        "(see ctfix/pktinfo.py and docs/pktinfo.md).",
    )
