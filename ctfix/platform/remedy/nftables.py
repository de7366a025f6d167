"""The snat-zone fix as one nftables table of ctfix's own (`inet ctfix_<port>`).

Know before changing: the table is made with `create` (not `add`) in one atomic
batch, so it either appears whole or not at all, and an existing table of the same
name is an error instead of silently gaining duplicate rules. Removing it is
`delete table`: nothing outside the table is ever touched.
"""

from __future__ import annotations

from ctfix.core.plan import NftTableSpec
from ctfix.errors import MissingFeatureError
from ctfix.platform import nft
from ctfix.platform.remedy import AlreadyThere

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
    if not table_present(spec):
        return False
    nft.run_json(
        [{"delete": {"table": {"family": spec.family, "name": spec.name}}}],
        f"deleting table {spec.family} {spec.name}",
    )
    return True
