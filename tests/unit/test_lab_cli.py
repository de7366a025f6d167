"""The lab's front door without root: one line, exit 2, nothing created."""

from __future__ import annotations

import pytest

from ctfix.cli import main
from ctfix.lab.topology import Topology


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The namespaces the lab asked to create (none are): compared with what this
    test's run did, not with the machine's namespaces, which other runs change."""
    asked: list[str] = []

    def create(self: Topology) -> None:
        asked.extend(self.namespaces)
        raise AssertionError("the lab began to build")

    monkeypatch.setattr(Topology, "create_namespaces", create)
    return asked


def test_lab_without_privilege_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], built: list[str]
) -> None:
    import ctfix.commands.common as common

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr(common, "_has_capability", lambda name: False)
    assert main(["lab"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "CAP_SYS_ADMIN" in err[0] and "root" in err[0]
    assert built == []


def test_lab_bad_port_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["lab", "--port", "70000"])
    assert exc.value.code == 2
    assert "not a UDP port" in capsys.readouterr().err


def test_an_ipv4_only_scenario_refuses_ipv6_before_anything_is_built(
    capsys: pytest.CaptureFixture[str], built: list[str]
) -> None:
    """QA F19: the refusal came after the lab was built and its header printed."""
    from ctfix.lab.registry import IPV4_ONLY

    for scenario in IPV4_ONLY:
        assert main(["lab", "--scenario", scenario, "--ipv6"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and "--ipv6" in err
    assert built == []


def test_keep_prints_aligned_enter_lines_and_the_ctfix_it_was_given() -> None:
    """QA F22: `# host` / `# container` were misaligned; "Try it" must use the ctfix
    the command names (an absolute path when ctfix is not on PATH)."""
    import io

    from ctfix.lab.topology import Topology, new_run_id
    from ctfix.render.lab import LabPrinter

    out = io.StringIO()
    topo = Topology(new_run_id(), ipv6=False, netfilter="nft")
    LabPrinter(out).keep(topo, 56789, "/opt/venv/bin/ctfix")
    lines = out.getvalue().splitlines()
    enter = [line for line in lines if line.startswith("  ip netns exec") and "#" in line]
    assert len(enter) == 2 and len({line.index("#") for line in enter}) == 1, enter
    tries = lines[lines.index("Try it:") + 1 : lines.index("Remove it with:")]
    assert tries and all("/opt/venv/bin/ctfix" in line for line in tries if "ctfix " in line)
    assert not any(" ctfix " in f" {line} " and "/opt/venv" not in line for line in tries)
