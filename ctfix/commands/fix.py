"""`ctfix fix`: print, apply, revert or show a reversible remediation for a UDP port.

Without --apply nothing changes: the plan (every object, the equivalent commands) is
printed. --apply applies all of it or none and checks it; --revert removes exactly
what the state file records; --status shows the record against the kernel.

Know before changing: module level imports only the standard library and light
ctfix modules (`ctfix --help` must stay fast); the planner is pure
(ctfix/core/plan/, one module per method) and every kernel change goes through
ctfix/platform/remedy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ctfix.commands.common import (
    add_netns_argument,
    add_rules_argument,
    enter_netns,
    port_number,
    require_root,
)
from ctfix.core.model import Diagnosis
from ctfix.core.plan import METHODS
from ctfix.errors import CtfixError, ExitStatus

if TYPE_CHECKING:
    from ctfix.core.plan import Backend

EPILOG = """\
examples:
  ctfix fix 5000 --method snat-zone                  print the plan, change nothing
  ctfix fix 5000 --method snat-zone --apply          apply it (all or nothing)
  ctfix fix 5000 --method snat-zone --backend iptables-legacy --netns H --apply
  ctfix fix 5000 --method policy-route --apply --force
                         policy-route when you know no client in a network uses the
                         host's own address on its link (ctfix refuses otherwise)
  ctfix fix 5000 --method bind --rules ./my-rules    how to fix the application itself
  ctfix fix 5140 --method flush-stale                the stale NAT entries it would delete
  ctfix fix 5140 --method flush-stale --apply        delete exactly those (nothing to revert)
  ctfix fix --status                                 what ctfix fix made, against the kernel
  ctfix fix --revert 5000                            remove it (safe to repeat)

exit status:
  0    done (or a dry run; or nothing to revert)
  1    --status: a recorded fix is DAMAGED or INTERRUPTED (revert it);
       flush-stale: a client's next entry still does not go where the rules say
  2    refused or failed, nothing changed; bad input; missing privilege or feature
  128+N  stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP) during --apply:
       what was applied so far is rolled back
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        f"ctfix fix PORT --method {'|'.join(METHODS)} [--apply] [--force] "
        "[--backend nft|iptables-legacy] [--netns NS] [--json]\n"
        "       ctfix fix --revert [PORT] [--netns NS] [--json]\n"
        "       ctfix fix --status [--netns NS] [--json]"
    )
    parser.epilog = EPILOG
    parser.add_argument("port", nargs="?", type=port_number, metavar="PORT", help="UDP port")
    parser.add_argument(
        "--method",
        choices=METHODS,
        help="policy-route: a route per client network with the right source (only when "
        "each network addresses one local address); snat-zone: remember each client and "
        "rewrite the replies' source in a conntrack zone of their own (mixed addressing, "
        "unmodified server); bind: change nothing, say how to fix the application; "
        "flush-stale: delete exactly the port's stale NAT entries (clients pinned to a "
        "DNAT target the rules no longer name)",
    )
    parser.add_argument("--apply", action="store_true", help="apply the plan (default: print it)")
    parser.add_argument("--revert", action="store_true", help="remove what ctfix fix made")
    parser.add_argument("--status", action="store_true", help="show what ctfix fix made")
    parser.add_argument(
        "--force",
        action="store_true",
        help="plan even when the port has no socket and no evidence; policy-route even "
        "though clients that address the host's own address on their link (their gateway) "
        "would get no answer",
    )
    parser.add_argument(
        "--backend",
        choices=("nft", "iptables-legacy"),
        help="netfilter backend for snat-zone (default: the one the namespace uses)",
    )
    add_rules_argument(parser)
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
    if args.backend and args.method != "snat-zone":
        raise CtfixError(
            f"--backend is for snat-zone only; {args.method} uses "
            + {"policy-route": "iproute2 (ip rule/ip route)",
               "flush-stale": "ctnetlink (conntrack)"}.get(args.method, "nothing"),
            "drop --backend",
        )
    if args.rules and args.method != "bind":
        raise CtfixError("--rules is for --method bind only", "drop --rules")
    if args.method == "bind":
        if args.apply:
            raise CtfixError(
                "--method bind changes nothing on the host, so there is nothing to apply",
                f"run `ctfix fix {args.port} --method bind` and change the application",
            )
        return _bind(args)
    if args.apply:
        require_root("ctfix fix --apply")
    label = enter_netns(args.netns)
    from ctfix.core.plan import make_plan

    if args.apply and _already_applied(args, label):
        return ExitStatus.OK
    diagnosis = _diagnose(args.port, label)
    notes: list[str] = []
    backend: Backend | None = None
    if args.method == "snat-zone":
        from ctfix.platform import remedy

        overrides: dict[str, Backend] = {"nft": "nftables", "iptables-legacy": "iptables-legacy"}
        backend, why = remedy.choose_backend(overrides.get(args.backend or ""))
        notes.append(f"backend {backend}: {why}")
    plan = make_plan(diagnosis, args.method, backend, force=args.force, notes=tuple(notes))
    if not args.apply:
        _print_plan(plan, label, args.json, _apply_command(args))
        return ExitStatus.OK
    if not plan.reversible:  # flush-stale: nothing to record, nothing to revert
        from ctfix.commands.fix_flush import apply_unrecorded

        return apply_unrecorded(args, plan, label)
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState

    try:
        # Held from load to last save: another apply or revert in this namespace
        # would otherwise overwrite this one's record, or this one theirs.
        with FixState.locked(label) as state, _deferred_signals() as stop:
            result = remedy.apply_plan(plan, state, remedy.verify_plan, stop)
    except remedy.Interrupted as stopped:
        return _interrupted(args, stopped)
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
    for warning in plan.warnings:
        print(f"  warning: {warning}")
    for note in result.notes:
        print(f"  note: {note}")
    print(f"  undo with: ctfix fix --revert {plan.port}{_netns_flag(args)}")
    return ExitStatus.OK


