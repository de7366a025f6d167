"""watch's stderr: its notes and warnings, and on a terminal a status line updated in
place that shows it is alive (events/s, flows, findings, lost; namespaces with
--all-netns).

Know before changing: the status line exists only where a person reads it: stderr
is a terminal, TERM is not `dumb` (which cannot erase a line) and the output is not
JSON lines; a pipe or a file never gets a control sequence. It is redrawn at most
every STATUS_EVERY seconds and erased before anything else is written to the
terminal (a note here, a finding line on stdout through `clear`, which the renderer
calls first), so lines never interleave with it; `close()` erases it at exit. Colour
(dim) follows NO_COLOR like every other output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TextIO

from ctfix.render.style import Style, use_colour
from ctfix.render.width import fill, terminal_width

#: seconds between two redraws of the status line, at least
STATUS_EVERY = 0.5
#: erase the line the cursor is on: carriage return, then "erase to end of line"
_ERASE = "\r\033[K"


def status_allowed(stream: TextIO, *, json_lines: bool) -> bool:
    """Whether `stream` gets a status line (see the module doc)."""
    isatty = getattr(stream, "isatty", None)
    return (
        not json_lines
        and bool(isatty and isatty())
        and os.environ.get("TERM", "") not in ("dumb", "")
    )


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """What the status line shows, summed over the watched namespaces."""

    events: int
    new_flows: int
    findings: int
    lost: int
    namespaces: int | None = None  # --all-netns: how many are watched


def _thousands(count: float) -> str:
    return f"{count:,.0f}"


def status_text(counts: StatusCounts, rate: float) -> str:
    parts = [
        f"{_thousands(rate)} events/s",
        f"{_thousands(counts.new_flows)} flows",
        f"{_thousands(counts.findings)} finding{'' if counts.findings == 1 else 's'}",
        f"{_thousands(counts.lost)} lost",
    ]
    if counts.namespaces is not None:
        parts.append(f"{counts.namespaces} namespace{'' if counts.namespaces == 1 else 's'}")
    return "ctfix watch: " + ", ".join(parts)


class Console:
    """Notes, warnings and the status line, all on one stream (stderr)."""

    def __init__(self, stream: TextIO, *, status: bool, prefix: str = "ctfix watch") -> None:
        self.stream = stream
        self.prefix = prefix
        self.status = status
        self.style = Style(use_colour(stream))
        self._shown = False  # a status line is on the screen
        self._last: tuple[float, int] | None = None  # (monotonic, events) at the last draw
        self._next = 0.0

    def note(self, text: str) -> None:
        """One note, filled at the terminal's width (one line on a pipe)."""
        self.clear()
        line = f"{self.prefix}: {text}"
        width = terminal_width(self.stream)
        print(fill(line, width, "", "  ") if width else line, file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        self.note(f"warning: {text}")

    def clear(self) -> None:
        """Erase the status line (before anything else reaches the terminal)."""
        if self._shown:
            self._shown = False
            self.stream.write(_ERASE)
            self.stream.flush()

    def due(self, mono: float) -> float:
        """When the status line wants its next redraw (inf: never)."""
        return self._next if self.status else float("inf")

    def show(self, counts: StatusCounts, mono: float) -> None:
        """Redraw the status line, at most every STATUS_EVERY seconds."""
        if not self.status or mono < self._next:
            return
        self._next = mono + STATUS_EVERY
        rate = 0.0
        if self._last is not None and mono > self._last[0]:
            rate = max(0, counts.events - self._last[1]) / (mono - self._last[0])
        self._last = (mono, counts.events)
        width = terminal_width(self.stream) or 80
        text = status_text(counts, rate)[: max(1, width - 1)]  # never wraps
        self.stream.write(_ERASE + self.style(text, "dim"))
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        self.clear()
        self.status = False
