"""libnftables, through its JSON API, in the current network namespace.

Know before changing: libnftables opens its netlink socket per command, in the
namespace of the calling thread, so enter the namespace first
(`ctfix.platform.netns`). A batch given to `run_json` is atomic in the kernel: it
applies whole or not at all, which `ctfix fix` relies on.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from ctfix.errors import CtfixError, MissingFeatureError, PrivilegeError

JsonObject = dict[str, Any]


class NftError(CtfixError):
    """libnftables refused a command; the message is its own first error line."""


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """libnftables prints some errors itself ("Operation not permitted (you must be
    root)") besides returning them: nothing but ctfix's own one line may reach the
    user, so fd 2 points at /dev/null around each call (the error still comes back in
    libnftables' error buffer, which `_check` reads)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _context() -> Any:
    try:
        import nftables
    except ImportError:
        raise MissingFeatureError(
            "the nftables Python module is not installed",
            "pip install pip-nftables (or run scripts/setup)",
        ) from None
    try:
        nft = nftables.Nftables()
    except OSError:
        raise MissingFeatureError(
            "libnftables is not installed", "apt-get install libnftables1 (or run scripts/setup)"
        ) from None
    nft.set_json_output(True)
    nft.set_handle_output(True)
    return nft


def _check(rc: int, error: str, what: str) -> None:
    if rc == 0:
        return
    first = next((line for line in error.splitlines() if line.strip()), f"status {rc}")
    if "Operation not permitted" in error:
        raise PrivilegeError(f"nftables ({what})")
    raise NftError(f"nftables refused {what}: {first.strip()}")


def run_json(commands: list[JsonObject], what: str = "the change") -> JsonObject:
    """Run one atomic batch of JSON commands ({"add": {...}}, {"delete": {...}}, ...)."""
    nft = _context()
    with _quiet_stderr():
        rc, output, error = nft.json_cmd({"nftables": commands})
    _check(rc, str(error or ""), what)
    result: JsonObject = output if isinstance(output, dict) else {"nftables": []}
    return result


def run_text(command: str, what: str = "the command") -> list[JsonObject]:
    """Run nft syntax (one or more lines); return the JSON objects it printed."""
    nft = _context()
    with _quiet_stderr():
        rc, output, error = nft.cmd(command)
    _check(rc, str(error or ""), what)
    if not output:
        return []
    objects: list[JsonObject] = json.loads(output).get("nftables", [])
    return objects


def ruleset() -> list[JsonObject]:
    """`nft -j list ruleset` as objects, metainfo dropped."""
    return [obj for obj in run_text("list ruleset", "listing the ruleset") if "metainfo" not in obj]


def ruleset_text_with_handles() -> str:
    """`nft -a -s list ruleset`: rule lines end in `# handle N`, counters left out.

    Lets a reader of the JSON ruleset show each rule the way `nft` prints it.
    """
    nft = _context()
    nft.set_json_output(False)
    nft.set_handle_output(True)
    nft.set_stateless_output(True)
    with _quiet_stderr():
        rc, output, error = nft.cmd("list ruleset")
    _check(rc, str(error or ""), "listing the ruleset")
    return str(output)
