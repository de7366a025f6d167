"""The man page and the bash and zsh completions, generated from the parser itself.

`scripts/gen-docs` writes them to share/ (committed, installed by `pip install` as
data files: share/man/man1/ctfix.1, share/bash-completion/completions/ctfix,
share/zsh/site-functions/_ctfix); tests/unit/test_clidocs.py fails when they are stale.

Know before changing: generation needs every command's arguments
(`build_parser(every_command=True)`; the CLI itself builds only the chosen command's,
for speed), a fixed help width (argparse wraps at $COLUMNS) and no date in the man
page, so that the output depends on the code alone. shtab and argparse-manpage are
development dependencies, imported here only. argparse-manpage leaves commands'
epilogs out and fills every text as prose; so each epilog (examples, notes) becomes
a section of its own, indented blocks (examples, usage, exit-status tables) are kept
as preformatted text at MAN_WIDTH, and EXIT STATUS is each command's own exit-status
text, found in its help.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ctfix import __version__

#: generated file -> its path under the repository's (and the install prefix's) share/
OUTPUTS = {
    "man": Path("share/man/man1/ctfix.1"),
    "bash": Path("share/bash-completion/completions/ctfix"),
    "zsh": Path("share/zsh/site-functions/_ctfix"),
}

#: the man page's text: an 80-column terminal less man's indent (7) and a margin
MAN_WIDTH = 72

#: environment variables a user may set, and what they change (test hooks are not
#: here: tests/unit/test_clidocs.py checks every variable the code reads is one or the
#: other)
ENVIRONMENT = (
    ("CTFIX_STATE_DIR", "where ctfix fix records what it made (default {state})"),
    ("CTFIX_DEBUG", "any value: as --debug, a traceback with an error (same exit status)"),
    (
        "DOCKER_HOST",
        "Docker's API socket (unix:// only: a tcp:// or ssh:// one is not followed), "
        "asked for container names and --netns container:NAME",
    ),
    ("CONTAINER_HOST", "Podman's API socket (unix://), as DOCKER_HOST"),
    ("CONTAINER_RUNTIME_ENDPOINT", "a CRI runtime's socket (unix://): containerd or CRI-O"),
    (
        "XTABLES_LOCKFILE",
        "the lock ctfix fix holds while it changes iptables-legacy rules, as iptables -w "
        "does (default {xtables})",
    ),
    ("NO_COLOR", "any value: no colours"),
    ("TERM", "dumb (or unset): watch draws no status line"),
    ("COLUMNS", "the width text is filled at (else the terminal's; a pipe gets one line each)"),
)

SEE_ALSO = (
    r"\fBconntrack\fR(8), \fBnft\fR(8), \fBiptables\fR(8), \fBip\-netns\fR(8), "
    r"\fBip\-rule\fR(8), \fBss\fR(8), \fBip\fR(7) (IP_PKTINFO). "
    "The project's README.md, docs/json.md (every JSON document and reason code) and "
    "docs/runbooks/ (what to do for each finding)."
)

#: --netns completes the `ip netns` names, and container:NAME (Docker) and pid:PID
NETNS_COMPLETION = {"bash": "_ctfix_netns", "zsh": "_ctfix_netns"}
COMPLETION_PREAMBLE = {
    "bash": r"""
_ctfix_netns() {
  local words
  words="$(ip netns list 2>/dev/null | cut -d' ' -f1) container: pid:"
  if [[ $1 == container:* ]] && command -v docker >/dev/null 2>&1; then
    words="$words $(docker ps --format 'container:{{.Names}}' 2>/dev/null)"
  fi
  compgen -W "$words" -- "$1"
}
""",
    "zsh": r"""
_ctfix_netns() {
  local -a names
  names=(${(f)"$(ip netns list 2>/dev/null | cut -d' ' -f1)"})
  (( $+commands[docker] )) &&
    names+=(${(f)"$(docker ps --format 'container:{{.Names}}' 2>/dev/null)"})
  _describe 'network namespace' names
  compadd -S '' container: pid:
}
""",
}


def generate() -> dict[str, str]:
    """Every generated file's text, by kind ("man", "bash", "zsh")."""
    import shtab

    from ctfix.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(MAN_WIDTH + 2)  # argparse keeps 2 columns of margin
    try:
        parser = build_parser([], every_command=True)
        texts = {"man": _manpage(parser)}
        for action in _actions(parser):
            if action.dest == "netns":
                action.complete = NETNS_COMPLETION  # type: ignore[attr-defined]  # shtab's
        for shell in ("bash", "zsh"):
            texts[shell] = shtab.complete(
                parser, shell=shell, preamble=COMPLETION_PREAMBLE[shell]
            )
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return {kind: text if text.endswith("\n") else text + "\n" for kind, text in texts.items()}


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    yield from parser._actions
    for sub in _commands(parser).values():
        yield from sub._actions


