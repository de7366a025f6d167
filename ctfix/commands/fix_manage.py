"""`ctfix fix --status` and `--revert`: what is recorded, judged against the kernel,
and removing exactly that (plus objects carrying ctfix's marks that no record explains).

Also the report helpers `ctfix fix` shares between its modes (fix.py imports them from
here, never the other way round).

Know before changing: module level imports only the standard library and light
ctfix modules (`ctfix --help` must stay fast); every kernel change goes through
ctfix/platform/remedy.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any

from ctfix.commands.common import enter_netns, require_root
from ctfix.core.model import Diagnosis, FixEffect
from ctfix.errors import CtfixError, ExitStatus

if TYPE_CHECKING:
    from ctfix.platform.remedy import Reverted
    from ctfix.platform.remedy.marks import Marked


def _write_json(document: dict[str, Any]) -> None:
    from ctfix.render.jsonout import write_document

    write_document(document, sys.stdout)



def _refuse_plan_options(args: argparse.Namespace) -> None:
    """--status and --revert act on what is recorded (PORT narrows them to one port):
    options that shape a plan would be ignored, so they are refused instead."""
    mode = "--status" if args.status else "--revert"
    given = [
        option
        for option, value in (
            ("--method", args.method),
            ("--force", args.force),
            ("--backend", args.backend),
            ("--rules", args.rules),
            ("--listen", args.revert and args.listen is not None),
        )
        if value
    ]
    if given:
        what = "shows what was recorded" if args.status else "removes what was recorded"
        raise CtfixError(f"{mode} {what}; {given[0]} does not go with it", f"drop {given[0]}")



def _write_text(text: str) -> None:
    """A report for people, made to fit a terminal's width (a pipe gets it as is)."""
    from ctfix.render.width import fit_lines, terminal_width

    width = terminal_width(sys.stdout)
    sys.stdout.write(fit_lines(text, width) if width else text)



def _netns_flag(args: argparse.Namespace) -> str:
    return f" --netns {args.netns}" if args.netns else ""



def _status(args: argparse.Namespace) -> int:
    label = enter_netns(args.netns)
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState
    from ctfix.platform.remedy import marks
    from ctfix.render import fix_status as render

    state = FixState.load(label)
    # Marked objects no record explains: judged against every record, shown for PORT.
    stray = marks.unrecorded(state.specs(), args.port)
    if args.port is not None:
        state = dataclasses.replace(
            state, fixes={p: fix for p, fix in state.fixes.items() if p == args.port}
        )
    # Effect, not presence: what the evidence since each fix says. First: conntrack
    # forgets a wrong-source reply nf_conntrack_udp_timeout after its last packet.
    now = time.time()
    effects = {
        port: _effect(port, label, args.listen or 0.0)
        for port, fix in state.fixes.items()
        if fix.complete
    }
    report = remedy.status(state)
    refused = remedy.foreign_steps(state)
    # A fix that is not whole is a problem to act on (revert it): say so in the status.
    only = "" if args.port is None else f" {args.port}"
    revert = f"ctfix fix --revert{only}{_netns_flag(args)}"
    complete = render.whole(report, refused)
    judged = {
        port: found
        for port, found in effects.items()
        if found is not None and complete.get(port)
    }
    working = all(complete.values()) and not any(map(render.failing, judged.values()))
    status = ExitStatus.OK if working and not stray else ExitStatus.PROBLEM
    if args.json:
        _write_json(
            render.status_document(report, label, state.path, revert, refused, stray, judged)
        )
    else:
        _write_text(
            render.status_text(
                report, label, state.path, revert, refused, stray, judged, now
            )
        )
    return status



def _effect(port: int, label: str, listen: float) -> FixEffect | str | None:
    """The recorded fix's effect from a fresh diagnosis of the port; a string says
    why there is none (no privilege to read conntrack, ...)."""
    try:
        return _diagnose(port, label, listen).fix_effect
    except CtfixError as err:
        return err.one_line()



def _revert(args: argparse.Namespace) -> int:
    require_root("ctfix fix --revert")
    label = enter_netns(args.netns)
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState
    from ctfix.platform.remedy import marks

    with FixState.locked(label) as state:
        refused = remedy.foreign_steps(state, args.port)
        if refused:
            # remedy.revert would refuse too; here the refusal can name the way out.
            from ctfix.render.fix_status import aside_hint

            (port, _index), why = next(iter(refused.items()))
            raise CtfixError(
                f"refusing to revert port {port}: {why}; nothing was removed",
                aside_hint(
                    state.path, f"ctfix fix --revert{_netns_flag(args)}",
                    sorted({p for p, _i in refused}),
                ),
            )
        # Objects with ctfix's marks that no record explains (the state file was lost
        # or edited) are ctfix's too: removed with the recorded ones, and listed apart.
        stray = marks.unrecorded(state.specs(), args.port)
        recorded = bool(state.fixes) if args.port is None else args.port in state.fixes
        done: list[Reverted] = remedy.revert(state, args.port) if recorded else []
        stray_removed, failures = marks.remove_all(stray)
        if failures:
            raise CtfixError(
                f"could not remove everything: {failures[0]}",
                "fix the cause and run --revert again",
            )
        # Reverting is safe to repeat: nothing recorded is the state it leads to, not an
        # error.
        nothing: str | None = None
        if not recorded and not stray_removed:
            nothing = f"nothing recorded in netns {label}"
            if args.port is not None:
                others = f" (recorded: ports {', '.join(map(str, sorted(state.fixes)))})" if (
                    state.fixes
                ) else ""
                nothing = f"nothing recorded for port {args.port} in netns {label}{others}"
    return _reverted(args, label, done, nothing, stray_removed)



def _reverted(
    args: argparse.Namespace,
    label: str,
    done: list[Reverted],
    nothing: str | None,
    stray: list[Marked],
) -> int:
    """--revert's report: `nothing` says why nothing was recorded (and so changed)."""
    from ctfix.render import fix_status as render

    if args.json:
        _write_json(render.reverted_document(done, label, nothing, stray))
    else:
        _write_text(render.reverted_text(done, args.port, label, nothing, stray))
    return ExitStatus.OK



def _diagnose(port: int, label: str, listen: float = 0.0) -> Diagnosis:
    """explain's diagnosis of the port, in the namespace the process has entered."""
    from ctfix.core import rules
    from ctfix.core.diagnosis import diagnose
    from ctfix.platform import rules_files, snapshot

    try:
        kb: rules.KnowledgeBase | None = rules_files.load()
    except CtfixError:
        kb = None  # the fix does not depend on recognising the program
    return diagnose(snapshot.collect(port, label, listen_seconds=listen), kb)

