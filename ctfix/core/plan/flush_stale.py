"""The flush-stale method: delete exactly the port's stale NAT entries. Pure.

One step per entry the diagnosis judged stale (ctfix.core.detectors.stale_nat): its
original tuple, zone and id, the target it still sends its client to, and the targets
the rules name now (what the check after the apply expects the client's next entry to
go to). Never a wide flush: a step names one entry, and the kernel deletes it only if
the entry under that tuple still has that id.

Know before changing: the plan is not reversible and is never recorded in the state
file (`Plan.reversible` False): deleting a stale entry only lets the client's next
datagram make a new entry the way the rules say now; there is nothing to put back.
It refuses, in one line, when the port has no stale entries.
"""

from __future__ import annotations

import shlex

from ctfix.core.detectors.stale_nat import StaleEntry, usage_words
from ctfix.core.model import Diagnosis
from ctfix.core.plan import Backend, Plan, PlanMethod
from ctfix.core.plan.specs import ConntrackEntrySpec, Step
from ctfix.errors import CtfixError

NOTHING_TO_REVERT = (
    "Nothing to revert, and nothing is recorded: deleting a stale entry only lets the "
    "client's next datagram make a new one, the way the rules say now."
)


def _why(one: StaleEntry) -> str:
    now = ", ".join(one.current) or "nowhere"
    if one.why == "never-natted":
        return f"never DNAT'd; the rules now send it to {now}"
    if one.why == "no-longer-forwarded":
        return "the port is no longer forwarded"
    return f"the rules now send it to {now}"


def _summary(one: StaleEntry) -> str:
    used = usage_words(one.age, one.idle, one.packets)
    ident = f"id {one.entry.id}" if one.entry.id is not None else "no id"
    return (
        f"delete the conntrack entry {one.client} -> {one.service} (to {one.target}; "
        f"{_why(one)}; {', '.join([*used, ident])})"
    )


def _command(one: StaleEntry) -> str:
    """The conntrack(8) command that deletes the same entry (it matches every field
    given, so it names exactly this one)."""
    orig, reply = one.entry.orig, one.entry.reply
    words = [
        "conntrack", "-D", "-f", "ipv6" if one.family == "ipv6" else "ipv4", "-p", "udp",
        "--orig-src", orig.src, "--orig-dst", orig.dst,
        "--orig-port-src", str(orig.sport), "--orig-port-dst", str(orig.dport),
        "--reply-src", reply.src, "--reply-port-src", str(reply.sport),
    ]
    if one.entry.zone:
        words += ["--zone", str(one.entry.zone)]
    return shlex.join(words)


def step_for(one: StaleEntry) -> Step:
    orig, reply = one.entry.orig, one.entry.reply
    spec = ConntrackEntrySpec(
        family=one.family,
        src=orig.src,
        dst=orig.dst,
        sport=orig.sport,
        dport=orig.dport,
        reply_src=reply.src,
        reply_sport=reply.sport,
        zone=one.entry.zone,
        id=one.entry.id,
        current=one.current,
    )
    return Step(spec=spec, summary=_summary(one), creates=(), commands=(_command(one),), undo=())


def build(
    diagnosis: Diagnosis,
    backend: Backend,
    *,
    force: bool,
    notes: tuple[str, ...],
    advice: tuple[str, ...],
    gateways: tuple[str, ...],
) -> Plan:
    del force, gateways  # nothing to force without stale entries; nothing to route
    port = diagnosis.port
    if not diagnosis.stale_entries:
        raise CtfixError(
            f"UDP port {port} has no stale NAT entries: nothing to flush",
            f"`ctfix explain {port}` shows what conntrack holds for the port",
        )
    steps = tuple(step_for(one) for one in diagnosis.stale_entries)
    clients = len({one.client for one in diagnosis.stale_entries})
    return Plan(
        port,
        "flush-stale",
        backend,
        steps,
        notes=(
            *notes,
            f"{len(steps)} stale entr{'ies' if len(steps) > 1 else 'y'} of {clients} "
            f"client{'s' if clients > 1 else ''}; every other entry of the table stays.",
            NOTHING_TO_REVERT,
        ),
        advice=advice,
        reversible=False,
    )


# It changes only the conntrack table, and its evidence is the stale entries themselves
# (checked by `build`), not a socket on the port: hence changes_host=False.
METHOD = PlanMethod("flush-stale", ("ctnetlink",), changes_host=False, build=build)
