"""Regular expressions for the knowledge base that cannot hang: a bounded matcher.

Python's `re` backtracks: `(x+x+)+y` against a long run of x takes exponential time,
so a rules file (somebody else's, or a typo) could hang `ctfix explain` for ever.
Patterns here are parsed with Python's own regex parser and run as an automaton
(Thompson's construction, simulated with state sets and a cache of the steps):
time is linear in the text, whatever the pattern, and the same syntax as `re`
means the same matches, for the part of it that needs no backtracking.

Know before changing: what cannot be run without backtracking is refused when the
rules are loaded, with the reason (back-references, look-around, possessive and
atomic groups, inline flags other than `(?i)`); so is a pattern whose automaton
would exceed MAX_STATES (`a{1000}{1000}`). `search` only answers whether the pattern
occurs: no groups, no positions, which is all the knowledge base needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: states of one compiled pattern at most (an `x{n}` costs n copies of x)
MAX_STATES = 4000
_CACHE_MAX = 20000

# Instruction kinds.
_CHAR, _SPLIT, _JMP, _ASSERT, _MATCH = range(5)

Predicate = Callable[[str], bool]
#: (opcode, argument) from re's parser: its internals are untyped
Item = tuple[Any, Any]
#: what the zero-width assertions may ask at a position: start, end, before a last
#: newline, a word character before, a word character here
Context = tuple[bool, bool, bool, bool, bool] | None


def _equals(code: int) -> Predicate:
    return lambda c: ord(c) == code


def _differs(code: int) -> Predicate:
    return lambda c: ord(c) != code


def _between(low: int, high: int) -> Predicate:
    return lambda c: low <= ord(c) <= high


class PatternError(ValueError):
    """The pattern is not one this matcher runs (the text says why)."""


class InvalidPattern(PatternError):
    """The pattern is not a regular expression at all (re's own message)."""


def _parse(pattern: str) -> tuple[list[Item], int]:
    from re import _parser  # type: ignore[attr-defined]  # re's own parser, stable in 3.11+

    try:
        parsed = _parser.parse(pattern)
    except re.error as err:
        raise InvalidPattern(str(err)) from None
    return list(parsed), int(parsed.state.flags)


def _word(char: str) -> bool:
    return char.isalnum() or char == "_"


_CATEGORIES: dict[str, Predicate] = {
    "CATEGORY_DIGIT": str.isdecimal,
    "CATEGORY_NOT_DIGIT": lambda c: not c.isdecimal(),
    "CATEGORY_SPACE": str.isspace,
    "CATEGORY_NOT_SPACE": lambda c: not c.isspace(),
    "CATEGORY_WORD": _word,
    "CATEGORY_NOT_WORD": lambda c: not _word(c),
}


@dataclass
class _Builder:
    ignore_case: bool
    program: list[tuple[int, Any, Any]] = field(default_factory=list)
    asserts: bool = False

    def emit(self, kind: int, a: Any = None, b: Any = None) -> int:
        if len(self.program) >= MAX_STATES:
            raise PatternError(f"the pattern is too large (more than {MAX_STATES} states)")
        self.program.append((kind, a, b))
        return len(self.program) - 1

    def char(self, test: Predicate) -> None:
        if self.ignore_case:
            plain = test

            def test(c: str) -> bool:
                return plain(c) or plain(c.lower()) or plain(c.upper())

        self.emit(_CHAR, test)

    def sequence(self, items: list[Item]) -> None:
        for op, arg in items:
            self.node(str(op), arg)

    def node(self, op: str, arg: Any) -> None:
        if op == "LITERAL":
            self.char(_equals(arg))
        elif op == "NOT_LITERAL":
            self.char(_differs(arg))
        elif op == "ANY":
            self.char(lambda c: c != "\n")
        elif op == "IN":
            self.char(_in(list(arg)))
        elif op == "SUBPATTERN":
            _group, add_flags, del_flags, body = arg
            if add_flags & ~re.IGNORECASE or del_flags:
                raise PatternError("inline flags other than (?i) are not supported")
            saved = self.ignore_case
            self.ignore_case = saved or bool(add_flags & re.IGNORECASE)
            self.sequence(list(body))
            self.ignore_case = saved
        elif op == "BRANCH":
            self.branch([list(b) for b in arg[1]])
        elif op in ("MAX_REPEAT", "MIN_REPEAT"):
            low, high, body = arg
            self.repeat(int(low), int(high), list(body))
        elif op == "AT":
            if str(arg) not in _ASSERTIONS:
                raise PatternError(f"{arg} is not supported")
            self.asserts = True
            self.emit(_ASSERT, str(arg))
        else:
            raise PatternError(f"{_NAMES.get(op, op)} is not supported (it needs backtracking)")

    def branch(self, alternatives: list[list[Item]]) -> None:
        jumps = []
        for index, alternative in enumerate(alternatives):
            last = index == len(alternatives) - 1
            split = None if last else self.emit(_SPLIT)
            self.sequence(alternative)
            if not last:
                jumps.append(self.emit(_JMP))
                assert split is not None
                self.program[split] = (_SPLIT, split + 1, len(self.program))
        for jump in jumps:
            self.program[jump] = (_JMP, len(self.program), None)

    def repeat(self, low: int, high: int, body: list[Item]) -> None:
        for _ in range(low):
            self.sequence(body)
        if high == _MAXREPEAT:
            start = self.emit(_SPLIT)
            self.sequence(body)
            self.emit(_JMP, start)
            self.program[start] = (_SPLIT, start + 1, len(self.program))
            return
        ends = []
        for _ in range(high - low):
            ends.append(self.emit(_SPLIT))
            self.sequence(body)
        for split in ends:
            self.program[split] = (_SPLIT, split + 1, len(self.program))


_ASSERTIONS = frozenset({
    "AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING", "AT_BOUNDARY",
    "AT_NON_BOUNDARY",
})
_NAMES = {
    "GROUPREF": "a back-reference",
    "GROUPREF_EXISTS": "a conditional group",
    "ASSERT": "a look-ahead/look-behind",
    "ASSERT_NOT": "a negative look-ahead/look-behind",
    "POSSESSIVE_REPEAT": "a possessive repeat",
    "ATOMIC_GROUP": "an atomic group",
}
_MAXREPEAT = int(re._constants.MAXREPEAT)  # type: ignore[attr-defined]


def _in(items: list[Item]) -> Predicate:
    negate = bool(items) and str(items[0][0]) == "NEGATE"
    tests: list[Predicate] = []
    for op, arg in items[1:] if negate else items:
        kind = str(op)
        if kind == "LITERAL":
            tests.append(_equals(arg))
        elif kind == "RANGE":
            tests.append(_between(*arg))
        elif kind == "CATEGORY":
            tests.append(_CATEGORIES[str(arg)])
        else:
            raise PatternError(f"{kind} in a character class is not supported")

    def member(c: str) -> bool:
        return any(test(c) for test in tests) != negate

    return member


class Pattern:
    """A compiled pattern; `search(text)`: does it occur in text?"""

    def __init__(self, pattern: str) -> None:
        items, flags = _parse(pattern)
        if flags & ~(re.IGNORECASE | re.UNICODE):
            raise PatternError("flags other than (?i) are not supported")
        builder = _Builder(bool(flags & re.IGNORECASE))
        builder.sequence(items)
        builder.emit(_MATCH)
        self.pattern = pattern
        self._program = builder.program
        self._asserts = builder.asserts
        self._closures: dict[tuple[frozenset[int], Context], frozenset[int]] = {}
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def _closure(self, threads: frozenset[int], context: Context) -> frozenset[int]:
        """Every state reachable from threads (and a new start) without a character."""
        program = self._program
        seen: set[int] = set()
        stack = [0, *threads]
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            kind, a, b = program[pc]
            if kind == _SPLIT:
                stack += (a, b)
            elif kind == _JMP:
                stack.append(a)
            elif kind == _ASSERT and _holds(str(a), context):
                stack.append(pc + 1)
        return frozenset(pc for pc in seen if program[pc][0] in (_CHAR, _MATCH))

    def search(self, text: str) -> bool:
        program = self._program
        closures, steps = self._closures, self._steps
        if len(closures) + len(steps) > _CACHE_MAX:
            closures.clear()
            steps.clear()
        match = len(program) - 1
        threads: frozenset[int] = frozenset()
        size = len(text)
        for index in range(size + 1):
            context = _context(text, index, size) if self._asserts else None
            key = (threads, context)
            closed = closures.get(key)
            if closed is None:
                closed = closures[key] = self._closure(threads, context)
            if match in closed:
                return True
            if index == size:
                return False
            char = text[index]
            step = (closed, char)
            following = steps.get(step)
            if following is None:
                following = steps[step] = frozenset(
                    pc + 1 for pc in closed if pc != match and program[pc][1](char)
                )
            threads = following
        return False


def _context(text: str, index: int, size: int) -> Context:
    """What the zero-width assertions can ask at text[index]."""
    before = index > 0 and _word(text[index - 1])
    here = index < size and _word(text[index])
    return (
        index == 0,
        index == size,
        index == size - 1 and text[index] == "\n",
        before,
        here,
    )


def _holds(at: str, context: Context) -> bool:
    assert context is not None  # computed whenever the pattern has assertions
    start, end, last_newline, before, here = context
    if at in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
        return bool(start)
    if at == "AT_END":
        return bool(end or last_newline)
    if at == "AT_END_STRING":
        return bool(end)
    if at == "AT_BOUNDARY":
        return bool(before != here)
    if at == "AT_NON_BOUNDARY":
        return bool(before == here)
    raise PatternError(f"{at} is not supported")


_COMPILED: dict[str, Pattern] = {}


def compile_pattern(pattern: str) -> Pattern:
    """The compiled pattern (cached); PatternError when it cannot be run safely."""
    found = _COMPILED.get(pattern)
    if found is None:
        found = _COMPILED[pattern] = Pattern(pattern)
    return found


def search(pattern: str, text: str) -> bool:
    return compile_pattern(pattern).search(text)
