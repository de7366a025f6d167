"""ctfix fix takes the xtables lock like `iptables -w` (QA P8): no root needed here,
the lock file is a temporary one (XTABLES_LOCKFILE, as iptables honours it)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from ctfix.errors import CtfixError
from ctfix.platform.iptables_legacy import xtables_lock


@pytest.fixture
def lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "xtables.lock"
    monkeypatch.setenv("XTABLES_LOCKFILE", str(path))
    return path


def test_held_lock_is_a_one_line_error_after_the_timeout(lock_file: Path) -> None:
    with open(lock_file, "w") as other:  # another program, e.g. Docker's iptables -w
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(CtfixError) as err, xtables_lock(timeout=0.2):
            pass
    assert err.value.message == (
        f"another program has held the xtables lock {lock_file} for 0.2 s (iptables, "
        "Docker, firewalld?); nothing changed"
    )


def test_lock_is_held_inside_and_released_after(lock_file: Path) -> None:
    with xtables_lock(timeout=0.2):
        fd = os.open(lock_file, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    with open(lock_file) as again:
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
