"""Exit statuses are a contract (issue 9 item 9): --debug never changes them, a reader
that leaves early (`| head`) does not turn a problem into 0, and options that
contradict each other are refused in one line, exit 2, before anything is done."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types

import pytest

from ctfix import cli
from ctfix.errors import CtfixError


def ctfix(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctfix", *argv], capture_output=True, text=True, timeout=60,
        env={**os.environ, "CTFIX_STATE_DIR": "/nonexistent/ctfix-test"},
    )


@pytest.mark.parametrize(
    "argv",
    [
        ("explain", "53", "--format", "text", "--json"),
        ("explain", "53", "--format", "markdown", "--json"),
        ("fix", "--revert", "--method", "snat-zone"),
        ("fix", "--revert", "--force"),
        ("fix", "--revert", "--backend", "nft"),
        ("fix", "--revert", "--rules", "/tmp"),
        ("fix", "--status", "--method", "bind"),
        ("fix", "--status", "--force"),
        ("fix", "5000", "--method", "snat-zone", "--json", "--netns", "/nonexistent", "--status"),
        ("fix", "5000", "--method", "bind", "--force"),
        ("fix", "--revert", "--listen", "3"),
        ("fix", "5000", "--method", "snat-zone", "--listen", "3"),  # a dry run listens not
        ("fix", "5000", "--method", "snat-zone", "--apply", "--listen", "-1"),
        ("scan", "--all-netns", "--netns", "blue"),
        ("watch", "--metrics", ""),
        ("watch", "--metrics", "   "),
    ],
)
def test_contradicting_options_are_one_line_exit_2(argv: tuple[str, ...]) -> None:
    done = ctfix(*argv)
    assert done.returncode == 2, (done.stdout, done.stderr)
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"ctfix {argv[0]}: error: ")
    assert done.stdout == ""


def test_debug_shows_the_traceback_and_keeps_exit_2() -> None:
    plain = ctfix("fix", "5000")
    debug = ctfix("--debug", "fix", "5000")
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr and "--method is required" in debug.stderr


def _fake_command(status: int, lines: int) -> types.SimpleNamespace:
    def run(args: argparse.Namespace) -> int:
        del args
        for number in range(lines):
            print(f"line {number}: " + "x" * 60)
        return status

    return types.SimpleNamespace(add_arguments=lambda parser: None, run=run)


@pytest.mark.parametrize("lines", [3, 50_000])
def test_a_reader_that_leaves_early_keeps_the_commands_status(
    monkeypatch: pytest.MonkeyPatch, lines: int
) -> None:
    """`ctfix fix --status | head -3` on a DAMAGED fix: 1, not 0 (nor 120)."""
    monkeypatch.setattr(cli, "_load", lambda name: _fake_command(1, lines))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    saved = os.dup(1)
    stdout = sys.stdout
    try:
        os.dup2(write_end, 1)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115  (fd 1 stays ours)
        status = cli.main(["fix"])
        sys.stdout.flush()
    finally:
        sys.stdout = stdout
        os.dup2(saved, 1)
        os.close(saved)
        os.close(write_end)
    assert status == 1


def test_a_streaming_command_stops_when_the_reader_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`ctfix watch | head`: watch stops (it would otherwise watch for nobody)."""
    printed: list[int] = []

    def run(args: argparse.Namespace) -> int:
        del args
        for number in range(100_000):
            print("x" * 100)
            printed.append(number)
        raise CtfixError("watched for nobody")

    monkeypatch.setattr(
        cli, "_load", lambda name: types.SimpleNamespace(add_arguments=lambda p: None, run=run)
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    saved = os.dup(1)
    stdout = sys.stdout
    try:
        os.dup2(write_end, 1)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        status = cli.main(["watch"])
    finally:
        sys.stdout = stdout
        os.dup2(saved, 1)
        os.close(saved)
        os.close(write_end)
    assert status == 0 and len(printed) < 100_000
