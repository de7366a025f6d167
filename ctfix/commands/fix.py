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
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ctfix.commands.common import (
    add_netns_argument,
    add_rules_argument,
    enter_netns,
    port_number,
    require_root,
    seconds_or_zero,
)
from ctfix.commands.fix_manage import (
    _diagnose,
    _effect,
    _netns_flag,
    _refuse_plan_options,
    _revert,
    _status,
    _write_json,
    _write_text,
)
from ctfix.core.model import Diagnosis
from ctfix.core.plan import METHODS
from ctfix.errors import CtfixError, ExitStatus

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ctfix.core.model import ForwardedService
    from ctfix.core.plan import Backend, Plan
    from ctfix.core.rules import KnowledgeBase
    from ctfix.core.snippet import SnippetValues

EPILOG = """\
examples:
  ctfix fix 5000 --method snat-zone            print the plan, change nothing
  ctfix fix 5000 --method snat-zone --apply    apply it (all or nothing)
  ctfix fix 5000 --method snat-zone --backend iptables-legacy --apply
  ctfix fix 5000 --method policy-route --apply --force
        policy-route when you know no client in a network uses another of the
        host's addresses (ctfix refuses otherwise)
  ctfix fix 5000 --method snat-zone --gateway 192.0.2.1 --apply
        two uplinks: replies to clients of the uplink whose router is 192.0.2.1
        leave by it (where the host's routes do not say)
  ctfix fix 5000 --method bind --rules ./my-rules
        how to fix the application itself
  ctfix fix 5140 --method flush-stale          the stale NAT entries it would delete
  ctfix fix 5140 --method flush-stale --apply  delete exactly those (no revert)
  ctfix fix --status                           what ctfix fix made, by the kernel
  ctfix fix --status 5000                      the same, for port 5000 only
  ctfix fix --revert 5000                      remove it (safe to repeat)

--revert removes only objects that carry ctfix's marks for the port; a record that
names anything else is refused. Marked objects that no record explains (a lost
state file) are shown by --status and removed by --revert too, listed apart.

After --apply, fix listens to conntrack for --listen S seconds (default 3) for
wrong-source replies on the port: rules in the kernel prove that they exist, not that
they work. --status judges each fix by the evidence since it was applied (conntrack
dates each wrong-source reply; --listen S watches live events too) and names the
services a DNAT forwards to the port that a snat-zone fix does not cover.

exit status:
  0    done (or a dry run; or nothing to revert)
  1    --apply: applied, but wrong-source replies went on while it listened
       (INEFFECTIVE; it stays applied: revert it or look at `ctfix explain PORT`);
       or already applied, but INEFFECTIVE, or it does NOT COVER a service DNAT'd
       to the port since (nothing changed: revert, then apply again)
  1    --status: a recorded fix is DAMAGED or INTERRUPTED, or ctfix-marked objects
       no record explains are in the kernel (revert it); or a fix is INEFFECTIVE
       (wrong-source replies since it was applied) or does NOT COVER a service
       DNAT'd to the port since;
       flush-stale: a client's next entry still does not go where the rules say
  2    refused or failed, nothing changed; bad input; missing privilege or feature
  128+N  stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP) during --apply:
       what was applied so far is rolled back
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        f"ctfix fix PORT --method {'|'.join(METHODS)} [--apply [--listen S]] [--force] "
        "[--backend nft|iptables-legacy] [--gateway ADDR]... [--netns NS] [--json]\n"
        "       ctfix fix --revert [PORT] [--netns NS] [--json]\n"
        "       ctfix fix --status [PORT] [--listen S] [--netns NS] [--json]"
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
    parser.add_argument(
        "--revert",
        action="store_true",
        help="remove what ctfix fix made (recorded, or found by its marks)",
    )
    parser.add_argument(
        "--status", action="store_true", help="show what ctfix fix made (for PORT, or every port)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="plan even when the port has no socket and no evidence; policy-route even "
        "though clients that may address another of the host's addresses (on their link: "
        "their gateway) would be answered from the routed one",
    )
    parser.add_argument(
        "--backend",
        choices=("nft", "iptables-legacy"),
        help="netfilter backend for snat-zone (default: the one the namespace uses)",
    )
    parser.add_argument(
        "--gateway",
        metavar="ADDR",
        action="append",
        default=[],
        help="two uplinks: the router of the uplink ADDR is on (ADDR%%IFACE for a "
        "link-local one), for replies that must leave by it when no route via it tells "
        "ctfix (repeat for several uplinks)",
    )
    add_rules_argument(parser)
    parser.add_argument(
        "--listen",
        metavar="S",
        type=seconds_or_zero,
        help="--apply: listen S seconds afterwards for wrong-source replies (default 3; 0: "
        "do not); --status: also watch live conntrack events for S seconds",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_netns_argument(parser)


def run(args: argparse.Namespace) -> int:
    modes = [m for m in ("apply", "revert", "status") if getattr(args, m)]
    if len(modes) > 1:
        raise CtfixError(f"--{modes[0]} and --{modes[1]} do not go together")
    if args.status or args.revert:
        _refuse_plan_options(args)
    if args.listen is not None and not (args.apply or args.status):
        raise CtfixError("--listen goes with --apply or --status", "drop --listen")
    if args.status:
        return _status(args)
    if args.revert:
        return _revert(args)
    if args.port is None:
        raise CtfixError(
            "no port given",
            "ctfix fix PORT --method METHOD (--status or --revert without PORT: every port)",
        )
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
    if args.gateway and args.method == "bind":
        raise CtfixError("--gateway is for snat-zone and policy-route", "drop --gateway")
    if args.method == "bind":
        if args.force:
            raise CtfixError(
                "--force is for policy-route and snat-zone; --method bind plans nothing",
                "drop --force",
            )
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

    already = _already_applied(args, label) if args.apply else None
    if already is not None:
        return already
    diagnosis = _diagnose(args.port, label)
    notes: list[str] = []
    backend: Backend | None = None
    if args.method == "snat-zone":
        from ctfix.platform import remedy

        overrides: dict[str, Backend] = {"nft": "nftables", "iptables-legacy": "iptables-legacy"}
        backend, why = remedy.choose_backend(overrides.get(args.backend or ""))
        notes.append(f"backend {backend}: {why}")
    plan = make_plan(
        diagnosis, args.method, backend, force=args.force, notes=tuple(notes),
        gateways=tuple(args.gateway),
    )
    from ctfix.render import fix as render

    if not args.apply:
        _write_plan(plan, label, args.json, _apply_command(args))
        return ExitStatus.OK
    if not plan.reversible:  # flush-stale: nothing to record, nothing to revert
        from ctfix.platform.remedy import conntrack as flush

        done = flush.flush(plan)
        if args.json:
            _write_json(render.flushed_document(plan, done, label))
        else:
            _write_text(render.flushed_text(plan, done, label))
        return ExitStatus.PROBLEM if done.problems else ExitStatus.OK
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState

    try:
        # Held from load to last save: another apply or revert in this namespace
        # would otherwise overwrite this one's record, or this one theirs.
        with FixState.locked(label) as state, _deferred_signals() as stop:
            result = remedy.apply_plan(plan, state, remedy.verify_plan, stop)
    except remedy.Interrupted as stopped:
        name = signal.Signals(stopped.signum).name
        revert = f"ctfix fix --revert {args.port}{_netns_flag(args)}"
        sys.stderr.write(
            render.interrupted_text(args.port, name, len(stopped.removed), stopped.failures, revert)
        )
        return 128 + int(stopped.signum)
    seconds = 3.0 if args.listen is None else args.listen
    listened = _listen_after(plan.port, seconds) if seconds and not result.already else None
    if args.json:
        _write_json(render.applied_document(plan, result, label, listened))
    else:
        undo = f"ctfix fix --revert {plan.port}{_netns_flag(args)}"
        _write_text(render.applied_text(plan, result, label, undo, listened))
    # Applied, but wrong-source replies went on: it stays (the user decides), exit 1.
    return ExitStatus.PROBLEM if listened and listened.findings else ExitStatus.OK


def _listen_after(port: int, seconds: float) -> Any:
    """What listening to conntrack for `seconds` right after an apply saw (in the
    namespace the command entered), as render.fix.Listened."""
    from ctfix.platform import routing, snapshot
    from ctfix.render.fix import Listened

    heard = snapshot.listen(port, seconds, routing.local_addresses())
    return Listened(heard.seconds, heard.requests, heard.findings)


def _write_plan(plan: Plan, label: str, as_json: bool, apply_with: str | None) -> None:
    from ctfix.render import fix as render

    if as_json:
        _write_json(render.plan_document(plan, label))
    else:
        from ctfix.render.width import terminal_width

        sys.stdout.write(render.plan_text(plan, label, apply_with, terminal_width(sys.stdout)))


@contextlib.contextmanager
def _deferred_signals() -> Iterator[Callable[[], int | None]]:
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


def _apply_command(args: argparse.Namespace) -> str:
    """The dry run's last line: the same command with --apply, every option kept."""
    words = ["ctfix", "fix", str(args.port), "--method", args.method]
    if args.backend:
        words += ["--backend", args.backend]
    if args.force:
        words.append("--force")
    for gateway in args.gateway:
        words += ["--gateway", gateway]
    if args.netns:
        words += ["--netns", args.netns]
    words.append("--apply")
    import shlex

    return shlex.join(words)


