"""Advisory file locks that give up after a while (flock(2), polled).

Know before changing: the lock lives as long as the file descriptor; closing it (or
the process dying, even by kill -9) releases it, so callers hold the fd for exactly
the critical section and close it in a `finally`.
"""

from __future__ import annotations

import fcntl
import time


def flock_within(fd: int, timeout: float) -> bool:
    """Take an exclusive flock on fd, retrying for up to `timeout` seconds.

    False when another holder kept it that long; the caller says what to do.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
