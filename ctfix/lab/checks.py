"""What the lab's story found, as data: each check holds what was observed, and
says whether it is what an engineer expects; ctfix.render.lab puts it in words.

Know before changing: a check's `ok` is the lab's verdict material (bug reproduced
AND fix confirmed is the exit status), so it is computed here from the observation,
never in the renderer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ctfix.core.decode import CtEntry
from ctfix.platform.icmp import Rejected


@dataclass(frozen=True, slots=True)
class ExchangeCheck:
    """A connected client asked `address:port`; did the right reply come back?"""

    client: tuple[str, int]
    address: str
    port: int
    want_reply: bool  # False: the bug, no reply expected
    reply_from: tuple[str, int] | None

    @property
    def ok(self) -> bool:
        if self.want_reply:
            return self.reply_from is not None and self.reply_from[0] == self.address
        return self.reply_from is None


@dataclass(frozen=True, slots=True)
class ConntrackCheck:
    """The host's conntrack table for an unanswered exchange: the request, and the
    reply filed as a NEW flow from another address."""

    port: int
    server: str  # the address the client sent to
    request: CtEntry | None
    reply: CtEntry | None

    @property
    def ok(self) -> bool:
        return (
            self.request is not None
            and self.reply is not None
            and self.reply.orig.src != self.server
        )


@dataclass(frozen=True, slots=True)
class IcmpCheck:
    """The client's ICMP port unreachable about the reply it did not expect."""

    server: str
    sender: str | None  # who sent the ICMP (None: none seen)
    rejected: Rejected | None  # the reply it quotes

    @property
    def ok(self) -> bool:
        return self.rejected is not None and self.rejected.src != self.server


@dataclass(frozen=True, slots=True)
class ServiceCheck:
    """A pod (or a direct client) asked `address:port`: a reply from exactly that
    address AND port, or none (the failure)? Behind a DNAT the port counts too."""

    client: tuple[str, int]
    address: str
    port: int
    want_reply: bool
    reply_from: tuple[str, int] | None
    direct: bool = False  # a client of the node's own address, not of the ClusterIP
    again: bool = False  # after the revert: the failure back

    @property
    def ok(self) -> bool:
        if self.want_reply:
            return self.reply_from == (self.address, self.port)
        return self.reply_from is None


@dataclass(frozen=True, slots=True)
class ExplainCheck:
    """`ctfix explain PORT --json`: broken, every DNAT'd service named, snat-zone
    recommended."""

    port: int
    verdict: str | None  # None: no answer
    named: tuple[str, ...]  # forwarded_from services
    wanted: tuple[str, ...]
    recommended: tuple[str, ...]
    reasons: tuple[str, ...]  # the texts of the reasons about them

    @property
    def ok(self) -> bool:
        return (
            self.verdict == "broken"
            and set(self.wanted) <= set(self.named)
            and "snat-zone" in self.recommended
        )


@dataclass(frozen=True, slots=True)
class ApplyCheck:
    """`ctfix fix PORT --method snat-zone --apply`: applied, covering `wanted`."""

    port: int
    returncode: int
    covers: tuple[str, ...]
    wanted: tuple[str, ...]
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and set(self.wanted) <= set(self.covers)


@dataclass(frozen=True, slots=True)
class StatusCheck:
    """`ctfix fix --status`: whole, and no wrong-source reply since the apply."""

    returncode: int
    fix_ok: bool
    verdict: str  # the effect's verdict ("unreadable" when there was no answer)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.fix_ok


@dataclass(frozen=True, slots=True)
class RevertCheck:
    """`ctfix fix --revert PORT`: the ruleset exactly as before the fix."""

    port: int
    returncode: int
    same: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.same


# -- the stale-nat story (ctfix.lab.stale_nat) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryCheck:
    """How many of the sender's datagrams a backend got (the black hole: none)."""

    backend: Literal["A", "B"]
    address: str  # addr:port
    received: int
    want: bool  # False: the black hole, nothing expected
    waited: float  # seconds the lab listened

    @property
    def ok(self) -> bool:
        return (self.received > 0) == self.want


@dataclass(frozen=True, slots=True)
class EntryCheck:
    """Where conntrack sends the sender: each of its entries' reply source."""

    client: str
    service: str
    targets: tuple[str, ...]
    want: str
    pinned: bool  # True: the old entry that never expires; False: the one after the flush

    @property
    def ok(self) -> bool:
        return self.want in self.targets


@dataclass(frozen=True, slots=True)
class StaleFindingCheck:
    """What `ctfix explain PORT --json` said about the port's stale entries."""

    port: int
    verdict: str | None  # None: explain did not answer (`error`)
    stale_target: str | None
    current: tuple[str, ...]
    clients: int
    want_stale: str
    want_current: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.verdict == "broken"
            and self.stale_target == self.want_stale
            and self.want_current in self.current
        )


@dataclass(frozen=True, slots=True)
class FlushCheck:
    """What `ctfix fix PORT --method flush-stale --apply` deleted, and whether the rest
    of the table stayed."""

    port: int
    deleted: int
    others: int  # the other entries of the table before
    kept: bool  # all of them still there after
    checks: tuple[str, ...]  # the fix's own words about the clients' next entries
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.deleted == 1 and self.kept


Check = (
    ExchangeCheck
    | ConntrackCheck
    | IcmpCheck
    | ServiceCheck
    | ExplainCheck
    | ApplyCheck
    | StatusCheck
    | RevertCheck
    | DeliveryCheck
    | EntryCheck
    | StaleFindingCheck
    | FlushCheck
)


@dataclass
class Section:
    """One part of the story: for the wrong-source story, the broken twin or the
    reference server; other scenarios name theirs by `kind` (ctfix.render.lab)."""

    broken: bool
    pid: int
    checks: list[Check] = field(default_factory=list)
    kind: str = ""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass
class Story:
    """What the lab found: the bug section(s) and the fix section(s)."""

    port: int
    bug: list[Section] = field(default_factory=list)
    fix: list[Section] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        return bool(self.bug) and all(s.ok for s in self.bug)

    @property
    def fixed(self) -> bool:
        return bool(self.fix) and all(s.ok for s in self.fix)
