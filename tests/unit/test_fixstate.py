"""The fix state file as a user meets it when something is wrong with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ctfix.errors import CtfixError
from ctfix.platform import fixstate, locks


def test_unreadable_state_file_says_to_run_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    (tmp_path / "netns-cookie-1.json").write_text("{}")

    def denied(path: str, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", path)

    # Root reads any file, so the test stands in for the non-root user's open().
    monkeypatch.setattr(fixstate, "open", denied, raising=False)
    with pytest.raises(CtfixError) as err:
        fixstate.FixState.load("host", key="netns-cookie-1")
    assert err.value.message.endswith("netns-cookie-1.json: permission denied")
    assert err.value.hint is not None and err.value.hint.startswith("run as root")


@pytest.mark.parametrize(
    "content",
    [
        "[1, 2, 3]",
        "null",
        "{not json",
        "\xff\xfe",
        '"text"',
        '{"fixes": "x"}',
        '{"version": 1, "fixes": "x"}',
        '{"version": 1, "fixes": [1]}',
        '{"version": 1, "fixes": {"5000": [1]}}',
        '{"version": 1, "fixes": {"abc": {}}}',
        '{"version": 1, "fixes": {"5000": {"method": "snat-zone", "backend": "nftables", '
        '"started": 1, "complete": true, "steps": [1]}}}',
        '{"version": 1, "fixes": {"5000": {"method": "snat-zone", "backend": "nftables", '
        '"started": 1, "complete": true, "steps": {"a": 1}}}}',
        '{"version": 1, "fixes": {"5000": {"method": "snat-zone", "backend": "nftables", '
        '"started": 1, "complete": true, "steps": [{"status": "weird", "step": {}}]}}}',
        '{"version": 1, "fixes": {"5000": {"method": "snat-zone", "backend": "nftables", '
        '"started": 1, "complete": true, "notes": 5, "steps": []}}}',
        '{"version": 1, "fixes": {"5000": {"method": "snat-zone", "backend": "nftables", '
        '"started": 1, "complete": true, "steps": [{"status": "done", "step": {"spec": 5}}]}}}',
    ],
)
def test_a_state_file_of_the_wrong_shape_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    """Issue 9 item 6: valid JSON, wrong structure: an error a user can act on, never an
    internal AttributeError."""
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    (tmp_path / "netns-cookie-1.json").write_text(content)
    with pytest.raises(CtfixError) as err:
        fixstate.FixState.load("host", key="netns-cookie-1")
    assert type(err.value) is CtfixError
    assert str(tmp_path / "netns-cookie-1.json") in err.value.message
    assert err.value.hint is not None and "--status" in err.value.hint
    assert "\n" not in err.value.one_line()
    # QA F22: the file's own terms, never Python's type names ("holds NoneType"), and
    # one way out for every shape.
    for python_word in (
        "NoneType", "'list'", "'dict'", "'int'", "'str'", "object has no", "subscriptable"
    ):
        assert python_word not in err.value.message, err.value.message
    assert err.value.hint == fixstate._malformed("x", "y").hint


def _lock_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.lock"))


def test_the_lock_file_goes_when_no_record_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QA F22: a run that leaves no record (a refusal, a rollback, the last revert)
    leaves no lock file either; one that leaves a record keeps it beside the record."""
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    with fixstate.FixState.locked("host", "netns-cookie-1") as state:
        assert _lock_files(tmp_path) == ["netns-cookie-1.lock"]
        assert state.fixes == {}
    assert _lock_files(tmp_path) == []
    (tmp_path / "netns-cookie-1.json").write_text('{"version": 1, "fixes": {}}')
    with fixstate.FixState.locked("host", "netns-cookie-1"):
        pass
    assert _lock_files(tmp_path) == ["netns-cookie-1.lock"]  # a record is there
    (tmp_path / "netns-cookie-1.json").unlink()
    with fixstate.FixState.locked("host", "netns-cookie-1"):
        pass
    assert _lock_files(tmp_path) == []


def test_a_waiter_on_a_lock_file_unlinked_by_its_holder_locks_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removing the lock file must not break the lock: a ctfix that waited on the old
    file (unlinked by the holder before it) must lock the file the path names now, or
    a third ctfix opening the new file would hold the lock alongside it."""
    import fcntl
    import os

    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    lock = tmp_path / "netns-cookie-1.lock"
    calls: list[int] = []
    real = locks.flock_within

    def after_the_holder_unlinked(fd: int, timeout: float) -> bool:
        got = real(fd, timeout)
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:
            lock.unlink()  # what the holder before us did while we waited on this fd
        return got

    monkeypatch.setattr(fixstate, "flock_within", after_the_holder_unlinked)
    with fixstate.FixState.locked("host", "netns-cookie-1", timeout=2):
        assert len(calls) == 2  # locked again, the file the path names now
        third = os.open(lock, os.O_RDWR)  # a third ctfix, on the file the path names
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(third)
