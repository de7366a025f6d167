"""The nftables tables `ctfix watch --track` loads, and those a dead watch left behind.

A watch names its table `ctfix_watch_<pid>_<start>_<pidns>`: its pid, its start time
(clock ticks since boot, /proc/PID/stat field 22) and the inode of its pid namespace.
A pid alone is no proof of life: pids are reused, and a watch in another pid
namespace (a container) has a pid that means another process here. So a table's
owner is `dead` only when its pid namespace is ours and no process with that pid and
that start time exists; another pid namespace is `unknown`, and such a table is left
alone. Tables of the first release (`ctfix_watch_<pid>`) are `dead` when the pid does
not exist, `unknown` otherwise.

Know before changing: none of these tables is the namespace's own (their rules are
`ct state new counter`, only there to switch conntrack on); whoever counts the
namespace's rules or whether it tracks a family must not count them
(`ctfix.platform.remedy.choose_backend`, `ctfix watch`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

PREFIX = "ctfix_watch_"
NAME = re.compile(r"ctfix_watch_(\d+)(?:_(\d+)_(\d+))?")

Owner = Literal["self", "alive", "dead", "unknown"]


@dataclass(frozen=True, slots=True)
class WatchTable:
    family: str  # nft family: "ip", "ip6"
    name: str
    pid: int
    owner: Owner


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: count from its last ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def own_name() -> str:
    pid = os.getpid()
    return f"{PREFIX}{pid}_{_start_time(pid) or 0}_{_pid_namespace()}"


def owner(name: str) -> Owner | None:
    """Whose table this is (None: not a watch table)."""
    match = NAME.fullmatch(name)
    if match is None:
        return None
    pid = int(match.group(1))
    started = _start_time(pid)
    if match.group(2) is None:  # the first release's name: the pid is all there is
        return "dead" if started is None else "unknown"
    if int(match.group(3)) != _pid_namespace():
        return "unknown"
    if started != int(match.group(2)):
        return "dead"
    return "self" if pid == os.getpid() else "alive"


def tables() -> list[WatchTable]:
    """Every watch table in the namespace, with its owner's state."""
    from ctfix.platform import nft

    found = []
    for obj in nft.run_text("list tables", "listing nftables tables"):
        table = obj.get("table")
        if not table:
            continue
        name = str(table.get("name", ""))
        state = owner(name)
        if state is not None:
            found.append(WatchTable(str(table["family"]), name, int(name.split("_")[2]), state))
    return found


def remove(family: str, name: str) -> None:
    from ctfix.platform import nft

    nft.run_text(f"delete table {family} {name}", f"removing table {family} {name}")
