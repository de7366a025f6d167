"""A namespace that vanishes between being listed and being entered (`ip netns del`
beside `--all-netns`) is skipped as gone: never an error for scan, check or watch.

The fake: the namespace's file, reopened, is /dev/null (its bind mount went, and the
descriptor is no namespace: setns says EINVAL, "... is not a network namespace");
looked for again, it is gone. Needs no kernel namespace (setns refuses /dev/null
before any privilege check)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import pytest

from ctfix.core.rules import KnowledgeBase
from ctfix.errors import CtfixError
from ctfix.platform import namespaces
from ctfix.platform.namespaces import NamespaceGone, NamespaceRef

REF = NamespaceRef(
    id=77, dev=4, inode=77, path="/run/netns/f2-gone", label="f2-gone", spec="f2-gone",
    kind="ip-netns",
)


def vanishing(opened: Callable[[], int], *, stays: bool = False) -> Callable[[NamespaceRef], int]:
    """open_ref: `opened()` the first time, then gone (or `stays`: `opened()` always)."""
    calls: list[int] = []

    def open_ref(ref: NamespaceRef) -> int:
        calls.append(1)
        if len(calls) > 1 and not stays:
            raise NamespaceGone(f"network namespace {ref.label} is gone")
        return opened()

    return open_ref


def dev_null() -> int:
    return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)


def here() -> int:
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def test_entering_a_namespace_that_went_meanwhile_says_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(namespaces, "open_ref", vanishing(dev_null))
    with pytest.raises(NamespaceGone), namespaces.entered(REF):
        pass
    # Still there and still not enterable: that is an error, said as it is.
    monkeypatch.setattr(namespaces, "open_ref", vanishing(dev_null, stays=True))
    with (
        pytest.raises(CtfixError, match="not a network namespace") as err,
        namespaces.entered(REF),
    ):
        pass
    assert not isinstance(err.value, NamespaceGone)


def test_scan_and_check_skip_a_namespace_gone_at_entry_or_while_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ctfix.commands import scanning
    from ctfix.commands.scan import status_of

    kb = KnowledgeBase(())
    monkeypatch.setattr(namespaces, "open_ref", vanishing(dev_null))
    at_entry = scanning.scan_namespace(REF, kb, health=True)

    def fails(*_args: object, **_kwargs: object) -> object:
        raise CtfixError("cannot read its sockets")

    monkeypatch.setattr(scanning, "scan_here", fails)
    monkeypatch.setattr(namespaces, "open_ref", vanishing(here))
    while_read = scanning.scan_namespace(REF, kb, health=True)
    for scan in (at_entry, while_read):
        assert scan.gone and not scan.unreadable
    assert status_of([at_entry, while_read]) == 0  # check: OK, not unknown
    # One that is still there but cannot be read is unknown, as before.
    monkeypatch.setattr(namespaces, "open_ref", vanishing(here, stays=True))
    unreadable = scanning.scan_namespace(REF, kb, health=True)
    assert unreadable.unreadable and not unreadable.gone


def test_watch_all_netns_skips_a_namespace_gone_while_it_was_entered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import selectors

    from ctfix.commands.watch_all import AllNamespaces
    from ctfix.core.watch_filter import Selection
    from ctfix.platform.containers import ClientContainers
    from ctfix.render.status import Console

    stderr = io.StringIO()
    every = AllNamespaces(
        selectors.DefaultSelector(), Console(stderr, status=False), KnowledgeBase(()),
        Selection(), True, None, ClientContainers(), 8,
    )
    try:
        monkeypatch.setattr(namespaces, "open_ref", vanishing(dev_null))
        every._follow(REF, quiet=False)
        assert (every.current, every.failed, every.ended) == ({}, {}, [])
        assert stderr.getvalue() == ""  # no warning: it is simply gone
        # Still there, and not enterable: a warning, and counted as failed.
        monkeypatch.setattr(namespaces, "open_ref", vanishing(dev_null, stays=True))
        every._follow(REF, quiet=False)
        assert set(every.failed) == {REF.id} and "cannot watch namespace" in stderr.getvalue()
    finally:
        every.close()


def test_a_namespace_no_longer_watched_is_never_entered_through_a_reused_descriptor() -> None:
    """watch --all-netns closes a gone namespace's descriptor; its number is soon
    another file's (here /dev/null; it could be another namespace's). Entering it then
    said "... is not a network namespace" and ended the watch (exit 2), or entered the
    wrong namespace; now it is NamespaceGone, and setns is not called."""
    from ctfix.platform.netns import Entering

    home = here()
    entering = Entering(here(), "f2-gone", home)
    try:
        with entering():
            pass
        number, null = entering.fd, dev_null()
        entering.close()
        reused = os.dup2(null, number)  # the number now names /dev/null
        os.close(null)
        try:
            with pytest.raises(NamespaceGone), entering():
                pass
        finally:
            os.close(reused)
    finally:
        entering.close()
        os.close(home)


def test_the_loop_lets_a_watcher_no_longer_watched_go_without_ending_the_watch() -> None:
    """Its events read inside it, its timers and its tick: none runs (before, entering
    it raised out of the loop: the end of the watch), and the watch goes on."""
    import selectors
    from typing import Any, cast

    from ctfix.commands.watch_loop import Stop, run_loop
    from ctfix.platform.netns import Entering
    from tests.unit.test_watch_all import _Batch

    home = here()
    closed = Entering(here(), "f2-gone", home)
    closed.close()

    class Closed:
        inside = closed
        resync_due = None

        def __init__(self) -> None:
            self.worked: list[str] = []

        def ready(self, tag: str, fileobj: Any) -> None:
            self.worked.append(tag)

        def turn(self, mono: float, deadline: float | None) -> None:
            self.worked.append("turn")

        def tick(self, mono: float) -> None:
            self.worked.append("tick")

        def wait(self, mono: float) -> float:
            return 0.0

    watcher = Closed()
    key = selectors.SelectorKey(7, 7, selectors.EVENT_READ, (watcher, "addr"))  # read inside
    sel = _Batch([key])

    class Follower:
        def __init__(self) -> None:
            self.watchers = [watcher]

        def wait(self, mono: float) -> float:
            return 0.0

        def follow(self, mono: float, *, readable: bool = False) -> None:
            pass

    class Quiet:
        status = False

        def due(self, mono: float) -> float:
            return mono

    try:
        with pytest.raises(Stop):
            run_loop(
                sel, [], console=cast(Any, Quiet()), deadline=None,
                follower=cast(Any, Follower()),
            )
    finally:
        os.close(home)
    assert watcher.worked == []
