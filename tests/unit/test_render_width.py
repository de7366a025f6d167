"""Text fits the reader's terminal: watch's finding lines at 80 columns, one line
each on a pipe."""

from __future__ import annotations

import io

import pytest

from ctfix.core.detectors.wrong_source import WrongSourceFinding as Finding
from ctfix.render.watch import WatchRenderer
from ctfix.render.width import fill, terminal_width

FINDING = Finding(
    family="ipv6",
    proto="udp",
    client="[2001:db8:1::3]:33793",
    service="[2001:db8:2::13]:5353",
    expected_source="[2001:db8:2::13]:5353",
    actual_source="[2001:db8:1::1]:5353",
    mismatch="address",
    local=True,
    confirmed=True,
    count=12,
    first_seen=1_790_000_000.0,
    last_seen=1_790_000_004.5,
    client_network="2001:db8:1::/64",
    clients=3,
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _render(stream: io.StringIO) -> str:
    renderer = WatchRenderer(stream, json_lines=False, netns="host")
    renderer.finding(FINDING)
    renderer.finding(FINDING, update=True)
    renderer.final([FINDING])
    return stream.getvalue()


def test_watch_finding_lines_fit_80_columns_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("COLUMNS", raising=False)
    piped = _render(io.StringIO())
    assert max(len(line) for line in piped.splitlines()) > 80  # there is work to do
    monkeypatch.setenv("COLUMNS", "80")
    shown = _render(_Terminal())
    assert all(len(line) <= 80 for line in shown.splitlines()), shown
    assert shown.split() == piped.split()  # the same words, only the lines differ


def test_on_a_pipe_every_finding_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    pipe = io.StringIO()
    assert terminal_width(pipe) is None
    renderer = WatchRenderer(pipe, json_lines=False, netns="host")
    renderer.finding(FINDING)
    assert len(pipe.getvalue().splitlines()) == 1


def test_fill_never_breaks_a_word_and_keeps_blank_lines() -> None:
    text = "an-unbreakable-word-longer-than-the-width and more\n\nsecond paragraph"
    filled = fill(text, 20, "  ", "    ")
    assert "an-unbreakable-word-longer-than-the-width" in filled.splitlines()[0]
    assert "" in filled.splitlines()
    assert filled.split() == text.split()
