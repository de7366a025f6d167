"""The knowledge base from disk: the built-in `rules/` and each `--rules DIR`.

Reading files is all this does; ctfix.core.rules parses and validates the text and
merges the layers, so the knowledge base is tested without a filesystem too.

Know before changing: errors name files as users know them (`rules/dns.yaml` for a
built-in file, the `--rules` path as given for theirs), and a `--rules` directory
with no rule files is an error, not an empty layer (it is most likely a typo).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ctfix.core.rules import MAX_FILE_BYTES, KnowledgeBase, RuleError, ServiceRule, merge, parse


def builtin_dir() -> Path:
    """The built-in `rules/`: the repository's top level (an editable install or a
    checkout), else the copy a regular install puts in `<prefix>/share/ctfix/rules`."""
    import sys

    import ctfix

    checkout = Path(ctfix.__file__).resolve().parent.parent / "rules"
    installed = Path(sys.prefix) / "share" / "ctfix" / "rules"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


def load(dirs: Sequence[Path] | None = None, builtin: bool = True) -> KnowledgeBase:
    """Load the built-in rules and then each user directory (`--rules DIR`).

    A user entry replaces a built-in entry with the same id; a later user directory
    replaces an earlier one (ctfix.core.rules.merge). Raises RuleError for anything
    malformed or missing.
    """
    layers: list[list[ServiceRule]] = []
    if builtin:
        root = builtin_dir()
        if not root.is_dir():
            raise RuleError(str(root), None, "the built-in rules directory is missing")
        layers.append(_load_dir(root, display_root=Path("rules")))
    for directory in dirs or ():
        if not directory.exists():
            raise RuleError(str(directory), None, "no such rules directory")
        if not directory.is_dir():
            raise RuleError(str(directory), None, "--rules expects a directory of *.yaml files")
        layer = _load_dir(directory, display_root=directory)
        if not layer:
            # Most likely a wrong directory, or files named *.yml.txt: say so rather
            # than silently explain without the user's entries.
            raise RuleError(str(directory), None, "no rules (*.yaml or *.yml files) in it")
        layers.append(layer)
    return merge(layers)


def load_file(path: Path, display: str | None = None) -> list[ServiceRule]:
    """Validate one file; `display` is how the file is named in errors."""
    source = display or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RuleError(
                source, None,
                f"{size} bytes: a rules file holds at most {MAX_FILE_BYTES // 1024} KiB "
                "(is it really a rules file?); split it",
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(source, None, f"cannot read: {exc}") from None
    return parse(text, source)


def _load_dir(directory: Path, display_root: Path) -> list[ServiceRule]:
    rules: list[ServiceRule] = []
    for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
        rules.extend(load_file(path, display=str(display_root / path.name)))
    return rules
