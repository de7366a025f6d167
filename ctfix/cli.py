"""Command line: argument parsing, one error funnel, exit codes.

Each command lives in `ctfix/commands/<name>.py` and exposes
`add_arguments(parser)` and `run(args) -> int`. Only the chosen command's module is
imported (after parsing has picked it), so `ctfix --help` stays fast: command modules
must import heavy libraries inside `run`, never at module level.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn, Protocol, TextIO, cast

from ctfix import __version__
from ctfix.errors import CtfixError, ExitStatus

PROG = "ctfix"

#: name -> one-line summary shown by `ctfix --help`.
COMMANDS: dict[str, str] = {
    "watch": "report wrong-source replies, stale NAT and unanswered requests live",
    "explain": "who is on a UDP port, what fails (wrong source, stale NAT, no answer), the fix",
    "scan": "every UDP service in the namespace, diagnosed like explain, worst first",
    "fix": "apply (or print, or revert) a reversible remediation for a UDP port",
    "serve": "run the reference UDP echo server that always answers from the right address",
    "lab": "reproduce the bug and its fix in throwaway network namespaces",
    "health": "say whether conntrack itself drops packets: table fill, insert_failed, drops",
    "check": "one line and exit 0 OK, 1 problem, 2 unknown: a node-problem-detector plugin",
}

DESCRIPTION = """\
A UDP server bound to 0.0.0.0 or :: on a host with several addresses answers with
sendto(); the kernel picks the reply's source by routing, and clients that sent to
another local address drop the reply (ICMP port unreachable). ctfix finds such
services from the kernel's connection tracking, explains them and fixes them.
"""

EPILOG = """\
examples:
  ctfix lab                          the bug and its fix, in a lab
  ctfix watch --json --duration 60   problems seen live for a minute
  ctfix scan                         every UDP service, worst first
  ctfix explain 5353                 who is on UDP 5353 and what fails
  ctfix fix 5353 --method snat-zone  print the plan (--apply applies it)

Run `ctfix COMMAND --help` for a command's options.
"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """argparse's help at the terminal's width: descriptions and epilogs are
    preformatted (examples in two columns, exit-status tables) and made to fit by
    ctfix.render.width.reflow; a usage line written by hand is filled too."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        from ctfix.render.width import reflow

        lines = reflow(text, width).split("\n")
        return "\n".join(indent + line if line else line for line in lines)

    def _split_lines(self, text: str, width: int) -> list[str]:
        from ctfix.render.width import fill

        # an option's help: filled, never broken inside a word (`policy-route`)
        return fill(" ".join(text.split()), width).splitlines()

    def _format_usage(
        self,
        usage: str | None,
        actions: Iterable[argparse.Action],
        groups: Iterable[argparse._MutuallyExclusiveGroup],
        prefix: str | None,
    ) -> str:
        text = super()._format_usage(usage, actions, groups, prefix)
        if all(len(line) <= self._width for line in text.splitlines()):
            return text
        from ctfix.render.width import fill_usage

        return fill_usage(text, self._prog, self._width) + "\n\n"


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            ExitStatus.ERROR,
            f"{self.prog}: error: {message} (see `{self.prog} --help`)\n",
        )


def _load(name: str) -> _Command:
    module: _Command = importlib.import_module(f"ctfix.commands.{name}")
    return module


def _chosen_command(argv: Sequence[str]) -> str | None:
    for token in argv:
        if token in COMMANDS:
            return token
        if not token.startswith("-"):
            return None
    return None


def build_parser(argv: Sequence[str], *, every_command: bool = False) -> argparse.ArgumentParser:
    """Build the parser; only the command named in argv gets its full arguments
    (every command with `every_command`, for the man page and shell completions)."""
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_Help,
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debugging output on errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    chosen = _chosen_command(argv)
    for name, summary in COMMANDS.items():
        cmd_parser = sub.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            formatter_class=_Help,
        )
        cmd_parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        if every_command and name != chosen:
            _load(name).add_arguments(cmd_parser)
        if name == chosen:
            _load(name).add_arguments(cmd_parser)
            # argparse has no slot for it; main() reads it back for error messages.
            parser.chosen_parser = cmd_parser  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn every error into one line and a status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args, extra = parser.parse_known_args(args_list)
    if extra:
        # argparse would blame `ctfix`; the stray words belong to the command.
        culprit = getattr(parser, "chosen_parser", None) or parser
        culprit.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = bool(getattr(args, "debug", False)) or bool(os.environ.get("CTFIX_DEBUG"))
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitStatus.ERROR
    output = _ReaderGone(sys.stdout, stop=args.command in _STREAMING)
    sys.stdout = cast(TextIO, output)
    try:
        status = int(_load(args.command).run(args))
        output.flush()  # here, so that a reader gone shows now, not at exit
        return status
    except CtfixError as err:
        _traceback(debug)
        print(f"ctfix {args.command}: error: {err.one_line()}", file=sys.stderr)
        return ExitStatus.ERROR
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        # `ctfix watch | head`: the reader left; that is not an error worth a traceback.
        return ExitStatus.OK
    except PermissionError as err:
        _traceback(debug)
        print(
            f"ctfix {args.command}: error: permission denied ({err.strerror or err}); "
            "run as root or with CAP_NET_ADMIN",
            file=sys.stderr,
        )
        return ExitStatus.ERROR
    except Exception as err:
        _traceback(debug)
        print(
            f"ctfix {args.command}: internal error: {type(err).__name__}: {err}; "
            "rerun with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return ExitStatus.ERROR
    finally:
        sys.stdout = output.stream


def _traceback(debug: bool) -> None:
    """--debug shows where an error came from; it never changes the exit status."""
    if debug:
        traceback.print_exc()


#: commands whose output is a stream: when its reader leaves they stop (exit 0); the
#: others finish and keep their own status (`ctfix fix --status | head -3` is 1 for a
#: damaged fix, as without the pipe).
_STREAMING = frozenset({"watch", "serve"})


class _ReaderGone:
    """sys.stdout while a command runs: once the reader has gone (EPIPE), the rest of
    the output goes to /dev/null instead of raising (or stops a streaming command)."""

    def __init__(self, stream: TextIO, stop: bool) -> None:
        self.stream = stream
        self.stop = stop
        self.gone = False

    def _reader_left(self) -> None:
        self.gone = True
        # Also for the interpreter's last flush at exit, which would fail the same way.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())
        finally:
            os.close(devnull)
        if self.stop:
            raise BrokenPipeError

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._reader_left()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._reader_left()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
