"""The man page and the bash and zsh completions, generated from the parser itself.

`scripts/gen-docs` writes them to share/ (committed, installed by `pip install` as
data files: share/man/man1/ctfix.1, share/bash-completion/completions/ctfix,
share/zsh/site-functions/_ctfix); tests/unit/test_clidocs.py fails when they are stale.

Know before changing: generation needs every command's arguments
(`build_parser(every_command=True)`; the CLI itself builds only the chosen command's,
for speed), a fixed help width (argparse wraps at $COLUMNS) and no date in the man
page, so that the output depends on the code alone. shtab and argparse-manpage are
development dependencies, imported here only.
"""

from __future__ import annotations

import os
from pathlib import Path

from ctfix import __version__

#: generated file -> its path under the repository's (and the install prefix's) share/
OUTPUTS = {
    "man": Path("share/man/man1/ctfix.1"),
    "bash": Path("share/bash-completion/completions/ctfix"),
    "zsh": Path("share/zsh/site-functions/_ctfix"),
}


def generate() -> dict[str, str]:
    """Every generated file's text, by kind ("man", "bash", "zsh")."""
    import shtab
    from argparse_manpage.manpage import Manpage

    from ctfix.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        parser = build_parser([], every_command=True)
        manpage = Manpage(parser)
        manpage.date = ""
        manpage.source = f"ctfix {__version__}"
        manpage.manual = "User Commands"
        manpage.description = (
            "find, explain and fix UDP services that answer from the wrong source address"
        )
        texts = {"man": str(manpage)}
        for shell in ("bash", "zsh"):
            texts[shell] = shtab.complete(parser, shell=shell)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return {kind: text if text.endswith("\n") else text + "\n" for kind, text in texts.items()}


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