@contextlib.contextmanager
def _deferred_signals() -> Iterator[Any]:
    """Ctrl-C, SIGTERM and SIGHUP only record themselves while a fix is applied.

    apply_plan asks between steps and rolls back; a handler that raised inside a step
    (Python's default for SIGINT) or a default that kills (SIGTERM, SIGHUP) would leave
    the fix half-applied. The first signal counts; later ones are absorbed so they
    cannot cut the rollback short.
    """
    caught: list[int] = []

    def record(signum: int, _frame: object) -> None:
        caught.append(signum)

    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, record) for signum in wanted}
    try:
        yield lambda: caught[0] if caught else None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupted(args: argparse.Namespace, stopped: Any) -> int:
    name = signal.Signals(stopped.signum).name
    if stopped.failures:
        print(
            f"ctfix fix {args.port}: interrupted ({name}); rollback incomplete: "
            f"{stopped.failures[0]}; run `ctfix fix --revert {args.port}{_netns_flag(args)}`",
            file=sys.stderr,
        )
    else:
        print(
            f"ctfix fix {args.port}: interrupted ({name}); rolled back "
            f"{len(stopped.removed)} step(s) already made, nothing changed",
            file=sys.stderr,
        )
    return 128 + int(stopped.signum)


def _apply_command(args: argparse.Namespace) -> str:
    """The dry run's last line: the same command with --apply, every option kept."""
    words = ["ctfix", "fix", str(args.port), "--method", args.method]
    if args.backend:
        words += ["--backend", args.backend]
    if args.force:
        words.append("--force")
    if args.netns:
        words += ["--netns", args.netns]
    words.append("--apply")
    import shlex

    return shlex.join(words)


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


