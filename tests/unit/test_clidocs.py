"""The committed man page and completions are what the parser generates today."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctfix.cli import COMMANDS
from ctfix.clidocs import OUTPUTS, generate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return generate()


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_committed_file_is_not_stale(kind: str, generated: dict[str, str]) -> None:
    committed = (ROOT / OUTPUTS[kind]).read_text()
    assert committed == generated[kind], (
        f"{OUTPUTS[kind]} is stale: run scripts/gen-docs and commit the result"
    )


def test_every_command_and_its_options_are_documented_and_completed(
    generated: dict[str, str],
) -> None:
    for name in COMMANDS:
        assert f"ctfix {name}" in generated["man"].replace("\\fB", "").replace("\\fR", "")
        assert f"_shtab_ctfix_{name}_option_strings" in generated["bash"]
    # Only the chosen command's arguments exist in a normal parse: generation must
    # have built them all (explain's --listen, fix's --method, serve's --port).
    for option in ("--listen", "--method", "--port"):
        assert option in generated["bash"] and option in generated["zsh"]
