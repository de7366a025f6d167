"""Hostile rules files (issue 9 item 7): limits a user would expect, each a
`file:line` error, and patterns that cannot hang explain."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctfix.core import rules
from ctfix.platform import rules_files

ENTRY = """version: 1
services:
  - id: hostile
    name: a hostile entry
    cmdline_patterns: [{pattern}]
    ports: [7]
    affected_when_wildcard: true
    why: it is a test
    fix: none
    reference: https://example.org/
    confidence: low
"""


def test_deep_nesting_is_a_file_line_error_not_a_recursion_error() -> None:
    text = "version: 1\nservices:\n  - " + "[" * 100_000 + "]" * 100_000 + "\n"
    with pytest.raises(rules.RuleError) as err:
        rules.parse(text, "deep.yaml")
    assert err.value.message.startswith("deep.yaml:3: ")
    assert "nested deeper than" in err.value.message


def test_a_file_too_big_for_a_rules_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("w") as fh:
        fh.write("version: 1\nservices:\n")
        fh.write("# padding\n" * (rules.MAX_FILE_BYTES // 10 + 1))
    with pytest.raises(rules.RuleError) as err:
        rules_files.load_file(big, display="big.yaml")
    assert err.value.message.startswith("big.yaml: ")
    assert "at most" in err.value.message


def test_a_catastrophic_pattern_loads_and_cannot_hang_matching() -> None:
    [rule] = rules.parse(ENTRY.format(pattern="'(x+x+)+y'"), "hostile.yaml")
    kb = rules.KnowledgeBase((rule,))
    assert kb.match(None, ["x" * 30_000]) is None
    assert kb.match(None, ["x" * 30_000 + "y"]) is not None


def test_a_pattern_that_needs_backtracking_is_a_file_line_error() -> None:
    with pytest.raises(rules.RuleError) as err:
        rules.parse(ENTRY.format(pattern=r"'(a)\1'"), "backref.yaml")
    assert err.value.message.startswith("backref.yaml:5: ")
    assert "back-reference" in err.value.message


def test_the_builtin_rules_still_load() -> None:
    assert rules_files.load().entries