def _manpage(parser: argparse.ArgumentParser) -> str:
    from argparse_manpage.manpage import Manpage

    from ctfix.platform.engines import engines
    from ctfix.platform.fixstate import DEFAULT_DIR
    from ctfix.platform.iptables_legacy import XTABLES_LOCK
    from ctfix.render.width import reflow

    commands = _commands(parser)
    examples, parser.epilog = parser.epilog or "", None  # our own EXAMPLES section
    for sub in commands.values():  # argparse-manpage prints these as they are
        sub.description = reflow(sub.description or "", MAN_WIDTH)
    manpage = Manpage(parser)
    manpage.date = ""
    manpage.source = f"ctfix {__version__}"
    manpage.manual = "User Commands"
    manpage.description = (
        "find, explain and fix UDP services that answer from the wrong source address"
    )
    statuses: list[str] = []
    for name, sub in commands.items():
        status = _exit_status(sub)
        if status:
            statuses += [".TP", rf"\fBctfix {name}\fR", *_roff(status, MAN_WIDTH - 7)]
    variables = [
        line
        for name, said in ENVIRONMENT
        for line in (
            ".TP",
            rf"\fB{name}\fR",
            _escape(said.format(state=DEFAULT_DIR, xtables=XTABLES_LOCK)),
        )
    ]
    sockets = ", ".join(dict.fromkeys(engine.path for engine in engines({})))
    files = [
        ".TP",
        rf"\fI{_escape(DEFAULT_DIR)}/*.json\fR",
        _escape(
            "What ctfix fix made in each network namespace, one file per namespace (named "
            "by its netns cookie), with a .lock file beside it. Under /run: gone at "
            "reboot, as are the kernel objects it lists. The kernel is the truth: ctfix "
            "finds its objects by their marks without it."
        ),
        ".TP",
        r"\fI<prefix>/share/ctfix/rules/*.yaml\fR",
        _escape("The knowledge base of UDP services (--rules DIR adds or replaces entries)."),
        ".TP",
        rf"\fI{_escape(sockets)}\fR",
        _escape(
            "Container engines' API sockets, read for container names (DOCKER_HOST, "
            "CONTAINER_HOST and CONTAINER_RUNTIME_ENDPOINT name others)."
        ),
        ".TP",
        rf"\fI{_escape(XTABLES_LOCK)}\fR",
        "The xtables lock (XTABLES_LOCKFILE).",
    ]
    for heading, lines in (
        ("EXAMPLES", _roff(examples.removeprefix("examples:\n"), MAN_WIDTH)),
        ("EXIT STATUS", _roff(EVERY_STATUS, MAN_WIDTH) + statuses),
        ("ENVIRONMENT", variables),
        ("FILES", files),
        ("SEE ALSO", [SEE_ALSO]),
    ):
        manpage.add_section(heading, "=", "\n".join(lines))
    text = _preformatted(str(manpage))
    for name, sub in commands.items():
        text = _after_options(text, name, _epilog_section(name, sub.epilog or ""))
    return text


#: what every command shares, before each one's own exit statuses
EVERY_STATUS = (
    "Every command exits 2 on an error (bad input, a missing privilege or kernel "
    "feature, no such namespace) with one line on stderr that says what to do, and, "
    "unless said otherwise below, 130 when Ctrl-C interrupts it. Each command's own "
    "statuses:"
)


def _exit_status(parser: argparse.ArgumentParser) -> str:
    """The paragraph of a command's help that gives its exit statuses, as written."""
    for text in (parser.description or "", parser.epilog or ""):
        for paragraph in re.split(r"\n\s*\n", text):
            if "exit status" in paragraph.splitlines()[0].lower():
                return paragraph
    return ""


def _epilog_section(name: str, epilog: str) -> list[str]:
    """A command's epilog as a section: `EXAMPLES 'ctfix fix'` (its first heading)."""
    if not epilog.strip():
        return []
    first, _, rest = epilog.partition("\n")
    heading = first.rstrip(":").upper() if first.endswith(":") else "NOTES"
    body = rest if first.endswith(":") else epilog
    return ["", rf".SH {heading} \fI\,'ctfix {name}'\/\fR", *_roff(body, MAN_WIDTH)]


def _after_options(text: str, name: str, section: list[str]) -> str:
    """`section` inserted at the end of the command's OPTIONS section."""
    if not section:
        return text
    lines = text.splitlines()
    start = lines.index(rf".SH OPTIONS \fI\,'ctfix {name}'\/\fR")
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].startswith(".SH")), len(lines)
    )
    while end > start and not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[:end] + section + lines[end:]) + "\n"


def _escape(text: str) -> str:
    """Text safe in roff: backslashes and hyphens escaped, no request at a line start."""
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _roff(text: str, width: int) -> list[str]:
    """Help text as roff: prose paragraphs filled by man, indented blocks (examples,
    tables) kept as written (reflowed at `width` first), a paragraph's first line that
    ends with ":" (`exit status:`) in bold."""
    from ctfix.render.width import reflow

    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", reflow(text.strip("\n"), width)):
        out.append(".PP")
        preformatted = False
        for index, line in enumerate(paragraph.splitlines()):
            if line.startswith(" ") != preformatted:
                preformatted = not preformatted
                out.append(".nf" if preformatted else ".fi")
            if index == 0 and line.endswith(":"):  # `examples:`, `exit status:`
                out += [rf"\fB{_escape(line)}\fR", ".br"]
            else:
                out.append(_escape(line))
        if preformatted:
            out.append(".fi")
    return out[1:] if out[:1] == [".PP"] else out


def _preformatted(man: str) -> str:
    """argparse-manpage fills every text: its indented lines (usage continuations,
    tables in descriptions) and each usage line go in .nf/.fi, as written."""
    out: list[str] = []
    ours = False  # inside a .nf block of our own sections
    preformatted = False
    for line in man.splitlines():
        if line in (".nf", ".fi"):
            ours = line == ".nf"
        keep = not ours and (line.startswith(" ") or line.startswith("usage: "))
        if keep != preformatted:
            preformatted = keep
            out.append(".nf" if keep else ".fi")
        out.append(line)
    if preformatted:
        out.append(".fi")
    return "\n".join(out) + "\n"


def write(root: Path) -> list[Path]:
    """Write the generated files under root (the repository); the paths written."""
    written = []
    for kind, text in generate().items():
        path = root / OUTPUTS[kind]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(__file__).resolve().parent.parent):
        print(path)
