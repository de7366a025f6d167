"""The flush-stale remedy: delete exactly the stale conntrack entries a plan names,
then watch where the clients' next entries go.

Each entry is deleted by its original tuple, zone and id (IPCTNL_MSG_CT_DELETE,
ctfix.platform.conntrack.delete): an entry that expired meanwhile, or whose tuple now
belongs to a newer entry (another id), is left alone and counted as already gone.

Know before changing: nothing here is recorded in the state file and nothing can be
undone: `remove` refuses, and `present` means "the change holds" (the entry with that
id is no longer in the table). The check after the apply is an observation with a
stated wait (`CHECK_WAIT`): a client that sends nothing within it is reported as not
checked, never as fixed (ctfix.render.fix says it in words).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ctfix.core.addr import endpoint
from ctfix.core.decode import CtEntry, CtTuple
from ctfix.core.plan import ConntrackEntrySpec, Plan
from ctfix.errors import CtfixError

#: how long the check after the apply waits for each client's next datagram, seconds
CHECK_WAIT = 5.0
_POLL = 0.2


def entry_of(spec: ConntrackEntrySpec) -> CtEntry:
    family = socket.AF_INET6 if spec.family == "ipv6" else socket.AF_INET
    orig = CtTuple(spec.src, spec.dst, spec.sport, spec.dport, socket.IPPROTO_UDP, family)
    reply = CtTuple(spec.reply_src, spec.src, spec.reply_sport, spec.sport,
                    socket.IPPROTO_UDP, family)
    return CtEntry(orig, reply, zone=spec.zone, id=spec.id)


def delete_entry(spec: ConntrackEntrySpec) -> None:
    """The registry's `create`: the step's change is the entry's absence."""
    from ctfix.platform import conntrack

    conntrack.delete([entry_of(spec)])


def cannot_undo(spec: ConntrackEntrySpec) -> bool:
    raise CtfixError(
        f"a deleted conntrack entry ({endpoint(spec.src, spec.sport)} -> "
        f"{endpoint(spec.dst, spec.dport)}) cannot be put back, and needs not be: "
        "nothing to revert"
    )


def entry_gone(spec: ConntrackEntrySpec) -> bool:
    """The step's change holds: the client's tuple is not sent to the stale target any
    more (no entry, or a newer one that goes elsewhere)."""
    from ctfix.platform import conntrack

    family = socket.AF_INET6 if spec.family == "ipv6" else socket.AF_INET
    stale = (spec.reply_src, spec.reply_sport)
    return not any(
        _same_client(e, spec) and (e.reply.src, e.reply.sport) == stale
        for e in conntrack.dump(family=family, port=spec.dport)
    )


def no_clash(spec: ConntrackEntrySpec) -> str | None:
    del spec
    return None


def _same_client(entry: CtEntry, spec: ConntrackEntrySpec) -> bool:
    orig = entry.orig
    return (orig.src, orig.sport, orig.dst, orig.dport) == (
        spec.src, spec.sport, spec.dst, spec.dport
    ) and entry.zone == spec.zone


@dataclass(frozen=True, slots=True)
class NextEntry:
    """Where a flushed client's next entry went (within the wait), by dump."""

    client: str
    service: str
    target: str | None  # None: the client sent nothing within the wait
    current: tuple[str, ...]  # where the rules said it would go

    @property
    def follows_rules(self) -> bool | None:
        """True: it went where the rules say; None: not seen (not checked)."""
        return None if self.target is None else self.target in self.current


@dataclass(frozen=True, slots=True)
class Flushed:
    deleted: int  # entries deleted
    gone: int  # entries already gone (expired, or their tuple taken by a newer entry)
    next: tuple[NextEntry, ...]  # each deleted client's next entry
    waited: float  # how long the check waited for them, seconds

    @property
    def problems(self) -> tuple[NextEntry, ...]:
        return tuple(n for n in self.next if n.follows_rules is False)


def flush(plan: Plan, wait: float = CHECK_WAIT) -> Flushed:
    """Delete the plan's entries, then check the clients' next entries (module doc)."""
    from ctfix.platform import conntrack

    specs = [s.spec for s in plan.steps if isinstance(s.spec, ConntrackEntrySpec)]
    if len(specs) != len(plan.steps):
        raise CtfixError("a flush-stale plan holds a step that is not a conntrack entry")
    result = conntrack.delete([entry_of(spec) for spec in specs])
    deleted_ids = {(e.orig, e.id) for e in result.deleted}
    removed = [s for s in specs if (entry_of(s).orig, s.id) in deleted_ids]
    return Flushed(len(result.deleted), len(result.gone), _next_entries(removed, wait), wait)


def _next_entries(specs: Sequence[ConntrackEntrySpec], wait: float) -> tuple[NextEntry, ...]:
    """For each deleted entry's client: where its next entry goes, by dump, within
    `wait` seconds."""
    from ctfix.platform import conntrack

    waiting = {(s.src, s.sport, s.dst, s.dport, s.zone): s for s in specs}
    found: list[NextEntry] = []
    deadline = time.monotonic() + wait
    while waiting:
        for family, port in sorted({(s.family, s.dport) for s in waiting.values()}):
            af = socket.AF_INET6 if family == "ipv6" else socket.AF_INET
            for entry in conntrack.dump(family=af, port=port):
                orig = entry.orig
                key = (orig.src, orig.sport, orig.dst, orig.dport, entry.zone)
                # Deleted (acknowledged) before this dump: any entry with the client's
                # tuple is its next one, whatever its id (the kernel may reuse it).
                spec = waiting.pop(key, None)
                if spec is not None:
                    found.append(_next(spec, endpoint(entry.reply.src, entry.reply.sport)))
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    found += [_next(spec, None) for spec in waiting.values()]
    return tuple(found)


def _next(spec: ConntrackEntrySpec, target: str | None) -> NextEntry:
    return NextEntry(
        endpoint(spec.src, spec.sport), endpoint(spec.dst, spec.dport), target, spec.current
    )
