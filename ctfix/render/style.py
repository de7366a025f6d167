"""Terminal styling: colour only on a TTY, never when NO_COLOR is set.

Know before changing: output that is piped or redirected (logs, `| grep`, CI) must
stay plain text; https://no-color.org says any non-empty NO_COLOR disables colour.
"""

from __future__ import annotations

import os
from typing import TextIO

_CODES = {"red": "31", "green": "32", "yellow": "33", "bold": "1", "dim": "2"}


def use_colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Style:
    """Wraps text in ANSI codes when enabled; identity otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: TextIO) -> Style:
        return cls(use_colour(stream))

    def __call__(self, text: str, *names: str) -> str:
        if not self.enabled or not names:
            return text
        codes = ";".join(_CODES[n] for n in names)
        return f"\033[{codes}m{text}\033[0m"

    def mark(self, ok: bool) -> str:
        return self("✓", "green", "bold") if ok else self("✗", "red", "bold")