def _already_applied(args: argparse.Namespace, label: str) -> int | None:
    """Same port, same method already recorded and whole: say so and what it does now,
    change nothing; the exit status (None: not applied, plan it).

    Checked before planning again: once the fix works, the evidence changes (e.g.
    clients that now get replies), and a fresh plan must not turn a no-op into a
    refusal or a second fix. But the fix is judged as --status judges it: a service
    DNAT'd to the port since (which a new plan would cover), or wrong-source replies
    since, is not "nothing to do" (exit 1, with the way out).
    """
    from ctfix.platform import remedy
    from ctfix.platform.fixstate import FixState

    fix = FixState.load(label).fixes.get(args.port)
    if fix is None or not fix.complete or fix.method != args.method:
        return None
    here = remedy.present_all([r.step.spec for r in fix.steps])
    missing = [r.step for r, found in zip(fix.steps, here, strict=True) if not found]
    if missing:
        raise CtfixError(
            f"the recorded {fix.method} fix for port {args.port} is no longer whole in the "
            f"kernel ({missing[0].summary}: missing)",
            f"run `ctfix fix --revert {args.port}` and apply again",
        )
    from ctfix.render import fix_status as render

    effect = _effect(args.port, label, 0.0)
    again = render.Again(
        f"ctfix fix --revert {args.port}{_netns_flag(args)}", _apply_command(args)
    )
    if args.json:
        _write_json(render.already_document(fix, label, effect, again))
    else:
        _write_text(render.already_text(args.port, fix, effect, again, time.time()))
    return ExitStatus.PROBLEM if render.failing(effect) else ExitStatus.OK


