"""watch's status line: on a terminal only, redrawn in place at most a few times a
second, erased before any other line and at exit; never in a pipe, with --json or
TERM=dumb; no colour with NO_COLOR. (tests/netns/test_watch_all_netns.py runs the
real command in a pty.)"""

from __future__ import annotations

import io

import pytest

from ctfix.render.status import STATUS_EVERY, Console, StatusCounts, status_allowed, status_text
from ctfix.render.watch import WatchRenderer

ERASE = "\r\033[K"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("NO_COLOR", raising=False)


def test_only_a_terminal_that_can_erase_gets_a_status_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert status_allowed(Tty(), json_lines=False)
    assert not status_allowed(io.StringIO(), json_lines=False)  # a pipe or a file
    assert not status_allowed(Tty(), json_lines=True)
    monkeypatch.setenv("TERM", "dumb")
    assert not status_allowed(Tty(), json_lines=False)
    monkeypatch.delenv("TERM")
    assert not status_allowed(Tty(), json_lines=False)


def test_the_line_is_redrawn_in_place_at_most_every_half_second_and_erased_before_output() -> None:
    err = Tty()
    console = Console(err, status=True)
    console.show(StatusCounts(0, 0, 0, 0), 10.0)
    console.show(StatusCounts(500, 10, 1, 0), 10.0 + STATUS_EVERY / 2)  # too soon: nothing
    console.show(StatusCounts(1000, 20, 1, 2), 11.0)
    drawn = err.getvalue()
    assert drawn.count(ERASE) == 2 and "\n" not in drawn
    assert "1,000 events/s, 20 flows, 1 finding, 2 lost" in drawn.split(ERASE)[-1]
    console.note("something happened")
    assert err.getvalue().endswith(ERASE + "ctfix watch: something happened\n")
    console.close()
    console.show(StatusCounts(2000, 20, 1, 2), 20.0)  # after close: never again
    assert err.getvalue().endswith("something happened\n")


def test_a_finding_line_erases_the_status_line_first_and_close_removes_it() -> None:
    """stdout and stderr are the same terminal: the finding must not follow the
    status text on its line."""
    screen = Tty()
    console = Console(screen, status=True)
    renderer = WatchRenderer(screen, json_lines=False, netns="ns", before_write=console.clear)
    console.show(StatusCounts(10, 1, 0, 0, namespaces=53), 1.0)
    renderer.summary({"kind": "summary", "events": 10, "new_flows": 1, "lost": 0,
                      "resyncs": 0, "findings": 0})
    console.show(StatusCounts(10, 1, 0, 0, namespaces=53), 2.0)
    console.close()
    text = screen.getvalue()
    assert "53 namespaces" in text
    _status, rest = text.split(ERASE, 2)[1:]
    assert rest.startswith("summary: ")  # erased before the line, not written after it
    assert text.endswith(ERASE)  # and gone at exit


def test_no_colour_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    coloured = Tty()
    Console(coloured, status=True).show(StatusCounts(1, 1, 0, 0), 1.0)
    assert "\033[2m" in coloured.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Tty()
    Console(plain, status=True).show(StatusCounts(1, 1, 0, 0), 1.0)
    assert "\033[2m" not in plain.getvalue() and "events/s" in plain.getvalue()


def test_the_line_never_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("NO_COLOR", "1")
    err = Tty()
    Console(err, status=True).show(StatusCounts(10**9, 10**9, 10**6, 10**6, 300), 1.0)
    assert len(err.getvalue().split(ERASE)[-1]) == 39
    assert status_text(StatusCounts(0, 0, 1, 0), 0.0).endswith("1 finding, 0 lost")
