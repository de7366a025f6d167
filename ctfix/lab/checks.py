"""What the lab's story found, as data: each check holds what was observed, and
says whether it is what an engineer expects; ctfix.render.lab puts it in words.

Know before changing: a check's `ok` is the lab's verdict material (bug reproduced
AND fix confirmed is the exit status), so it is computed here from the observation,
never in the renderer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


Check = ExchangeCheck | ConntrackCheck | IcmpCheck


@dataclass
class Section:
    """One server's half of the story: the broken twin or the reference server."""

    broken: bool
    pid: int
    checks: list[Check] = field(default_factory=list)

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