# -- what the planner needs to know -----------------------------------------------------


def _bind(args: argparse.Namespace) -> int:
    """--method bind: advice only. Needs no privilege beyond what `--netns` needs: it
    reads the port's sockets (sock_diag), the knowledge base and, when it may, the DNAT
    rules (clients behind a DNAT need a socket on its target); never conntrack."""
    from ctfix.core.plan import make_plan
    from ctfix.platform import rules_files

    kb = rules_files.load(args.rules, builtin=True)  # a broken --rules file fails first
    label = enter_netns(args.netns)
    from ctfix.platform import sockdiag

    listeners = tuple(listener for listener, _uid in sockdiag.listeners(args.port))
    forwarded, unread = _forwarded_here(args.port)
    diagnosis = Diagnosis(
        args.port, label, "at-risk", (), listeners=listeners, forwarded_from=forwarded
    )
    values = _snippet_values(args.port, forwarded)
    plan = make_plan(
        diagnosis, "bind", advice=(*_bind_advice(diagnosis, kb, values), *unread)
    )
    _write_plan(plan, label, args.json, None)
    return ExitStatus.OK


def _forwarded_here(port: int) -> tuple[tuple[ForwardedService, ...], tuple[str, ...]]:
    """Services a DNAT forwards to the port, from the rules (no conntrack: bind advice
    needs no privilege; without CAP_NET_ADMIN the rules cannot be read, and it says so)."""
    from ctfix.core.diagnosis.forwarding import forwarded_services
    from ctfix.core.nat.paths import dnat_paths
    from ctfix.platform import nat_rules, routing

    ruleset = nat_rules.read()
    local = {a.address for a in routing.local_addresses()}
    unread = tuple(
        f"(the DNAT rules could not be read: {error}; clients of a service DNAT'd to port "
        f"{port} need a socket on the DNAT's target address)"
        for error in ruleset.errors[:1]
    )
    return tuple(forwarded_services(port, dnat_paths(ruleset, port), (), local)), unread


def _snippet_values(port: int, forwarded: Sequence[ForwardedService]) -> SnippetValues:
    """No conntrack here (bind advice needs no privilege): the addresses clients may
    use are the host's own (global ones) and the targets of DNATs to the port."""
    from ctfix.core.diagnosis.requests import connected_networks, usable_addresses
    from ctfix.core.snippet import values
    from ctfix.platform import routing

    here = routing.local_addresses()
    connected = connected_networks(here)
    return values(
        port,
        [
            *(f.target_address for f in forwarded),
            *usable_addresses(here, "ipv4"),
            *usable_addresses(here, "ipv6"),
        ],
        [network for network, _iface, _family in connected],
        [iface for _network, iface, _family in connected],
    )


def _bind_advice(
    diagnosis: Diagnosis, kb: KnowledgeBase, values: SnippetValues
) -> tuple[str, ...]:
    """`values`: what a knowledge-base snippet is filled in with for this host."""
    from ctfix.core.plan.bind import dnat_advice, pktinfo_advice
    from ctfix.core.snippet import filled_in

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
        process = listener.process or "the service"
        # "socat is socat (UDP-RECVFROM / UDP-LISTEN)" says nothing: the name alone then.
        who = rule.name if rule.name.lower().startswith(process.lower()) else (
            f"{process} is {rule.name}"
        )
        lines.append(f"{who}: {rule.fix}{rule.upgrade_advice()}")
        heading, text = filled_in(rule.snippet, values)
        if heading and text:
            lines.append(f"  {heading}")
        lines.extend(f"    {line}" for line in text.splitlines() if text.strip())
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
    return (*lines, *dnat_advice(diagnosis.forwarded_from), *pktinfo_advice(port))


