"""The lab's front door without root: one line, exit 2, nothing created."""

from __future__ import annotations

import pytest

from ctfix.cli import main
from ctfix.lab.topology import leftover_namespaces


def test_lab_without_privilege_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ctfix.commands.common as common

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr(common, "_has_capability", lambda name: False)
    before = leftover_namespaces()
    assert main(["lab"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "CAP_SYS_ADMIN" in err[0] and "root" in err[0]
    assert leftover_namespaces() == before


def test_lab_bad_port_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["lab", "--port", "70000"])
    assert exc.value.code == 2
    assert "not a UDP port" in capsys.readouterr().err
