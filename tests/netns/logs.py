"""Waiting for a line in a log file a test's process writes (never sleep-and-hope)."""

from __future__ import annotations

import time
from typing import IO


def wait_for_text(log: IO[str], text: str, timeout: float = 20.0) -> str:
    """Poll the file until it holds text (or fail after timeout); its content."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log.name) as fh:
            seen = fh.read()
        if text in seen:
            return seen
        assert time.monotonic() < deadline, f"no {text!r} in: {seen!r}"
        time.sleep(0.05)
