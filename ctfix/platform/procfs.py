"""Reading /proc: a file's text, or None when the process is gone or not ours.

Know before changing: processes come and go between listing /proc and reading it;
a vanished or unreadable file is an ordinary answer (None), never an exception.
"""

from __future__ import annotations


def read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return None
