"""`ctfix fix`: print, apply, revert or show a reversible remediation for a UDP port.

Without --apply nothing changes: the plan (every object, the equivalent commands) is
printed. --apply applies all of it or none and checks it; --revert removes exactly
what the state file records; --status shows the record against the kernel.

Know before changing: module level imports only the standard library and light
ctfix modules (`ctfix --help` must stay fast); the planner is pure
(ctfix/core/plan.py) and every kernel change goes through ctfix/platform/remedy.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ctfix.commands.common import add_netns_argument, enter_netns, port_number, require_root
from ctfix.core.model import Diagnosis
from ctfix.errors import CtfixError, ExitStatus

METHODS = ("policy-route", "snat-zone", "bind")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        "ctfix fix PORT --method policy-route|snat-zone|bind [--apply] [--force] "
        "[--backend nft|iptables-legacy] [--netns NS] [--json]\n"
        "       ctfix fix --revert [PORT] [--netns NS]\n"
        "       ctfix fix --status [--netns NS] [--json]"
    )
    parser.add_argument("port", nargs="?", type=port_number, metavar="PORT", help="UDP port")
    parser.add_argument(
        "--method",
        choices=METHODS,
        help="policy-route: a route per client network with the right source (only when "
        "each network addresses one local address); snat-zone: remember each client and "
        "rewrite the replies' source in a conntrack zone of their own (mixed addressing, "
        "unmodified server); bind: change nothing, say how to fix the application",
    )
    parser.add_argument("--apply", action="store_true", help="apply the plan (default: print it)")
    parser.add_argument("--revert", action="store_true", help="remove what ctfix fix made")
    parser.add_argument("--status", action="store_true", help="show what ctfix fix made")
    parser.add_argument(
        "--force",
        action="store_true",
        help="plan even when the port has no socket and no evidence",
    )
    parser.add_argument(
        "--backend",
        choices=("nft", "iptables-legacy"),
        help="netfilter backend for snat-zone (default: the one the namespace uses)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_netns_argument(parser)


def run(args: argparse.Namespace) -> int:
    modes = [m for m in ("apply", "revert", "status") if getattr(args, m)]
    if len(modes) > 1:
        raise CtfixError(f"--{modes[0]} and --{modes[1]} do not go together")
    if args.status:
        return _status(args)
    if args.revert:
        return _revert(args)
    if args.port is None:
        raise CtfixError("which port?", "ctfix fix PORT --method ...")
    if args.method is None:
        raise CtfixError("--method is required", f"one of {', '.join(METHODS)}")
    if args.apply:
        require_root("ctfix fix --apply")
    label = enter_netns(args.netns)
    from ctfix.core.plan import make_plan

    if args.apply and _already_applied(args, label):
        return ExitStatus.OK
    diagnosis = _diagnose(args.port, label)
    notes: list[str] = []
    backend = "nftables"
    if args.method == "snat-zone":
        from ctfix.platform import remedy

        override = {"nft": "nftables"}.get(args.backend or "", args.backend)
        backend, why = remedy.choose_backend(override)
        notes.append(f"backend {backend}: {why}")
    advice = _bind_advice(diagnosis) if args.method == "bind" else ()
    plan = make_plan(
        diagnosis,
        args.method,
        backend,  # type: ignore[arg-type]
        force=args.force,
        notes=tuple(notes),
        advice=advice,
    )
    if not args.apply or plan.method == "bind":
        _print_plan(plan, label, args.json, applied=False)
        return ExitStatus.OK
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState

    state = FixState.load(label)
    result = remedy.apply_plan(plan, state, remedy.verify_plan)
    if args.json:
        from ctfix.core.plan import plan_to_dict

        out = {
            "netns": label,
            "applied": not result.already,
            "already_applied": result.already,
            "checks": list(result.checks),
            "notes": list(result.notes),
            "plan": plan_to_dict(plan),
        }
        print(json.dumps(out, indent=2))
        return ExitStatus.OK
    if result.already:
        print(f"ctfix fix {plan.port}: already applied ({plan.method}); nothing changed")
    else:
        print(f"ctfix fix {plan.port}: applied {plan.method} ({len(plan.steps)} step(s)) in "
              f"netns {label}")
    for line in result.checks:
        print(f"  checked: {line}")
    for note in result.notes:
        print(f"  note: {note}")
    print(f"  undo with: ctfix fix --revert {plan.port}{_netns_flag(args)}")
    return ExitStatus.OK


def _already_applied(args: argparse.Namespace, label: str) -> bool:
    """Same port, same method already recorded and whole: say so, change nothing.

    Checked before diagnosing again: once the fix works, the evidence changes (e.g.
    clients that now get replies), and a fresh plan must not turn a no-op into a
    refusal or a second fix.
    """
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState

    fix = FixState.load(label).fixes.get(args.port)
    if fix is None or not fix.complete or fix.method != args.method:
        return False
    missing = [r.step for r in fix.steps if not remedy.present(r.step.spec)]
    if missing:
        raise CtfixError(
            f"the recorded {fix.method} fix for port {args.port} is no longer whole in the "
            f"kernel ({missing[0].summary}: missing)",
            f"run `ctfix fix --revert {args.port}` and apply again",
        )
    if args.json:
        print(json.dumps({"netns": label, "applied": False, "already_applied": True,
                          "method": fix.method, "backend": fix.backend}, indent=2))
    else:
        print(f"ctfix fix {args.port}: already applied ({fix.method} via {fix.backend}); "
              "nothing changed")
    return True


def _netns_flag(args: argparse.Namespace) -> str:
    return f" --netns {args.netns}" if args.netns else ""


# -- output ---------------------------------------------------------------------------


def _print_plan(plan: Any, label: str, as_json: bool, applied: bool) -> None:
    from ctfix.core.plan import plan_to_dict

    if as_json:
        print(json.dumps({"netns": label, "applied": applied, "plan": plan_to_dict(plan)},
                         indent=2))
        return
    out = sys.stdout
    if plan.method == "bind":
        out.write(f"ctfix fix {plan.port} --method bind: nothing to apply; fix the application\n")
        for line in plan.advice:
            out.write(f"  {line}\n")
        return
    out.write(
        f"ctfix fix {plan.port} --method {plan.method} (netns {label}): "
        f"{len(plan.steps)} step(s), dry run, nothing changed\n"
    )
    for note in plan.notes:
        out.write(f"  {note}\n")
    for number, step in enumerate(plan.steps, 1):
        out.write(f"\n{number}. {step.summary}\n")
        for obj in step.creates:
            out.write(f"   creates: {obj}\n")
        for command in step.commands:
            lines = command.splitlines()
            out.write(f"   $ {lines[0]}\n")
            for line in lines[1:]:
                out.write(f"     {line}\n")
        for command in step.undo:
            out.write(f"   undo: {command}\n")
    for check in plan.checks:
        out.write(f"\nafter apply, check: a reply to {check.destination} leaves from "
                  f"{check.source}\n")
    out.write(f"\napply with: ctfix fix {plan.port} --method {plan.method} --apply\n")


def _status(args: argparse.Namespace) -> int:
    label = enter_netns(args.netns)
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState

    state = FixState.load(label)
    report = remedy.status(state)
    if args.json:
        from ctfix.core.plan import step_to_dict

        print(json.dumps({
            "netns": label,
            "state_file": state.path,
            "fixes": [
                {
                    "port": fix.port,
                    "method": fix.method,
                    "backend": fix.backend,
                    "complete": fix.complete,
                    "started": fix.started,
                    "notes": fix.notes,
                    "steps": [
                        {"status": st, "present": here, "step": step_to_dict(step)}
                        for step, st, here in steps
                    ],
                }
                for fix, steps in report
            ],
        }, indent=2))
        return ExitStatus.OK
    if not report:
        print(f"ctfix fix --status: no fix recorded in netns {label}")
        return ExitStatus.OK
    print(f"ctfix fix --status (netns {label}, {state.path}):")
    for fix, steps in report:
        whole = fix.complete and all(here for _s, _st, here in steps)
        condition = "applied" if whole else (
            "INTERRUPTED apply: revert it" if not fix.complete else "DAMAGED: revert it"
        )
        print(f"  port {fix.port}: {fix.method} via {fix.backend}, {condition}")
        for step, st, here in steps:
            mark = "present" if here else "MISSING"
            print(f"    [{st:7}] {mark:7} {'; '.join(step.creates)}")
        for note in fix.notes:
            print(f"    note: {note}")
    return ExitStatus.OK


def _revert(args: argparse.Namespace) -> int:
    require_root("ctfix fix --revert")
    label = enter_netns(args.netns)
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState

    state = FixState.load(label)
    if args.port is None and not state.fixes:
        print(f"ctfix fix --revert: nothing recorded in netns {label}; nothing changed")
        return ExitStatus.OK
    lines = remedy.revert(state, args.port)
    what = f"port {args.port}" if args.port is not None else "every fix"
    print(f"ctfix fix --revert: removed {what} in netns {label}")
    for line in lines:
        print(f"  {line}")
    return ExitStatus.OK


# -- what the planner needs to know -----------------------------------------------------


def _bind_advice(diagnosis: Diagnosis) -> tuple[str, ...]:
    from ctfix.core.plan import PKTINFO_ADVICE

    lines: list[str] = []
    try:
        from ctfix.core import rules

        kb = rules.load()
        for listener in diagnosis.listeners or ():
            found = kb.match(listener.process, listener.cmdline, diagnosis.port)
            if found is None:
                continue
            rule = found.rule
            likely = "probably " if found.port_only else ""
            lines.append(f"{listener.process or 'the service'} is {likely}{rule.name}: {rule.fix}")
            if rule.snippet:
                lines.extend(f"    {line}" for line in rule.snippet.rstrip().splitlines())
            if rule.reference:
                lines.append(f"    see {rule.reference}")
            break
    except CtfixError as err:
        lines.append(f"(the knowledge base could not be read: {err.one_line()})")
    return (*lines, *PKTINFO_ADVICE)


def _diagnose(port: int, label: str) -> Diagnosis:
    """explain's diagnosis of the port, in the namespace the process has entered."""
    from ctfix.core import rules
    from ctfix.core.diagnose import diagnose
    from ctfix.platform import snapshot

    try:
        kb: rules.KnowledgeBase | None = rules.load()
    except CtfixError:
        kb = None  # the fix does not depend on recognising the program
    return diagnose(snapshot.collect(port, label), kb)
