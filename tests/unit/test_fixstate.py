"""The fix state file as a user meets it when something is wrong with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ctfix.errors import CtfixError
from ctfix.platform import fixstate


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
