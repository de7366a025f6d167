"""What a fresh clone of this repository holds, as of the working tree, and the
wheels scripts/setup made for installing without an index."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: made by scripts/setup: the offline image base and the dependencies' wheels
DEPLOY_CACHE = ROOT / ".cache" / "deploy"
WHEELS = DEPLOY_CACHE / "wheels"
BASE_TARBALL = DEPLOY_CACHE / "base.tar"


def clone_tree(dest: Path) -> Path:
    """Copy the files git tracks or would track (not ignored: no .venv, no caches)
    from the working tree to dest: a fresh clone, with uncommitted changes."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listing.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def missing_wheels() -> str | None:
    """Why an offline install cannot be tried here, or None."""
    if shutil.which("git") is None:
        return "git is not installed"
    if not any(WHEELS.glob("setuptools-*.whl")) or not any(WHEELS.glob("pyroute2-*.whl")):
        return f"no dependency wheels in {WHEELS} (run scripts/setup)"
    return None
