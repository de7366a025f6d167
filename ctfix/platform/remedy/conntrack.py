"""The flush-stale remedy: delete exactly the stale conntrack entries a plan names,
then watch where the clients' next entries go.

Each entry is deleted by its original tuple, zone and id (IPCTNL_MSG_CT_DELETE,
ctfix.platform.conntrack.delete): an entry that expired meanwhile, or whose tuple now
belongs to a newer entry (another id), is left alone and counted as already gone.

Know before changing: nothing here is recorded in the state file and nothing can be
undone: `remove` refuses, and `present` means "the change holds" (the entry with that
id is no longer in the table). The check after the apply is an observation with a
stated wait (`CHECK_WAIT`): a client that sends nothing within it is reported as not
checked, never as fixed.
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
    """The step's change holds: no entry with that tuple and id is in the table."""
    from ctfix.platform import conntrack

    family = socket.AF_INET6 if spec.family == "ipv6" else socket.AF_INET
    return not any(
        e.id == spec.id and _same_client(e, spec)
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
class Flushed:
    deleted: int  # entries deleted
    gone: int  # entries already gone (expired, or their tuple taken by a newer entry)
    checks: tuple[str, ...]  # what the clients' next entries did, one line each
    problems: tuple[str, ...]  # clients whose next entry still does not follow the rules


def flush(plan: Plan, wait: float = CHECK_WAIT) -> Flushed:
    """Delete the plan's entries, then check the clients' next entries (module doc)."""
    from ctfix.platform import conntrack

    specs = [s.spec for s in plan.steps if isinstance(s.spec, ConntrackEntrySpec)]
    if len(specs) != len(plan.steps):
        raise CtfixError("a flush-stale plan holds a step that is not a conntrack entry")
    result = conntrack.delete([entry_of(spec) for spec in specs])
    deleted_ids = {(e.orig, e.id) for e in result.deleted}
    removed = [s for s in specs if (entry_of(s).orig, s.id) in deleted_ids]
    checks, problems = _check_next(removed, wait)
    return Flushed(len(result.deleted), len(result.gone), tuple(checks), tuple(problems))


def _check_next(
    specs: Sequence[ConntrackEntrySpec], wait: float
) -> tuple[list[str], list[str]]:
    """For each deleted entry's client: where its next entry goes, by dump, within
    `wait` seconds."""
    from ctfix.platform import conntrack

    waiting = {(s.src, s.sport, s.dst, s.dport, s.zone): s for s in specs}
    checks: list[str] = []
    problems: list[str] = []
    deadline = time.monotonic() + wait
    while waiting:
        for family, port in sorted({(s.family, s.dport) for s in waiting.values()}):
            af = socket.AF_INET6 if family == "ipv6" else socket.AF_INET
            for entry in conntrack.dump(family=af, port=port):
                orig = entry.orig
                spec = waiting.get((orig.src, orig.sport, orig.dst, orig.dport, entry.zone))
                if spec is None or entry.id == spec.id:
                    continue
                del waiting[(orig.src, orig.sport, orig.dst, orig.dport, entry.zone)]
                went = endpoint(entry.reply.src, entry.reply.sport)
                client = endpoint(spec.src, spec.sport)
                service = endpoint(spec.dst, spec.dport)
                if went in spec.current:
                    checks.append(
                        f"{client}'s next datagram to {service} made a new entry to {went}, "
                        "as the rules say"
                    )
                else:
                    problems.append(
                        f"{client}'s next datagram to {service} made a new entry to {went}, "
                        f"not to {', '.join(spec.current) or 'its own address'}: the rules "
                        "may be more than ctfix reads (`ctfix explain "
                        f"{spec.dport}`)"
                    )
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    for spec in waiting.values():
        checks.append(
            f"{endpoint(spec.src, spec.sport)} sent nothing to {endpoint(spec.dst, spec.dport)} "
            f"within {wait:g} s: its next entry was not checked"
        )
    return checks, problems
