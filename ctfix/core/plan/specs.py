"""Step specs: what one step of `ctfix fix` makes, as the state file records it.

Pure. Every spec names objects that are recognisably ctfix's (rule protocol 199 and
priority 32100, routing table 0xC7F00000+port, nftables table `inet ctfix_<port>`,
iptables comment `ctfix:<port>`, ipsets `ctfix-<port>-v4-<n>`; a snat-zone reroute's
fwmark, equal to its table id, in 0xC7F00000-0xC7FFFFFF with the port in the low 16
bits).

Know before changing: a spec is what `--revert` undoes, possibly by a later ctfix
version after a crash; so specs must stay serialisable (`step_to_dict` /
`step_from_dict`), readable from older state files, and undo must need nothing but
the spec. Old state files to keep reading: an `nft-table` spec whose `batch` is a
JSON *string* (and that carries a `text` field, now rendered from the batch).
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ctfix.core.model import Family
from ctfix.core.plan.nft_syntax import NftCommand, render_batch
from ctfix.errors import CtfixError

#: rtm_protocol / FRA_PROTOCOL of every route and rule ctfix makes (unassigned in
#: /etc/iproute2/rt_protos), so `ip rule`/`ip route` show `proto 199` and revert
#: can never mistake somebody else's object for ours.
RT_PROTO = 199
#: ctfix's rule priority: after the `local` rule, before `main` (32766).
RULE_PRIORITY = 32100
#: table id = RT_TABLE_BASE + port: one table per fixed port, in a range nobody uses.
RT_TABLE_BASE = 0xC7F00000
#: A snat-zone fix that sends replies out by another uplink (ctfix/core/plan/reroute.py)
#: uses table RT_TABLE_BASE + n * REROUTE_STEP + port for the n-th such uplink of a
#: family (n from 0: the first is the port's own table, which snat-zone does not
#: otherwise use), and marks those replies with the same number: `ip rule fwmark T
#: ipproto udp sport PORT lookup T`. So every table and fwmark of ctfix's is in
#: 0xC7F00000-0xC7FFFFFF, with the port in the low 16 bits.
REROUTE_STEP = 0x10000
#: uplinks one port's fix can reroute to, per family (n < REROUTE_UPLINKS)
REROUTE_UPLINKS = 16
#: how long a client (address, port) is remembered after its last request, seconds.
#: Longer than conntrack's UDP stream timeout (120 s), so a remembered reply path
#: never outlives its memory.
CLIENT_TIMEOUT = 180


def table_id(port: int) -> int:
    return RT_TABLE_BASE + port


def reroute_table(port: int, index: int) -> int:
    """The table (and fwmark) of the index-th uplink a snat-zone fix reroutes to."""
    if not 0 <= index < REROUTE_UPLINKS:
        raise CtfixError(
            f"port {port}'s replies would need {index + 1} reroute tables; ctfix makes at "
            f"most {REROUTE_UPLINKS} per family"
        )
    return RT_TABLE_BASE + index * REROUTE_STEP + port


def nft_table_name(port: int) -> str:
    return f"ctfix_{port}"


def comment(port: int) -> str:
    return f"ctfix:{port}"


def ipset_name(port: int, family: Family, index: int) -> str:
    return f"ctfix-{port}-{'v6' if family == 'ipv6' else 'v4'}-{index}"


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """`ip route add NETWORK [via GATEWAY] dev IFACE src SOURCE table T proto 199`.

    A default route is NETWORK 0.0.0.0/0 or ::/0.
    """

    family: Family
    network: str
    interface: str
    source: str
    table: int
    protocol: int = RT_PROTO
    #: the next hop: the uplink's router, for clients beyond it (None: on-link)
    gateway: str | None = None
    kind: Literal["route"] = "route"

    @property
    def words(self) -> str:
        """`NETWORK [via GATEWAY] dev IFACE src SOURCE table T proto 199`, as `ip` takes it."""
        network = "default" if self.network in ("0.0.0.0/0", "::/0") else self.network
        via = f" via {self.gateway}" if self.gateway else ""
        return (
            f"{network}{via} dev {self.interface} src {self.source} table {self.table} "
            f"proto {self.protocol}"
        )


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """`ip rule add priority P [fwmark M] ipproto udp sport PORT lookup T protocol 199`.

    With `fwmark`: only the replies a snat-zone reroute marked (see reroute.py).
    """

    family: Family
    port: int
    table: int
    priority: int = RULE_PRIORITY
    protocol: int = RT_PROTO
    fwmark: int | None = None
    kind: Literal["rule"] = "rule"

    @property
    def words(self) -> str:
        """`priority P [fwmark M] ipproto udp sport PORT lookup T protocol 199`."""
        mark = f" fwmark {self.fwmark:#x}" if self.fwmark is not None else ""
        return (
            f"priority {self.priority}{mark} ipproto udp sport {self.port} lookup "
            f"{self.table} protocol {self.protocol}"
        )


@dataclass(frozen=True, slots=True)
class NftTableSpec:
    """A whole nftables table of ctfix's own, created in one atomic batch.

    `batch` is the list of libnftables JSON commands that is applied; `text` (what
    people read and `nft -f` accepts) is rendered from it, so the two cannot differ.
    A spec is known by its table: the batch takes no part in its hash.
    """

    family: Literal["inet"]
    name: str
    batch: tuple[NftCommand, ...] = field(hash=False)
    kind: Literal["nft-table"] = "nft-table"

    @property
    def text(self) -> str:
        return render_batch(self.batch)


@dataclass(frozen=True, slots=True)
class IpsetSpec:
    """`ipset create NAME hash:ip,port family inet|inet6 timeout T`."""

    name: str
    family: Family
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

    family: Family
    table: str
    chain: str
    protocol: str
    source: str | None  # "198.51.100.13" or "!198.51.100.13"
    destination: str | None
    matches: tuple[XtExtension, ...]
    target: XtExtension
    kind: Literal["iptables-rule"] = "iptables-rule"


@dataclass(frozen=True, slots=True)
class ConntrackEntrySpec:
    """One conntrack entry to delete (flush-stale): its original tuple, zone and id
    (the kernel deletes it only if the entry under that tuple still has that id), the
    reply source it sent the client to, and where the rules send it now.

    Deleting cannot be undone and needs no undo: the client's next datagram makes a
    new entry, the way the rules say now. It is never recorded in the state file.
    """

    family: Family
    src: str
    dst: str
    sport: int
    dport: int
    reply_src: str
    reply_sport: int
    zone: int = 0
    id: int | None = None
    current: tuple[str, ...] = ()  # the targets the rules name now ("addr:port")
    kind: Literal["conntrack-entry"] = "conntrack-entry"


Spec = RouteSpec | RuleSpec | NftTableSpec | IpsetSpec | IptRuleSpec | ConntrackEntrySpec
SpecKind = Literal["route", "rule", "nft-table", "ipset", "iptables-rule", "conntrack-entry"]


@dataclass(frozen=True, slots=True)
class Step:
    spec: Spec
    summary: str
    creates: tuple[str, ...]
    commands: tuple[str, ...]  # equivalent shell commands that apply the step
    undo: tuple[str, ...]  # equivalent shell commands that remove it


@dataclass(frozen=True, slots=True)
class RouteCheck:
    """After apply: a reply from the port to `destination` must leave from `source`
    (and by `interface`, when given); with `mark`, a reply netfilter marked so."""

    destination: str
    source: str
    interface: str | None = None
    mark: int | None = None


def spec_object(spec: Spec) -> str:
    """The kernel object a spec names, from the spec itself: what a record points at
    (a step's `creates` is text saved beside it, and says what ctfix made, which an
    edited record no longer names)."""
    match spec:
        case NftTableSpec():
            return f"table {spec.family} {spec.name}"
        case IpsetSpec():
            return f"ipset {spec.name}"
        case RuleSpec():
            return f"{spec.family} rule {spec.words}"
        case RouteSpec():
            return f"{'ipv6 ' if spec.family == 'ipv6' else ''}route {spec.words}"
        case IptRuleSpec():
            ipt = "ip6tables" if spec.family == "ipv6" else "iptables"
            return f"{ipt} -t {spec.table} {spec.chain} rule -j {spec.target.name}"
        case ConntrackEntrySpec():
            return f"conntrack entry {spec.src}:{spec.sport} -> {spec.dst}:{spec.dport}"


# -- serialisation (state file, --json) ---------------------------------------------------


def _kind_of(cls: type[Spec]) -> str:
    return str(cls.__dataclass_fields__["kind"].default)


#: kind -> spec class, from the `Spec` union itself: a new spec class is readable as
#: soon as it is in the union.
_SPECS: dict[str, type[Spec]] = {_kind_of(cls): cls for cls in typing.get_args(Spec)}


def step_to_dict(step: Step) -> dict[str, Any]:
    """The step as JSON-ready data; an nft table's batch stays structured JSON."""
    data = asdict(step)
    if isinstance(step.spec, NftTableSpec):
        data["spec"]["batch"] = list(step.spec.batch)
    return data