def _print_plan(plan: Any, label: str, as_json: bool, apply_with: str | None) -> None:
    from ctfix.core.plan import plan_to_dict

    if as_json:
        print(json.dumps({"netns": label, "applied": False, "plan": plan_to_dict(plan)},
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
    for warning in plan.warnings:
        out.write(f"  warning: {warning}\n")
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
    if apply_with:
        out.write(f"\napply with: {apply_with}\n")


def _status(args: argparse.Namespace) -> int:
    label = enter_netns(args.netns)
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState

    state = FixState.load(label)
    report = remedy.status(state)
    # A fix that is not whole is a problem to act on (revert it): say so in the status.
    whole = {
        fix.port: fix.complete and all(here for _s, _st, here in steps) for fix, steps in report
    }
    status = ExitStatus.OK if all(whole.values()) else ExitStatus.PROBLEM
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
                    "whole": whole[fix.port],
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
        return status
    if not report:
        print(f"ctfix fix --status: no fix recorded in netns {label}")
        return ExitStatus.OK
    print(f"ctfix fix --status (netns {label}, {state.path}):")
    for fix, steps in report:
        condition = "applied" if whole[fix.port] else (
            "INTERRUPTED apply: revert it" if not fix.complete else "DAMAGED: revert it"
        )
        print(f"  port {fix.port}: {fix.method} via {fix.backend}, {condition}")
        for step, st, here in steps:
            mark = "present" if here else "MISSING"
            first, *rest = step.creates or ("(nothing)",)
            print(f"    [{st:7}] {mark:7} {first}")
            for obj in rest:  # one object per line: an nftables table lists its parts
                print(f"    {'':9} {'':7} {obj}")
        for note in fix.notes:
            print(f"    note: {note}")
    if status != ExitStatus.OK:
        print(f"  revert with: ctfix fix --revert{_netns_flag(args)}")
    return status


def _revert(args: argparse.Namespace) -> int:
    require_root("ctfix fix --revert")
    label = enter_netns(args.netns)
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState

    with FixState.locked(label) as state:
        # Reverting is safe to repeat: nothing recorded is the state it leads to, not an
        # error.
        if args.port is None and not state.fixes:
            nothing: str | None = f"nothing recorded in netns {label}"
        elif args.port is not None and args.port not in state.fixes:
            others = f" (recorded: ports {', '.join(map(str, sorted(state.fixes)))})" if (
                state.fixes
            ) else ""
            nothing = f"nothing recorded for port {args.port} in netns {label}{others}"
        else:
            done = remedy.revert(state, args.port)
            nothing = None
    return _reverted(args, label, [] if nothing is not None else done, nothing)


def _reverted(args: argparse.Namespace, label: str, done: list[Any], nothing: str | None) -> int:
    """--revert's report: `nothing` says why nothing was recorded (and so changed)."""
    from dataclasses import asdict

    from ctfix.platform import remedy

    if args.json:
        print(json.dumps({
            "netns": label,
            "changed": bool(done),
            "reason": nothing,
            "reverted": [asdict(fix) for fix in done],
        }, indent=2))
        return ExitStatus.OK
    if nothing is not None:
        print(f"ctfix fix --revert: {nothing}; nothing changed")
        return ExitStatus.OK
    what = f"port {args.port}" if args.port is not None else "every fix"
    print(f"ctfix fix --revert: removed {what} in netns {label}")
    for line in remedy.reverted_lines(done):
        print(f"  {line}")
    return ExitStatus.OK


# -- what the planner needs to know -----------------------------------------------------


def _bind(args: argparse.Namespace) -> int:
    """--method bind: advice only. Needs no privilege beyond what `--netns` needs: it
    reads the port's sockets (sock_diag) and the knowledge base, never conntrack,
    routes or netfilter."""
    from ctfix.core import rules
    from ctfix.core.plan import make_plan

    kb = rules.load(args.rules, builtin=True)  # a broken --rules file fails first
    label = enter_netns(args.netns)
    from ctfix.platform import sockdiag

    listeners = tuple(listener for listener, _uid in sockdiag.listeners(args.port))
    diagnosis = Diagnosis(args.port, label, "at-risk", (), listeners=listeners)
    plan = make_plan(diagnosis, "bind", advice=_bind_advice(diagnosis, kb))
    _print_plan(plan, label, args.json, None)
    return ExitStatus.OK


def _bind_advice(diagnosis: Diagnosis, kb: Any) -> tuple[str, ...]:
    from ctfix.core.plan.bind import pktinfo_advice

    port = diagnosis.port
    lines: list[str] = []
    for listener in diagnosis.listeners:
        found = kb.match(listener.process, listener.cmdline, port, exe=listener.exe)
        if found is None:
            continue
        rule = found.rule
        if found.port_only:
            if listener.pid is None:
                continue  # owner not visible: the note below says why nothing matched
            lines.append(
                f"(port {port} is the default port of {rule.name}, but "
                f"{listener.process or 'the process'} was not recognised as it: a guess from "
                "the port, so that entry's advice is not given)"
            )
            break
        lines.append(
            f"{listener.process or 'the service'} is {rule.name}: {rule.fix}{rule.upgrade_advice()}"
        )
        if rule.snippet:
            lines.extend(f"    {line}" for line in rule.snippet.rstrip().splitlines())
        if rule.reference:
            lines.append(f"    see {rule.reference}")
        break
    if not lines and diagnosis.listeners and all(lst.pid is None for lst in diagnosis.listeners):
        lines.append(
            f"(the process on UDP port {port} is not visible to this user, so it was not "
            "matched against the knowledge base: run as root to see which program it is)"
        )
    elif not diagnosis.listeners:
        lines.append(f"(no UDP socket on port {port} now: the advice below is generic)")
    return (*lines, *pktinfo_advice(port))


def _diagnose(port: int, label: str) -> Diagnosis:
    """explain's diagnosis of the port, in the namespace the process has entered."""
    from ctfix.core import rules
    from ctfix.core.diagnosis import diagnose
    from ctfix.platform import snapshot

    try:
        kb: rules.KnowledgeBase | None = rules.load()
    except CtfixError:
        kb = None  # the fix does not depend on recognising the program
    return diagnose(snapshot.collect(port, label), kb)
