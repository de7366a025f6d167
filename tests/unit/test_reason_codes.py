"""Every reason code ctfix can emit is documented in docs/json.md.

Scripts branch on codes, so a code nobody can look up is a broken contract. "Can
emit": every member of the diagnosis's ReasonCode, and every code written as a literal
in a `Reason(...)` or `reason(...)` call anywhere in ctfix/ (found by parsing the
source, so a new module's codes count too).
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

from ctfix.core.diagnosis.codes import ReasonCode

ROOT = Path(__file__).resolve().parents[2]


def documented() -> set[str]:
    text = (ROOT / "docs" / "json.md").read_text()
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.MULTILINE))


def literal_codes() -> dict[str, str]:
    """code -> where it is written, for every Reason(...)/reason(...) call with a
    literal code in ctfix/."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "ctfix").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in ("Reason", "reason"):
                for code in _constants(node.args[0]):
                    found[code] = f"{path.relative_to(ROOT)}:{node.lineno}"
    return found


def _constants(expr: ast.expr) -> list[str]:
    """The literal strings an expression can be: a constant, or either branch of a
    conditional expression."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return [expr.value]
    if isinstance(expr, ast.IfExp):
        return _constants(expr.body) + _constants(expr.orelse)
    return []


def test_the_scan_finds_the_codes_of_the_diagnosis() -> None:
    """The parser is not blind: it sees codes diagnose() gives."""
    found = literal_codes()
    assert {"wrong-source-seen", "client-network-exposed", "no-conntrack-evidence"} <= set(found)


def test_every_code_is_documented_and_kebab_case() -> None:
    codes = set(typing.get_args(ReasonCode)) | set(literal_codes())
    missing = sorted(codes - documented())
    assert not missing, f"reason codes missing from docs/json.md: {missing}"
    assert all(re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", c) for c in codes)


def test_every_literal_code_of_the_diagnosis_is_a_reason_code() -> None:
    """mypy checks `reason(code, ...)`; a `Reason("...")` built by hand in the
    diagnosis would bypass it."""
    members = set(typing.get_args(ReasonCode))
    stray = {
        code: where
        for code, where in literal_codes().items()
        if "core/diagnosis" in where and code not in members
    }
    assert not stray, stray
