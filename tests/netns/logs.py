"""What a test's process writes: waiting for a line in its log file (never
sleep-and-hope), and its JSON lines collected as they come."""

from __future__ import annotations

import json
import threading
import time
from typing import IO, Any


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


class JsonLines:
    """The JSON records a process prints, one a line, collected by a thread as they
    come (`records`), so that a test can wait for one while the process runs."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.records: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.stream:
            self.records.append(json.loads(line))

    def join(self, timeout: float) -> list[dict[str, Any]]:
        """Every record, once the stream ended (or `timeout` passed)."""
        self._reader.join(timeout=timeout)
        return list(self.records)
