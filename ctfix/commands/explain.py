"""`ctfix explain PORT`: who is on a UDP port, is it affected, the evidence, the fix.

Read-only: it only asks the kernel (sock_diag, rtnetlink, conntrack dumps, the
nftables ruleset, iptables-legacy tables that exist) and never changes anything, with
one exception the user asks for: `--listen` in a namespace that does not track a
family switches tracking on for its duration (the small nftables table of `watch
--track`, removed afterwards, also on SIGTERM, SIGINT and SIGHUP), or refuses.

Know before changing: the namespace is entered for the whole command, before any
socket is created (sockets keep the namespace they were made in); the knowledge base
is loaded first, so a broken `--rules` file fails before any work. Exit 0 = ok,
1 = broken or at-risk, or nothing bound while clients go unanswered (service_down),
2 = error (via the CLI's funnel).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from ctfix.commands.common import (
    add_format_arguments,
    add_netns_argument,
    add_rules_argument,
    enter_netns,
    output_format,
    port_number,
    positive_seconds,
    require_root,
)
from ctfix.errors import CtfixError, ExitStatus

if TYPE_CHECKING:
    from ctfix.core.model import Diagnosis

DESCRIPTION = """\
Say who is on a UDP port and what fails there (wrong-source replies, clients still
sent to a stale DNAT target, requests nothing answers), why, with the evidence, and
how to fix it. Read-only: explain never changes anything.

It reads the sockets on the port and their processes, the namespace's addresses,
routes and policy rules (the reply source is a route lookup with ipproto udp and the
source port, so policy rules count), the conntrack table for the port (filtered in
the kernel), and the nftables and iptables-legacy rules that touch the port.

verdicts and exit status:
  0  ok        specific binds, a service known to answer correctly, or replies seen
               leaving from the right source for every address clients used
  1  at-risk   a wildcard socket where some client network would get replies from
               another address than the one it sends to (no evidence yet)
  1  broken    conntrack shows wrong-source replies
  1  unknown   ctfix cannot see: conntrack does not track a family that a wildcard
               socket serves (JSON "tracking"); --listen S switches it on and looks
  1  ok, but nothing answers: no socket on the port while clients' requests go
               unanswered (an outage; JSON: "service_down": true)
  2  error     bad input, missing privileges (CAP_NET_ADMIN), missing namespace"""

EPILOG = """\
examples:
  ctfix explain 53                            the host's DNS port
  ctfix explain 5353 --netns pid:4242         inside a container, by a process id
  ctfix explain 1194 --listen 30              watch live events for 30 s first
  ctfix explain 53 --format markdown          for an incident document
  ctfix explain 53 --json | jq .verdict       for scripts
  ctfix explain 123 --rules /etc/ctfix/rules  with your own knowledge base"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument("port", type=port_number, metavar="PORT", help="the UDP port")
    add_netns_argument(parser)
    add_format_arguments(parser)
    add_rules_argument(parser)
    parser.add_argument(
        "--listen",
        metavar="S",
        type=positive_seconds,
        default=0.0,
        help="also watch live conntrack events for S seconds before answering; where a "
        "family is not tracked, tracking is switched on meanwhile (removed afterwards)",
    )


def run(args: argparse.Namespace) -> int:
    from ctfix.core.diagnosis import diagnose
    from ctfix.platform import containers, rules_files, snapshot
    from ctfix.render import explain as render

    fmt = output_format(args)
    kb = rules_files.load(args.rules, builtin=True)
    require_root("ctfix explain (it reads conntrack and netfilter)")
    label = enter_netns(args.netns)
    with _switching_tracking(enabled=args.listen > 0) as track:
        snap = snapshot.collect(
            args.port,
            label,
            listen_seconds=args.listen,
            kb=kb,
            track=track,
        )
    diagnosis = containers.annotate(diagnose(snap, kb))
    if fmt == "json":
        from ctfix.render.jsonout import write_document

        write_document(render.explain_document(diagnosis), sys.stdout)
    elif fmt == "markdown":
        from ctfix.render.stamp import markdown_document

        sys.stdout.write(markdown_document(render.render_markdown(diagnosis)))
    else:
        from ctfix.render.style import Style
        from ctfix.render.width import terminal_width

        style, width = Style.for_stream(sys.stdout), terminal_width(sys.stdout)
        sys.stdout.write(render.render_text(diagnosis, style, width))
    return exit_status(diagnosis)


#: Signals that end explain while --listen may hold a tracking table: each one runs
#: the clean-up (raised as KeyboardInterrupt: the CLI's exit status for an interrupt).
_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


@contextlib.contextmanager
def _switching_tracking(
    *, enabled: bool
) -> Iterator[Callable[[Sequence[str]], tuple[str, ...]]]:
    """A `track()` for --listen: switch conntrack on for the families not tracked here
    (watch --track's table), say which; the table goes when the block ends, whatever
    ends it. A namespace where it cannot be loaded is refused (one line, exit 2)."""
    from ctfix.platform import track as tracking

    loaded: list[str] = []

    def track(families: Sequence[str]) -> tuple[str, ...]:
        """Switch tracking on for those of `families` ("ipv4", "ipv6") not tracked."""
        from ctfix.platform import conntrack

        untracked: list[int] = [
            fam
            for fam, name in _FAMILY_KEYS.items()
            if name in families and conntrack.probe_tracking(fam) is False
        ]
        if not untracked:
            return ()
        table = tracking.table_name(untracked)
        loaded.append(table)  # named before it is loaded: a signal finds it below
        try:
            tracking.load(table)
        except CtfixError as err:
            loaded.remove(table)
            raise CtfixError(
                "--listen cannot switch conntrack on in this namespace: " + err.one_line(),
                "without tracking no evidence can exist here; load a rule that needs "
                "conntrack (e.g. `ct state new`) or explain without --listen",
            ) from None
        return tuple(_FAMILY_KEYS[fam] for fam in untracked)

    def stop(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        raise KeyboardInterrupt

    previous = {
        name: signal.signal(getattr(signal, name), stop)
        for name in (_STOP_SIGNALS if enabled else ())
        if hasattr(signal, name)
    }
    try:
        yield track
    finally:
        for name in previous:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        try:
            for table in loaded:
                tracking.remove(table, _warn)
        finally:
            for name, handler in previous.items():
                signal.signal(getattr(signal, name), handler)


_FAMILY_KEYS: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


def _warn(text: str) -> None:
    print(f"ctfix explain: warning: {text}", file=sys.stderr, flush=True)


def exit_status(diagnosis: Diagnosis) -> int:
    """0 only when the port is fine: ok, and not an outage (nothing bound, clients
    unanswered), which the verdict (about wrong sources) would call ok."""
    from ctfix.core.scan import healthy

    return ExitStatus.OK if healthy(diagnosis) else ExitStatus.PROBLEM
