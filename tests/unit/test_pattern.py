"""The knowledge base's bounded regex matcher (issue 9 item 7): the same answers as
Python's `re` where `re` needs no backtracking, no hang where it does, and a clear
refusal of what only backtracking can run."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctfix.core import pattern

ATOMS = ["a", "b", ".", "[ab]", "[^a]", r"\s", r"\w", r"\d", "x"]


@st.composite
def regexes(draw: st.DrawFn, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        choice = draw(st.integers(0, 5 if depth < 2 else 1))
        if choice <= 1:
            part = draw(st.sampled_from(ATOMS))
        elif choice == 2:
            part = f"({draw(regexes(depth + 1))}|{draw(regexes(depth + 1))})"
        else:
            part = f"({draw(regexes(depth + 1))})"
        part += draw(st.sampled_from(["", "*", "+", "?", "{1,2}", "*?", "{2}"]))
        parts.append(part)
    anchors = draw(
        st.sampled_from([("", ""), ("^", ""), ("", "$"), (r"\b", r"\b"), ("(^|\\s)", "")])
    )
    return anchors[0] + "".join(parts) + anchors[1]


@settings(max_examples=800, deadline=None)
@given(regexes(), st.text(alphabet="abx 1\n_", max_size=12))
def test_the_bounded_matcher_agrees_with_re(regex: str, text: str) -> None:
    assert pattern.search(regex, text) == bool(re.search(regex, text)), (regex, text)


def test_the_builtin_patterns_agree_with_re() -> None:
    for regex, text in [
        (r"(^|/)stats\.js(\s|$)", "node /srv/stats.js --port 8125"),
        (r"(^|[\s/])statsd(\s|$)", "/usr/bin/statsd"),
        (r"(^|\s)--multihome(\s|$)", "openvpn --config x --multihome"),
        (r"(^|\s)--multihome(\s|$)", "openvpn --multihomed"),
        ("(?i)NTPD", "/usr/sbin/ntpd -g"),
    ]:
        assert pattern.search(regex, text) == bool(re.search(regex, text))


def test_a_catastrophic_pattern_cannot_hang() -> None:
    """`(x+x+)+y` takes exponential time in `re` on a run of x; here it is linear (the
    test would not finish otherwise)."""
    assert pattern.search("(x+x+)+y", "x" * 20_000) is False
    assert pattern.search("(x+x+)+y", "x" * 20_000 + "y") is True
    assert pattern.search("(.*)*.*=.*;", "a=" * 5_000) is False


@pytest.mark.parametrize(
    ("regex", "why"),
    [
        (r"(a)\1", "back-reference"),
        ("(?=a)b", "look-ahead"),
        ("a++", "possessive"),
        ("(?>a)", "atomic"),
        ("(?m)^a", "flags"),
        ("(a{100}){100}", "too large"),
        ("[", "unterminated"),
    ],
)
def test_what_needs_backtracking_is_refused_with_the_reason(regex: str, why: str) -> None:
    with pytest.raises(pattern.PatternError) as err:
        pattern.Pattern(regex)
    assert why in str(err.value)
