"""Text that fits the reader's terminal: its width, and filling at it, never mid-word.

Know before changing: only a terminal (or $COLUMNS, as `ls` and `git` honour it) has
a width; output to a pipe or a file gets no width (None), and one-line records stay
one line there, for grep and scripts.
"""

from __future__ import annotations

import os
import re
import shutil
import textwrap
from typing import TextIO

#: narrower terminals still get this many columns (a word per line helps no one)
MIN_WIDTH = 40


def terminal_width(stream: TextIO | None = None) -> int | None:
    """The width to fill text for `stream`: $COLUMNS, else the terminal's when the
    stream is one, else None (a pipe or a file)."""
    tty = stream is not None and hasattr(stream, "isatty") and stream.isatty()
    if not tty and "COLUMNS" not in os.environ:
        return None
    return max(MIN_WIDTH, shutil.get_terminal_size((80, 24)).columns)


def fill(text: str, width: int, indent: str = "", hang: str | None = None) -> str:
    """Each line of text filled at width, words never broken; continuation lines
    start with `hang` (default: `indent`); blank lines stay blank."""
    return "\n".join(
        textwrap.fill(
            paragraph,
            width=width,
            initial_indent=indent,
            subsequent_indent=indent if hang is None else hang,
            break_long_words=False,
            break_on_hyphens=False,
        )
        if paragraph.strip()
        else ""
        for paragraph in text.splitlines()
    )


def fit_lines(text: str, width: int) -> str:
    """A report whose every line says one thing (fix's --apply, --status): each line
    that does not fit is filled at its own indent, its continuation 4 deeper."""
    out = []
    for line in text.splitlines():
        lead = line[: len(line) - len(line.lstrip())]
        out.append(line if len(line) <= width else fill(line.strip(), width, lead, lead + " " * 4))
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def cut(text: str, width: int) -> str:
    """One line kept to width on purpose: cut at a word's end, marked with "..."
    (where the full text is said elsewhere: scan's rows, before each write-up)."""
    if len(text) <= width:
        return text
    kept = text[: max(0, width - 3)]
    if " " in kept.strip() and text[len(kept)] != " ":
        kept = kept.rsplit(" ", 1)[0]
    return kept.rstrip() + "..."


#: a gap of two spaces or more: where a two-column line's second column starts
_GAP = re.compile(r"(?<=\S) {2,}(?=\S)")
#: a comment column further right than this share of the width goes under its item
_FAR_RIGHT = 0.6


def reflow(text: str, width: int) -> str:
    """Preformatted text (help's descriptions and epilogs) made to fit `width`; what
    already fits is left as written. Unindented paragraphs are refilled. An indented
    item in two columns (`  ctfix lab      what it does`, or the command alone on
    its line and what it does on deeper-indented lines below) keeps its first column
    and refills the second in place, or under the item (6 deeper) when that column
    is too far right; other indented lines are filled at their indent. Never
    mid-word."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            out.append("")
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        block = [line]
        if not indent:  # a paragraph: up to a blank, indented or heading line
            while (
                not block[-1].endswith(":")
                and i + len(block) < len(lines)
                and lines[i + len(block)][:1] not in ("", " ")
            ):
                block.append(lines[i + len(block)])
            out += block if _fits(block, width) else fill(" ".join(block), width).splitlines()
        else:
            below = _deeper(lines, i + 1, indent)
            block += below
            column = len(below[0]) - len(below[0].lstrip()) if below else None
            out += block if _fits(block, width) else _item(block, column, width).splitlines()
        i += len(block)
    return "\n".join(out)


def _deeper(lines: list[str], start: int, indent: int) -> list[str]:
    """The lines from `start` indented alike and deeper than `indent`: a comment's
    continuation."""
    found: list[str] = []
    for line in lines[start:]:
        depth = len(line) - len(line.lstrip())
        if not line.strip() or depth <= indent:
            break
        if found and depth != len(found[0]) - len(found[0].lstrip()):
            break
        found.append(line)
    return found


def _fits(block: list[str], width: int) -> bool:
    return all(len(line) <= width for line in block)


def _item(block: list[str], column: int | None, width: int) -> str:
    """One indented item refilled (see reflow); `column`: where its continuation
    lines start (None: it has none)."""
    first = block[0]
    lead = " " * (len(first) - len(first.lstrip()))
    gaps = [gap.end() for gap in _GAP.finditer(first)]
    rest = [line.strip() for line in block[1:]]
    if gaps:
        # the gap the continuation lines start under (or the nearest), else the last
        at = gaps[-1] if column is None else min(gaps, key=lambda gap: abs(gap - column))
        comment = " ".join([first[at:], *rest])
        if at <= width * _FAR_RIGHT:
            return fill(comment, width, first[:at], " " * (column or at))
        head, deeper = first[:at].rstrip(), lead + " " * 6
        return fill(head.strip(), width, lead, deeper) + "\n" + fill(comment, width, deeper)
    head = fill(first.strip(), width, lead, lead + " " * 6)
    if column is None:
        return head
    return head + "\n" + fill(" ".join(rest), width, " " * column)


def fill_usage(usage: str, prog: str, width: int) -> str:
    """argparse's `usage: PROG ARGS...` (and its further `PROG ARGS...` lines), each
    filled at width, broken only between top-level words (never inside
    `[--apply [--listen S]]`), continuation lines under the first argument."""
    out = []
    for n, line in enumerate(usage.strip().splitlines()):
        lead = "usage: " if n == 0 else " " * len("usage: ")
        said = line.strip().removeprefix("usage:").strip().removeprefix(prog)
        words, depth, current = [], 0, ""
        for char in said:
            depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(char, 0)
            current += "\0" if char == " " and depth else char
            if char == " " and not depth:
                words.append(current.strip())
                current = ""
        words.append(current.strip())
        glued = " ".join([lead + prog, *(word for word in words if word)])
        out.append(fill(glued, width, "", " " * (len(lead + prog) + 1)).replace("\0", " "))
    return "\n".join(out)
