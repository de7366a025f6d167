"""The README's production install, from a fresh clone, into a temporary venv: a
regular (not editable) `pip install`, offline, from the wheels scripts/setup made."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctfix.cli import COMMANDS
from ctfix.clidocs import OUTPUTS
from tests.fresh_clone import ROOT, WHEELS, clone_tree, missing_wheels

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv with ctfix installed from a clone, as `pip install .` does."""
    reason = missing_wheels()
    if reason is not None:
        pytest.skip(reason)
    python = SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else sys.executable
    tmp = tmp_path_factory.mktemp("install")
    clone = clone_tree(tmp / "clone")
    venv = tmp / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
         "--no-index", "--find-links", str(WHEELS), str(clone)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    shutil.rmtree(clone)  # the install must not lean on its source
    yield venv


def _run(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        cwd=venv,  # not the repository: nothing may be imported from there
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=False,
    )


def test_the_installed_command_answers(installed: Path) -> None:
    version = _run(installed, "ctfix", "-V")
    assert version.returncode == 0 and version.stdout.startswith("ctfix ")
    helped = _run(installed, "ctfix", "--help")
    assert helped.returncode == 0
    assert all(f"    {name} " in helped.stdout for name in COMMANDS)


def test_man_page_and_completions_are_installed(installed: Path) -> None:
    for relative in OUTPUTS.values():
        assert (installed / relative).read_text() == (ROOT / relative).read_text()
    if shutil.which("bash"):
        completion = installed / OUTPUTS["bash"]
        loaded = subprocess.run(
            ["bash", "-c", f"source {completion} && complete -p ctfix"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert loaded.returncode == 0 and "ctfix" in loaded.stdout


def test_the_knowledge_base_comes_with_the_install(installed: Path) -> None:
    code = (
        "import ctfix, sys\n"
        "from ctfix.platform import rules_files as rules\n"
        "kb = rules.load()\n"
        "print(ctfix.__file__)\n"
        "print(rules.builtin_dir())\n"
        "print(' '.join(sorted(r.id for r in kb.entries)))\n"
    )
    loaded = _run(installed, "python", "-c", code)
    assert loaded.returncode == 0, loaded.stderr
    module, rules_dir, ids = loaded.stdout.splitlines()
    assert module.startswith(str(installed))
    assert rules_dir == str(installed / "share" / "ctfix" / "rules")
    from ctfix.platform import rules_files as rules

    assert ids.split() == sorted(r.id for r in rules.load().entries)


def test_the_systemd_unit_runs_the_installed_command(installed: Path, tmp_path: Path) -> None:
    unit = (ROOT / "deploy" / "systemd" / "ctfix-watch.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    program = exec_start.split("=", 1)[1].split()[0]
    assert program == "/opt/ctfix/bin/ctfix"  # the README's install path
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/opt/ctfix/bin/ctfix"]' in dockerfile
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the unit file is not verified")
    copy = tmp_path / "ctfix-watch.service"
    copy.write_text(unit.replace("/opt/ctfix", str(installed)))
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    ours = [line for line in verified.stderr.splitlines() if "ctfix-watch.service" in line]
    assert verified.returncode == 0 and ours == [], verified.stderr
