"""The watch loop, with many namespaces: a namespace can go (or be left) while the loop
handles one batch of ready sockets; its other sockets in that batch are closed by
then and must be skipped, not read (a closed socket is EBADF: watch --all-netns ended
with an internal error when namespaces came and went quickly)."""

from __future__ import annotations

import selectors
import socket
import time
from typing import Any

from ctfix.commands.watch_loop import run_loop


class Console:
    status = False

    def due(self, mono: float) -> float:
        return mono + 60.0


class Watcher:
    """A namespace's watcher whose reading of its socket makes the loop drop another
    watcher (as a namespace found gone does); it notes every read."""

    inside = None
    resync_due = None
    closed = False  # as NamespaceWatch.closed: set by close()

    def __init__(self, name: str, sel: selectors.BaseSelector, reads: list[str]) -> None:
        self.name, self.sel, self.reads = name, sel, reads
        self.sock, self.peer = socket.socketpair()
        self.peer.send(b"x")
        self.other: Watcher | None = None
        sel.register(self.sock, selectors.EVENT_READ, (self, "ct"))

    def ready(self, tag: str, fileobj: Any) -> None:
        self.reads.append(self.name)
        fileobj.recv(16)  # EBADF if it was closed
        other = self.other
        if other is not None and other.sock.fileno() >= 0:
            self.sel.unregister(other.sock)
            other.sock.close()

    def wait(self, mono: float) -> float:
        return 60.0

    def turn(self, mono: float, deadline: float | None) -> None:
        pass

    def tick(self, mono: float) -> None:
        pass


def test_a_watcher_dropped_by_an_earlier_socket_of_the_same_batch_is_not_read() -> None:
    sel = selectors.DefaultSelector()
    reads: list[str] = []
    a, b = Watcher("a", sel, reads), Watcher("b", sel, reads)
    a.other, b.other = b, a  # whichever is read first drops the other
    try:
        watchers: list[Any] = [a, b]  # fakes of the watchers' and the console's protocols
        run_loop(sel, watchers, console=Console(), deadline=time.monotonic() + 0.3)  # type: ignore[arg-type]  # a fake console
    finally:
        for w in (a, b):
            w.sock.close()
            w.peer.close()
        sel.close()
    assert len(reads) == 1
