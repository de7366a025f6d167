"""The values explain produces and fix consumes: what a diagnosis is made of.

Know before changing: the field names are the JSON contract of
`ctfix explain --json` (issue: listeners[], clients[], evidence, rules[], fixes[]);
renaming one breaks users' scripts. Add fields, do not rename them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ctfix.core.addr import Family as Family  # the vocabulary's, defined with addresses
from ctfix.core.addr import endpoint

if TYPE_CHECKING:
    from ctfix.core.detectors.stale_nat import StaleEntry, StaleNatFinding

#: `unknown`: ctfix cannot see (a family the port serves with a wildcard socket is not
#: tracked by conntrack, or the table cannot be read): never `ok` for lack of evidence
Verdict = Literal["ok", "at-risk", "broken", "unknown"]
#: an unconnected socket serves every client; a connect()ed one only its peer
ListenerState = Literal["listening", "connected"]
#: what of a reply's source differs from what the client sent to
Mismatch = Literal["address", "port", "address+port"]
NetfilterBackend = Literal["nftables", "iptables-legacy"]


@dataclass(frozen=True, slots=True)
class Reason:
    """One statement of a diagnosis: a stable kebab-case `code` that scripts and tests
    branch on, and the `text` people read. Codes are listed in docs/json.md; never
    reuse a code for another meaning."""

    code: str
    text: str

    def __post_init__(self) -> None:
        if not self.code or self.code != self.code.lower() or " " in self.code:
            raise ValueError(f"reason code must be kebab-case: {self.code!r}")


#: what `ctfix fix --method` does: the one list of methods (ctfix.core.plan registers
#: a planner for each, and `fix --method` offers exactly these)
Method = Literal["policy-route", "snat-zone", "bind", "flush-stale"]
#: what explain may recommend: the methods, and the application's own fix
FixMethod = Literal["pktinfo", Method]


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """The container a process (or a namespace, or a client address) belongs to.

    `id` is the engine's full id as the cgroup path shows it; `name` is the engine's
    name for it, or the short id when no engine answered; `engine` is "docker",
    "podman", "containerd" or "cri-o" (None when neither the cgroup path nor an
    engine said which); `pod` and `namespace` come from the Kubernetes labels
    `io.kubernetes.pod.name` / `io.kubernetes.pod.namespace` when the engine has them.
    """

    id: str
    name: str
    engine: str | None = None
    pod: str | None = None
    namespace: str | None = None

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass(frozen=True, slots=True)
class Listener:
    """A UDP socket on the port, and the process that owns it (if found)."""

    address: str  # local address as bound: "0.0.0.0", "::", "192.0.2.1"
    port: int
    family: Family
    state: ListenerState
    pid: int | None = None
    process: str | None = None  # comm, e.g. "nc"
    cmdline: tuple[str, ...] = ()
    unit: str | None = None  # systemd unit or container id from the cgroup
    v6only: bool | None = None  # AF_INET6 sockets only
    peer: str | None = None  # "addr:port" of a connected socket
    exe: str | None = None  # the owner's executable (/proc/PID/exe), when readable
    #: every process holding the socket, (pid, comm), lowest pid first: a pre-forking
    #: daemon shares one socket among its workers, and any of them may answer.
    processes: tuple[tuple[int, str | None], ...] = ()
    container: ContainerRef | None = None  # the owner's container, from its cgroup

    @property
    def wildcard(self) -> bool:
        return self.address in ("0.0.0.0", "::")


@dataclass(frozen=True, slots=True)
class Uplink:
    """A local address that remote clients sent to, living on another interface than
    the one their replies leave by: its own uplink, and whether replies get there.

    Remote: the clients are beyond a router, not on a link of the host.
    """

    address: str  # the local address the clients sent to
    interface: str  # the interface it lives on (where requests to it come in)
    network: str = ""  # the address's own network on `interface` (CIDR)
    #: the next hop on `interface` toward the clients, from `route` (None: no route
    #: covers them, or a device route such as `default dev ppp0` that needs none)
    gateway: str | None = None
    #: the host's route via `interface` that covers the clients (any table), as `ip
    #: route` prints it; None when there is none
    route: str | None = None
    #: `interface` leads to a router (a route via it covers the clients, or goes through
    #: a gateway): replies that leave by another interface take another path
    routed: bool = False
    #: a netfilter mark and an `ip rule fwmark` already send the port's replies out by
    #: `interface` (a snat-zone fix with its reroute)
    rerouted: bool = False
    #: a reply that already leaves from `address` (a server that answers from the
    #: destination address, or is bound to it) goes out by `interface`: the host routes
    #: by source (`ip rule from ADDRESS lookup T`). None: not asked
    source_routed: bool | None = None
    #: replies to these clients leave by `interface` (or it is not an uplink: not
    #: `routed`); False is the `reply-leaves-other-uplink` problem
    ok: bool = True


@dataclass(frozen=True, slots=True)
class ClientNetwork:
    """A network clients reach the service from, and what they would get back."""

    network: str  # CIDR, e.g. "192.0.2.0/24"
    addressed: tuple[str, ...]  # local addresses these clients sent to (seen or assumed)
    predicted_source: str | None  # source the kernel picks for a reply from the port
    ok: bool  # every addressed address equals predicted_source (and leaves by its uplink)
    interface: str | None = None  # where the network is connected
    seen: bool = False  # from conntrack evidence (True) or from a connected route
    #: the host's own addresses on `interface` (the clients' gateway, on their link):
    #: clients may address them even when conntrack (30 s of memory) shows none doing so.
    onlink: tuple[str, ...] = ()
    #: addressed addresses whose requests from this network conntrack shows answered
    #: from the right source (observed, whatever routing predicts)
    answered: tuple[str, ...] = ()
    #: addresses (addressed or on-link) whose clients here would get replies from
    #: another address: what makes the network not ok (empty when ok)
    wrong_for: tuple[str, ...] = ()
    #: services ("addr:port") these clients sent to that a DNAT forwarded to an address
    #: in `addressed` (their `wrong_for` names them when they would get no answer): a
    #: reply must go back from that address, or be rewritten to the service itself
    services: tuple[str, ...] = ()
    #: the interface the port's replies to them leave by, and its next hop (None: the
    #: clients are on-link), from the same route lookup as predicted_source
    egress: str | None = None
    egress_gateway: str | None = None
    #: addressed addresses whose own uplink is not `egress` (remote clients only)
    uplinks: tuple[Uplink, ...] = ()
    #: the address the route lookup was asked about (a client seen, else one in the
    #: network; for the internet, 0.0.0.0/0 or ::/0, one only a default route covers)
    probe: str | None = None


@dataclass(frozen=True, slots=True)
class WrongSourceReply:
    """One wrong-source pair from the conntrack table (request, then the bad reply)."""

    client: str  # "addr:port"
    service: str  # the addr:port the client sent to
    expected_source: str
    actual_source: str
    mismatch: Mismatch
    count: int = 1  # pairs seen for this (service, actual source, client network)
    clients: int = 1  # distinct clients among them; `client` is the latest
    client_network: str | None = None  # the client network they were aggregated by
    #: the program answers from other ports by design: `actual_source` is an address
    replies_from_other_port: bool = False
    container: ContainerRef | None = None  # the container `client` (the latest) is in
    #: when the first and the latest of these replies left (seconds since the epoch),
    #: as far as conntrack tells (timestamps, or the entry's time left); None: unknown
    first_seen: float | None = None
    last_seen: float | None = None


@dataclass(frozen=True, slots=True)
class ForwardedService:
    """Requests to `address:port` (as clients send them) that a DNAT forwards to this
    port on this host (`target_address:target_port`): the server must answer them from
    the target, and a rewrite of a wrong-source reply must go back to `address:port`.

    `address` is None when the DNAT matches no single destination address (`matched`
    says what it matches: a network, any address); such clients can be remembered only
    once conntrack shows which address they used (then it is another, exact, entry).
    """

    address: str | None
    port: int | None  # None: the DNAT keeps any port (only with `address` None)
    target_address: str
    target_port: int
    #: where the DNAT is: "prerouting" (other hosts' clients), "output" (this host's
    #: own); empty when only conntrack shows it (the rule was not read)
    hooks: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()  # the DNAT rule(s) as their tool prints them
    seen: int = 0  # requests to it in the conntrack table
    matched: str | None = None  # what the rule matches when `address` is None

    @property
    def service(self) -> str:
        """`203.0.113.10:40054`, or what the rule matches: `any address:40054`."""
        if self.address is not None and self.port is not None:
            return endpoint(self.address, self.port)
        where = self.address or self.matched or "any address"
        return f"{where}:{self.port if self.port is not None else 'any port'}"

    @property
    def target(self) -> str:
        return endpoint(self.target_address, self.target_port)

    @property
    def exact(self) -> bool:
        """One known address and port: its clients can be remembered in advance."""
        return self.address is not None and self.port is not None

    @property
    def label(self) -> str:
        return f"{self.service}, DNAT'd to {self.target}"


@dataclass(frozen=True, slots=True)
class Evidence:
    wrong_source: tuple[WrongSourceReply, ...] = ()
    healthy: int = 0  # requests answered from the right source (through_fix included)
    #: of `healthy`, those answered by a reply the snat-zone remedy rewrote in one of
    #: ctfix's zones (ctfix.core.zones): the fix's work, not the server's
    through_fix: int = 0
    #: requests without a usable reply: no reply at all, or only a refused wrong-source
    #: one; the sum of the non-one-way unanswered records' flows (Diagnosis.unanswered)
    unanswered: int = 0
    #: (client address, addressed address) of each request answered from the right
    #: source (not in the JSON: the client table's `answered` shows it per network)
    right_answers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class UnansweredService:
    """Requests to one service of the port that got no reply, for one reason (the
    unanswered detector's finding, as explain and scan show it)."""

    service: str  # the addr:port the clients sent to
    reason: str  # "no-socket" | "no-reply" | "wrong-source" | "stale-nat"
    flows: int
    clients: int
    one_way: bool = False  # a one-way service (knowledge base): expected, not a problem
    target: str | None = None  # where a DNAT sent them, when not the service itself
    program: str | None = None  # no-reply: the process holding the socket
    rules: tuple[str, ...] = ()  # no-reply: rules that can drop or untrack the replies


@dataclass(frozen=True, slots=True)
class RuleHit:
    """A netfilter rule that touches the port, and why it cannot help (if so)."""

    backend: NetfilterBackend
    table: str
    chain: str
    rule: str  # the rule as its own tool prints it
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Fix:
    method: FixMethod
    summary: str
    detail: str
    recommended: bool = False  # explain's pick for this host (may be several)


FixVerdict = Literal["ineffective", "no-failure-seen", "unknown"]


@dataclass(frozen=True, slots=True)
class FixEffect:
    """What the evidence says about the fix ctfix recorded for the port.

    `ineffective`: wrong-source replies left since the fix was applied (the services
    they answered are `ineffective_for`). `no-failure-seen`: none in what could show
    one (`evidence`): not proof that it works. `unknown`: nothing could have shown one
    (conntrack unreadable, not listening). `uncovered`: services
    forwarded to the port that the fix does not remember clients of (a DNAT made
    after it, or one it could not cover).
    """

    method: str
    applied_at: float  # seconds since the epoch
    covers: tuple[str, ...]  # "clients of S" per target, as the plan named them
    verdict: FixVerdict
    since_fix: tuple[WrongSourceReply, ...] = ()  # the evidence of `ineffective`
    ineffective_for: tuple[str, ...] = ()  # services ("addr:port") those replies answered
    uncovered: tuple[ForwardedService, ...] = ()
    #: what the verdict rests on: conntrack timestamps, conntrack time left, live events
    evidence: tuple[str, ...] = ()
    #: how far back, in seconds before the diagnosis, a wrong-source reply since the fix
    #: would still show (the table forgets an unreplied entry after
    #: nf_conntrack_udp_timeout; 0: nothing could show one)
    window: float = 0.0
    #: the window reaches back to the apply: nothing since the fix could have gone unseen
    whole_time: bool = False


@dataclass(frozen=True, slots=True)
class Diagnosis:
    port: int
    netns: str
    verdict: Verdict
    reasons: tuple[Reason, ...]
    listeners: tuple[Listener, ...] = ()
    clients: tuple[ClientNetwork, ...] = ()
    evidence: Evidence = field(default_factory=Evidence)
    rules: tuple[RuleHit, ...] = ()
    fixes: tuple[Fix, ...] = ()
    local_addresses: tuple[str, ...] = ()
    service: str | None = None  # the knowledge base's name for the program, if recognised
    #: nothing is bound to the port while clients' requests go unanswered (an outage,
    #: not a wrong-source problem: the verdict stays about wrong sources, exit is 1)
    service_down: bool = False
    #: "addr:port" on this host that a DNAT forwards the port's requests to
    forwarded_to: tuple[str, ...] = ()
    #: clients still sent to a target the DNAT rules no longer name (one per service
    #: and stale target), and the exact entries (what `fix --method flush-stale` deletes)
    stale_nat: tuple[StaleNatFinding, ...] = ()
    stale_entries: tuple[StaleEntry, ...] = ()
    #: services whose requests a DNAT forwards to this port on this host
    forwarded_from: tuple[ForwardedService, ...] = ()
    #: the fix ctfix recorded for the port, and whether it works (None: no record)
    fix_effect: FixEffect | None = None
    #: per family, whether conntrack tracked it while the evidence was gathered (None:
    #: could not tell); where it did not, no evidence can exist
    tracking: dict[str, bool | None] = field(default_factory=dict)
    #: families that `--listen` switched tracking on for, for its duration
    tracking_switched_on: tuple[str, ...] = ()
    #: the families that matter here (served, with a global address) and that are not
    #: tracked: no evidence can exist for them
    blind: tuple[str, ...] = ()
    #: the container whose network namespace this is (None: the host's, or unknown)
    netns_container: ContainerRef | None = None
    #: requests to the port that got no reply, per service and reason
    unanswered: tuple[UnansweredService, ...] = ()
