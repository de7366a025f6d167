"""watch's loop with --all-netns: a namespace the follower stops while the loop runs
(its pod went away) is never touched again, neither by the rest of that wake-up's
ready sockets nor by the turns and ticks that follow (a setns into its closed
descriptor ended watch with an internal error: found running the DaemonSet's
`watch --all-netns` on a machine whose test namespaces came and went)."""

from __future__ import annotations

import contextlib
import io
import selectors
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

from ctfix.commands.watch_loop import run_loop
from ctfix.render.status import Console


class FakeWatch:
    """A namespace's watcher: every call after `close` is an error."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.resync_due: float | None = None
        self.closed = False
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        assert not self.closed, f"{name} on {self.label} after it was closed"
        self.calls.append(name)

    @contextlib.contextmanager
    def _inside(self) -> Iterator[None]:
        self._call("inside")
        yield

    def inside(self) -> contextlib.AbstractContextManager[None]:
        return self._inside()

    def ready(self, tag: str, fileobj: object) -> None:
        self._call(f"ready {tag}")
        assert isinstance(fileobj, socket.socket)
        fileobj.recv(100)

    def wait(self, mono: float) -> float:
        self._call("wait")
        return 0.0

    def turn(self, mono: float, deadline: float | None) -> None:
        self._call("turn")

    def tick(self, mono: float) -> None:
        self._call("tick")

    def close(self) -> None:
        self.closed = True


class Follower:
    """Stops `gone` when its own socket wakes the loop (a namespace disappeared)."""

    def __init__(self, sel: selectors.BaseSelector, mounts: socket.socket, kept: FakeWatch,
                 gone: FakeWatch, gone_sock: socket.socket) -> None:  # fmt: skip
        self.sel, self.mounts, self.gone, self.gone_sock = sel, mounts, gone, gone_sock
        self.current = [kept, gone]
        self.follows = 0

    @property
    def watchers(self) -> Iterable[FakeWatch]:
        return list(self.current)

    def wait(self, mono: float) -> float:
        return 60.0

    def follow(self, mono: float, *, readable: bool = False) -> None:
        self.follows += 1
        if readable:
            self.mounts.recv(100)
        if readable and self.gone in self.current:
            self.current.remove(self.gone)
            self.sel.unregister(self.gone_sock)
            self.gone.close()


def test_a_namespace_stopped_during_a_wake_up_is_not_touched_again() -> None:
    sel = selectors.DefaultSelector()
    kept, gone = FakeWatch("kept"), FakeWatch("gone")
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        (mounts, mounts_peer), (kept_sock, kept_peer), (gone_sock, gone_peer) = pairs
        sel.register(mounts, selectors.EVENT_READ, (None, "mounts"))
        sel.register(kept_sock, selectors.EVENT_READ, (kept, "ct"))
        sel.register(gone_sock, selectors.EVENT_READ, (gone, "ct"))
        follower = Follower(sel, mounts, kept, gone, gone_sock)
        for peer in (mounts_peer, kept_peer, gone_peer):
            peer.send(b"x")  # all three ready in the same wake-up
        console = Console(io.StringIO(), status=False)
        ended = run_loop(
            sel, cast(Any, [kept, gone]), console=console, deadline=time.monotonic() + 1.5,
            follower=cast(Any, follower),  # the fakes have what the loop uses
        )  # fmt: skip
    finally:
        sel.close()
        for a, b in pairs:
            a.close()
            b.close()
    assert ended and follower.follows and gone.closed
    assert "turn" in kept.calls and "tick" in kept.calls  # the loop went on for the rest
