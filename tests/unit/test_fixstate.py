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