def step_from_dict(data: dict[str, Any]) -> Step:
    """Inverse of `step_to_dict`; raises CtfixError on a record it cannot read."""
    try:
        raw = dict(data["spec"])
        cls = _SPECS[raw["kind"]]
        if cls is IptRuleSpec:
            raw["matches"] = tuple(_xt(m) for m in raw["matches"])
            raw["target"] = _xt(raw["target"])
        if cls is ConntrackEntrySpec:
            raw["current"] = tuple(raw.get("current", ()))
        if cls is NftTableSpec:
            raw.pop("text", None)  # older files kept the text; it is rendered now
            batch = raw["batch"]
            if isinstance(batch, str):  # older files: a JSON string inside the JSON
                batch = json.loads(batch)
            if not isinstance(batch, list) or not all(isinstance(c, dict) for c in batch):
                raise ValueError("an nft-table batch must be a list of commands")
            raw["batch"] = tuple(batch)
        spec = cls(**raw)
        return Step(
            spec=spec,
            summary=str(data["summary"]),
            creates=tuple(data["creates"]),
            commands=tuple(data["commands"]),
            undo=tuple(data["undo"]),
        )
    except KeyError as err:
        raise CtfixError(f"unreadable step in the state file (no {err.args[0]!r})") from None
    except ValueError as err:
        raise CtfixError(f"unreadable step in the state file ({err})") from None
    except TypeError:  # Python's words name its types: say it in the file's terms
        raise CtfixError("unreadable step in the state file (a value of the wrong kind)") from None


def _xt(raw: dict[str, Any]) -> XtExtension:
    return XtExtension(str(raw["name"]), tuple((str(k), str(v)) for k, v in raw["options"]))
