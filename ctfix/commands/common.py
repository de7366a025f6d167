"""Arguments and checks several commands share (--netns, --json, ports)."""

from __future__ import annotations

import argparse
import math
import os
from typing import Literal, get_args

from ctfix.errors import CtfixError, PrivilegeError


def add_netns_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--netns",
        metavar="NAME|PATH|pid:PID|container:NAME",
        default=None,
        help="work in this network namespace: an `ip netns` name, a path such as "
        "/proc/PID/ns/net, pid:PID, or container:NAME_OR_ID (Docker, Podman, or a CRI "
        "runtime whose socket answers) (default: the current namespace)",
    )


def add_all_netns_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--all-netns",
        action="store_true",
        help="every network namespace of the host, one after the other: the host's, each "
        "container's, each `ip netns` one (found in /proc/*/ns/net and nsfs bind mounts; "
        "needs CAP_SYS_ADMIN to enter them); not with --netns",
    )


def netns_choice(args: argparse.Namespace) -> bool:
    """True for --all-netns; a CtfixError when it comes with --netns."""
    if args.all_netns and args.netns is not None:
        raise CtfixError(
            "--all-netns and --netns contradict each other",
            "give --netns for one namespace, or --all-netns for every one",
        )
    return bool(args.all_netns)


def add_rules_argument(parser: argparse.ArgumentParser) -> None:
    from pathlib import Path

    parser.add_argument(
        "--rules",
        metavar="DIR",
        action="append",
        type=Path,
        default=[],
        help="also load the knowledge-base files (*.yaml) in DIR; an entry with a "
        "built-in id replaces it; repeatable",
    )


OutputFormat = Literal["text", "markdown", "json"]


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    """--format text|markdown|json and its shorthand --json (explain, scan)."""
    parser.add_argument(
        "--format",
        choices=get_args(OutputFormat),
        # None, not "text": an explicit `--format text --json` contradicts itself.
        default=None,
        help="text (default), markdown for an incident document, or json",
    )
    parser.add_argument("--json", action="store_true", help="same as --format json")


def output_format(args: argparse.Namespace) -> OutputFormat:
    if args.json and args.format not in (None, "json"):
        raise CtfixError(
            f"--json and --format {args.format} contradict each other", "give only one of them"
        )
    chosen: OutputFormat = "json" if args.json else args.format or "text"
    return chosen


def port_number(text: str) -> int:
    """argparse type for a UDP port: 1-65535, or a UDP service name from /etc/services
    (`domain`, `ntp`), as ss and tcpdump take them."""
    if text.isascii() and text.isdigit():
        if not 1 <= int(text) <= 65535:
            raise argparse.ArgumentTypeError(f"{text!r} is not a UDP port (1-65535)")
        return int(text)
    import socket

    try:
        return socket.getservbyname(text, "udp")
    except (OSError, ValueError, UnicodeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a UDP port (1-65535) nor a UDP service name in /etc/services"
        ) from None


def require_root(what: str, capability: str = "CAP_NET_ADMIN") -> None:
    """Fail early, in one line, when the process cannot have the capability."""
    if os.geteuid() != 0 and not _has_capability(capability):
        raise PrivilegeError(what, capability)


_CAP_BITS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21}


def _has_capability(name: str) -> bool:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_BITS[name] & 1)
    except OSError:
        pass
    return False


def enter_netns(spec: str | None) -> str:
    """Resolve and enter --netns for the whole command; return its label for output."""
    from ctfix.platform import netns

    if spec is not None and spec.startswith("container:"):
        from ctfix.platform import containers

        target = containers.container_netns(spec)
    else:
        target = netns.resolve(spec)
    netns.enter(target)
    return target.label


def positive_seconds(text: str, *, zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "above 0"
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of seconds {least}")
    return value


def seconds_or_zero(text: str) -> float:
    """Like `positive_seconds`, and 0 turns the thing off."""
    return positive_seconds(text, zero=True)


__all__ = ["CtfixError", "add_netns_argument", "enter_netns", "port_number", "require_root"]


def ctfix_command() -> str:
    """How to run this same ctfix from a shell, for the commands ctfix prints: `ctfix`
    when that is on PATH and is this installation, else an absolute path (a venv's
    ctfix is usually not on root's PATH, and `ip netns exec` needs a real program)."""
    import shutil
    import sys

    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script) == "ctfix":
        on_path = shutil.which("ctfix")
        if on_path and os.path.realpath(on_path) == os.path.realpath(script):
            return "ctfix"
        return script
    return f"{sys.executable} -m ctfix"
