"""Text that fits the reader's terminal: its width, and filling at it, never mid-word.

Know before changing: only a terminal (or $COLUMNS, as `ls` and `git` honour it) has
a width; output to a pipe or a file gets no width (None), and one-line records stay
one line there, for grep and scripts.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from typing import TextIO

#: narrower terminals still get this many columns (a word per line helps no one)
MIN_WIDTH = 40


def terminal_width(stream: TextIO | None = None) -> int | None:
    """The width to fill text for `stream`: $COLUMNS, else the terminal's when the
    stream is one, else None (a pipe or a file)."""
    tty = stream is not None and hasattr(stream, "isatty") and stream.isatty()
    if not tty and "COLUMNS" not in os.environ:
        return None
    return max(MIN_WIDTH, shutil.get_terminal_size((80, 24)).columns)


def fill(text: str, width: int, indent: str = "", hang: str | None = None) -> str:
    """Each line of text filled at width, words never broken; continuation lines
    start with `hang` (default: `indent`); blank lines stay blank."""
    return "\n".join(
        textwrap.fill(
            paragraph,
            width=width,
            initial_indent=indent,
            subsequent_indent=indent if hang is None else hang,
            break_long_words=False,
            break_on_hyphens=False,
        )
        if paragraph.strip()
        else ""
        for paragraph in text.splitlines()
    )
