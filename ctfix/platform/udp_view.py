"""What watch's unanswered detector asks of the system, at a bounded cost: the
namespace's UDP sockets, the process holding one, and the netfilter rules that could
drop a port's requests or replies.

- `SocketView`: one sock_diag dump of every UDP socket (both families), taken on
  demand and reused for `max_age` seconds, so a burst of ended flows costs one dump a
  second, and a quiet host none.
- the holder of a socket is found by its inode under /proc (every process's
  descriptors are read: tens of milliseconds on a busy host), once per socket, with
  its process start time (so that a service started after a request is not taken for
  the one that ignored it).
- `RulesView`: `netfilter_read.rules_for_port` once per port per `max_age` seconds,
  only when a new no-reply finding asks.

Know before changing: create it after entering the watched namespace (sock_diag
answers for the caller's namespace), or give `inside` (ctfix.platform.netns.Inside)
to a caller that lives elsewhere and reads through it (`watch --all-netns`); /proc is
the PID namespace's, which is why sockets are matched by inode.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from ctfix.core.detectors.unanswered import Binding, Holder, dropping_rules
from ctfix.core.model import Family
from ctfix.errors import CtfixError
from ctfix.platform import procfs, sockdiag
from ctfix.platform.netns import Inside, within


class SocketView:
    """The `Sockets` hook of ctfix.core.detectors.unanswered, from sock_diag."""

    def __init__(
        self,
        max_age: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        inside: Inside | None = None,
    ) -> None:
        self.max_age = max_age
        self.clock = clock
        self.inside = inside
        self.dumps = 0
        self.error: str | None = None  # why the last dump failed, if it did
        self._taken: float | None = None
        self._by_port: dict[int, list[Binding]] = {}
        self._holders: dict[int, Holder | None] = {}

    def refresh(self) -> None:
        """Dump the sockets now (raises CtfixError when sock_diag cannot be read)."""
        by_port: dict[int, list[Binding]] = {}
        with within(self.inside):
            found = sockdiag.udp_sockets(None)
        for sock in found:
            family: Family = "ipv6" if sock.family == "ipv6" else "ipv4"
            by_port.setdefault(sock.port, []).append(
                Binding(family, sock.address, sock.port, sock.peer, sock.v6only, sock.inode)
            )
        self._by_port = by_port
        self._taken = self.clock()
        self.dumps += 1

    def on_port(self, port: int) -> Sequence[Binding]:
        if self._taken is None or self.clock() - self._taken >= self.max_age:
            try:
                self.refresh()
                self.error = None
            except (CtfixError, OSError) as err:
                # Keep the last view; the caller reports `error` once.
                self.error = str(err)
                self._taken = self.clock()
        return self._by_port.get(port, ())

    def holder(self, binding: Binding) -> Holder | None:
        inode = binding.ident
        if inode in self._holders:
            return self._holders[inode]
        if len(self._holders) >= 4096:
            self._holders.clear()
        owners = sockdiag.socket_holders([inode]).get(inode, [])
        found = None
        if owners:
            owner = owners[0]
            found = Holder(owner.process, owner.cmdline, owner.exe, process_started(owner.pid))
        self._holders[inode] = found
        return found


def process_started(pid: int, proc: str = "/proc") -> float | None:
    """When a process started, in time.time() seconds; None when /proc does not say."""
    stat = procfs.read_text(f"{proc}/{pid}/stat")
    system = procfs.read_text(f"{proc}/stat")
    if stat is None or system is None:
        return None
    try:
        btime = next(line for line in system.splitlines() if line.startswith("btime "))
        boot = int(btime.split()[1])
    except (StopIteration, ValueError, IndexError):
        return None
    # Field 22 (starttime), counted after the parenthesised comm, which may hold spaces.
    fields = stat.rpartition(")")[2].split()
    try:
        ticks = int(fields[19])
    except (IndexError, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class RulesView:
    """The `Firewall` hook: rules that can drop or untrack a port's replies before
    conntrack sees them (ctfix.core.detectors.unanswered.dropping_rules)."""

    def __init__(
        self,
        max_age: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        inside: Inside | None = None,
    ) -> None:
        self.max_age = max_age
        self.clock = clock
        self.inside = inside
        self._cache: dict[int, tuple[float, tuple[str, ...]]] = {}

    def could_drop(self, port: int) -> tuple[str, ...]:
        from ctfix.platform import netfilter_read

        now = self.clock()
        cached = self._cache.get(port)
        if cached is not None and now - cached[0] < self.max_age:
            return cached[1]
        with within(self.inside):
            rules, _errors = netfilter_read.rules_for_port(port)
        found = dropping_rules(rules, port)
        if len(self._cache) >= 1024:
            self._cache.clear()
        self._cache[port] = (now, found)
        return found
