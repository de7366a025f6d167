"""The snat-zone fix as one nftables table of ctfix's own (`inet ctfix_<port>`).

Know before changing: the table is made with `create` (not `add`) in one atomic
batch, so it either appears whole or not at all, and an existing table of the same
name is an error instead of silently gaining duplicate rules. Removing it is
`delete table` by the handle that was checked: nothing outside the table is ever
touched, and a table is ctfix's only when every rule in it carries `ctfix:<port>`
(and, when recorded, it has the handle it had when ctfix made it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ctfix.core.plan import NftTableSpec, Spec, comment, nft_table_name
from ctfix.errors import MissingFeatureError
from ctfix.platform import nft
from ctfix.platform.remedy.marks import AlreadyThere, Marked

_MISSING_FEATURE_HINTS = ("Operation not supported", "No such file or directory", "not supported")


def _tables() -> list[tuple[str, str]]:
    found = []
    for obj in nft.run_text("list tables", "listing nftables tables"):
        table = obj.get("table")
        if table:
            found.append((str(table["family"]), str(table["name"])))
    return found


def table_present(spec: NftTableSpec) -> bool:
    return (spec.family, spec.name) in _tables()


def create_table(spec: NftTableSpec) -> None:
    if table_present(spec):
        raise AlreadyThere(
            f"nftables table {spec.family} {spec.name} exists already",
            f"see `nft list table {spec.family} {spec.name}` and `ctfix fix --status`",
        )
    commands = list(spec.batch)
    # `create` fails on an existing table; `add` would merge into it.
    first = commands[0]
    if "add" in first and "table" in first["add"]:
        commands = [{"create": first["add"]}, *commands[1:]]
    try:
        nft.run_json(commands, f"creating table {spec.family} {spec.name}")
    except nft.NftError as err:
        if "File exists" in err.message:  # `create` lost a race with somebody else
            raise AlreadyThere(
                f"nftables table {spec.family} {spec.name} exists already",
                f"see `nft list table {spec.family} {spec.name}` and `ctfix fix --status`",
            ) from None
        if any(hint in err.message for hint in _MISSING_FEATURE_HINTS):
            raise MissingFeatureError(
                f"{err.message} (the kernel lacks an nftables feature this fix needs: "
                "inet nat, dynamic sets with timeouts, or `ct zone set`)"
            ) from None
        raise


def remove_table(spec: NftTableSpec) -> bool:
    listed = _listed(spec.family, spec.name)
    if listed is None:
        return False
    _delete(spec.family, spec.name, _table_of(listed).get("handle"))
    return True


def _delete(family: str, name: str, handle: Any) -> None:
    # By handle: the table checked is the table deleted, even if it was replaced since.
    where: dict[str, Any] = {"family": family, "name": name}
    if isinstance(handle, int):
        where = {"family": family, "handle": handle}
    nft.run_json([{"delete": {"table": where}}], f"deleting table {family} {name}")


# -- ctfix's marks (see ctfix/platform/remedy/marks.py) ----------------------------------

_OWN_NAME = re.compile(r"ctfix_(\d{1,5})")


def _listed(family: str, name: str) -> list[dict[str, Any]] | None:
    """`nft list table FAMILY NAME` as objects, or None when there is no such table."""
    if (family, name) not in _tables():
        return None
    try:
        return nft.run_text(f"list table {family} {name}", f"listing table {family} {name}")
    except nft.NftError as err:
        if "No such file or directory" in err.message:  # deleted meanwhile
            return None
        raise


def _table_of(listed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return next((o["table"] for o in listed if "table" in o), {})


def _not_ours(listed: Sequence[dict[str, Any]], port: int, handle: Any) -> str | None:
    """Why this listed table is not ctfix's for port (None: it is)."""
    table = _table_of(listed)
    name = f"table {table.get('family')} {table.get('name')}"
    if handle is not None and table.get("handle") != handle:
        return (
            f"{name} has handle {table.get('handle')}, not {handle} as when ctfix made it "
            "(somebody made it again)"
        )
    rules = [o["rule"] for o in listed if "rule" in o]
    stray = [r for r in rules if r.get("comment") != comment(port)]
    if stray:
        return (
            f"{name} holds {len(stray)} rule(s) without ctfix's comment {comment(port)} "
            f"(chain {stray[0].get('chain')}, handle {stray[0].get('handle')})"
        )
    if not rules and handle is None:
        return f"{name} holds no rule marked {comment(port)}"
    return None


def table_foreign(spec: NftTableSpec, port: int, made: Mapping[str, Any]) -> str | None:
    own = nft_table_name(port)
    if (spec.family, spec.name) != ("inet", own):
        return (
            f"table {spec.family} {spec.name} is not ctfix's table for port {port} "
            f"(inet {own})"
        )
    listed = _listed(spec.family, spec.name)
    return None if listed is None else _not_ours(listed, port, made.get("handle"))


def table_identity(spec: NftTableSpec) -> dict[str, Any]:
    listed = _listed(spec.family, spec.name)
    handle = _table_of(listed).get("handle") if listed else None
    return {"handle": handle} if isinstance(handle, int) else {}


def unrecorded(recorded: Sequence[tuple[int, Spec]]) -> list[Marked]:
    explained = {
        (port, spec.family, spec.name) for port, spec in recorded if isinstance(spec, NftTableSpec)
    }
    found = []
    for family, name in _tables():
        match = _OWN_NAME.fullmatch(name)
        if family != "inet" or match is None:
            continue
        port = int(match.group(1))
        if (port, family, name) in explained:
            continue
        listed = _listed(family, name)
        if listed is None or _not_ours(listed, port, None) is not None:
            continue
        handle = str(_table_of(listed).get("handle", ""))
        found.append(Marked(port, "nft-table", f"table {family} {name}", (family, name, handle)))
    return found


def remove_marked(marked: Marked) -> bool:
    family, name, handle = marked.key
    listed = _listed(family, name)
    if listed is None:
        return False
    why = _not_ours(listed, marked.port, int(handle) if handle.isdigit() else None)
    if why is not None:
        raise AlreadyThere(f"{marked.obj} is no longer ctfix's: {why}; left alone")
    _delete(family, name, _table_of(listed).get("handle"))
    return True
