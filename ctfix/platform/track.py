"""The tracking table: a small nftables table that makes the kernel track a family in
the current namespace (`ctfix watch --track`, `ctfix explain --listen`), and the
tables of watches that died without removing theirs.

A table is named `ctfix_watch_<pid>_<start>_<pidns>` (ctfix.platform.watchtables
says why the name holds all that) and carries one `ct state new counter` rule per
hook and family: any rule that needs conntrack switches tracking on, and nothing
else. What callers pass around is `table_name(families)`: that name and its nft
families, `NAME:ip,ip6`.

Know before changing: a caller records the name *before* `load()` (a signal just
after libnftables commits must still find it in the caller's `finally`), and `load`
is one nft transaction: when it raises, nothing was loaded. Everything runs in the
calling thread's namespace (libnftables opens its socket there).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from ctfix.errors import CtfixError

#: socket family -> nft family
NFT_FAMILY: dict[int, str] = {socket.AF_INET: "ip", socket.AF_INET6: "ip6"}


def table_name(families: Sequence[int]) -> str:
    """`ctfix_watch_<pid>_<start>_<pidns>:<nft families>`: what `load` loads."""
    from ctfix.platform import watchtables

    return f"{watchtables.own_name()}:" + ",".join(NFT_FAMILY[f] for f in families)


def load(table: str) -> None:
    """Load `table <fam> NAME` with a `ct state new` rule per hook and family (one
    transaction: all or nothing; CtfixError when nftables refuses)."""
    from ctfix.platform import nft

    name, _, families = table.partition(":")
    lines = []
    for nf in families.split(","):
        lines += [
            f"add table {nf} {name}",
            f"add chain {nf} {name} pre {{ type filter hook prerouting priority filter; "
            "policy accept; }",
            f"add chain {nf} {name} out {{ type filter hook output priority filter; "
            "policy accept; }",
            # Any rule that needs conntrack makes the kernel track the family here.
            f"add rule {nf} {name} pre ct state new counter",
            f"add rule {nf} {name} out ct state new counter",
        ]
    nft.run_text("\n".join(lines), "loading the --track table")


def remove(table: str, warn: Callable[[str], None]) -> None:
    """Remove what `load` loaded; a failure is a warning (the caller is ending)."""
    from ctfix.platform import nft

    name, _, families = table.partition(":")
    commands = "\n".join(f"delete table {nf} {name}" for nf in families.split(","))
    try:
        nft.run_text(commands, "removing the --track table")
    except CtfixError as err:
        warn(f"could not remove nftables table {name}: {err.one_line()}")


def leftovers(note: Callable[[str], None], warn: Callable[[str], None]) -> dict[int, int]:
    """Remove the tracking tables of watches that no longer run (a `kill -9`), with a
    note, before anything looks at tracking: such a table still switches conntrack on,
    and a new watch would go blind once it is gone. Returns {family: pid} of tables of
    other watches that may still run, which are left alone."""
    from ctfix.platform import watchtables

    nft_families = {name: fam for fam, name in NFT_FAMILY.items()}
    others: dict[int, int] = {}
    try:
        found = watchtables.tables()
    except CtfixError:
        return others  # no nftables here: nothing can have been left
    for table in found:
        if table.owner == "dead":
            try:
                watchtables.remove(table.family, table.name)
            except CtfixError as err:
                warn(f"could not remove {table.family} {table.name}: {err.one_line()}")
                continue
            note(
                f"removed nftables table {table.family} {table.name}, left by ctfix watch "
                f"pid {table.pid}, which no longer runs"
            )
        elif table.owner in ("alive", "unknown") and table.family in nft_families:
            others[nft_families[table.family]] = table.pid
    return others
