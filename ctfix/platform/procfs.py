"""Reading /proc: a file's text, or None when the process is gone or not ours.

Know before changing: processes come and go between listing /proc and reading it;
a vanished or unreadable file is an ordinary answer (None), never an exception.
"""

from __future__ import annotations

import os


def read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return None


def stat_key(path: str) -> tuple[int, int] | None:
    """(device, inode) of what path names (a namespace file), or None when it is gone
    or not ours to look at."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
