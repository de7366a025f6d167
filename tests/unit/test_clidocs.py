"""The committed man page and completions are what the parser generates today."""

from __future__ import annotations

import re
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


def test_the_man_page_has_the_sections_a_man_reader_looks_for(generated: dict[str, str]) -> None:
    """QA F15: per-command examples as written (not re-filled under COMMENTS), EXIT
    STATUS (fix's 128+N above all), FILES, ENVIRONMENT, SEE ALSO."""
    man = generated["man"]
    headings = [line for line in man.splitlines() if line.startswith(".SH")]
    for section in ("EXAMPLES", "EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert f".SH {section}" in headings
    assert ".SH COMMENTS" not in headings
    for name in COMMANDS:
        assert rf".SH EXAMPLES \fI\,'ctfix {name}'\/\fR" in headings, name
        assert rf"\fBctfix {name}\fR" in man.split(".SH EXIT STATUS")[1], name
    status = man.split(".SH EXIT STATUS")[1].split(".SH ")[0]
    assert "128+N" in status and "INEFFECTIVE" in status
    examples = man.split(r".SH EXAMPLES \fI\,'ctfix fix'\/\fR")[1].split(".SH ")[0]
    assert examples.index(".nf") < examples.index(r"ctfix fix 5000 \-\-method snat\-zone")
    assert r"/run/ctfix/fix/*.json" in man


def test_every_environment_variable_the_code_reads_is_in_the_man_page(
    generated: dict[str, str],
) -> None:
    from ctfix.clidocs import ENVIRONMENT
    from ctfix.commands.watch_loop import SIGNAL_AT_ENV
    from ctfix.commands.watch_ns import RCVBUF_ENV
    from ctfix.platform.remedy import PAUSE_ENV

    read: set[str] = set()
    for path in (ROOT / "ctfix").rglob("*.py"):
        text = path.read_text()
        read |= set(re.findall(r"""(?:environ|env)\.get\(\s*["']([A-Z_]+)["']""", text))
        read |= set(re.findall(r"""environ\[\s*["']([A-Z_]+)["']\s*\]""", text))
    documented = {name for name, _said in ENVIRONMENT}
    tests_only = {PAUSE_ENV, SIGNAL_AT_ENV, RCVBUF_ENV}
    assert read - tests_only <= documented, read - tests_only - documented
    environment = generated["man"].split(".SH ENVIRONMENT")[1].split(".SH ")[0]
    for name in documented:
        assert rf"\fB{name}\fR" in environment


def test_netns_completes_ip_netns_names_in_bash_and_zsh(generated: dict[str, str]) -> None:
    for shell in ("bash", "zsh"):
        assert "_ctfix_netns()" in generated[shell] and "ip netns list" in generated[shell]
    assert "_shtab_ctfix_explain___netns_COMPGEN=_ctfix_netns" in generated["bash"]
    assert "--netns" in generated["zsh"] and ":_ctfix_netns" in generated["zsh"]
