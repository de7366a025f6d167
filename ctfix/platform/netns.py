"""Network namespaces: resolve `--netns NAME|PATH|pid:PID` and enter them
(`container:NAME` is ctfix.platform.containers.container_netns: it asks the engines).

Know before changing: setns(2) switches only the calling *thread*. `enter()` is for a
command that works in one namespace for its whole life (call it before any thread or
socket exists); `entered()` switches the current thread temporarily, for code that
opens a socket in another namespace and then carries on in its own (sockets keep the
namespace they were created in).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from ctfix.errors import CtfixError, PrivilegeError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class Netns:
    """A resolved namespace: what the user typed, and the file that names it."""

    spec: str
    path: str

    @property
    def label(self) -> str:
        """Short name for output: the `ip netns` name, or the spec as given."""
        return self.spec or "current"


CURRENT = Netns("", "/proc/self/ns/net")


def _exists(path: str, spec: str) -> bool:
    """Like os.path.exists, but a namespace we may not look at is a privilege error."""
    try:
        os.stat(path)
    except PermissionError:
        raise PrivilegeError(f"opening network namespace {spec}", "CAP_SYS_ADMIN") from None
    except OSError:
        return False
    return True


def resolve(spec: str | None) -> Netns:
    """Turn NAME, PATH or pid:PID into a namespace file; errors say what to do (a
    `container:` spec: `containers.container_netns`, which this module must not import:
    containers enters namespaces through it).

    None means the current namespace; an empty string is an error, so that a script's
    `--netns "$NS"` with NS unset never acts on the host's own namespace by accident.
    """
    if spec is None:
        return CURRENT
    if not spec.strip():
        raise CtfixError(
            "--netns is empty",
            "give an `ip netns` name, a path or pid:PID, or leave --netns out for the "
            "current namespace",
        )
    if spec.startswith("pid:"):
        pid = spec[4:]
        if not (pid.isascii() and pid.isdigit()):
            raise CtfixError(f"bad --netns {spec!r}", "use pid:PID with a numeric process id")
        path = f"/proc/{pid}/ns/net"
        if not _exists(path, spec):
            raise CtfixError(f"no process {pid} for --netns {spec}", "check the pid with `ps`")
        return Netns(spec, path)
    path = spec if "/" in spec else os.path.join(NETNS_RUN_DIR, spec)
    if not _exists(path, spec):
        raise CtfixError(
            f"network namespace {spec!r} not found ({path})",
            "list them with `ip netns list`, or pass a path or pid:PID",
        )
    return Netns(spec, path)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise PrivilegeError(f"entering network namespace {what}", "CAP_SYS_ADMIN")
        if err == errno.EINVAL:
            raise CtfixError(
                f"{what} is not a network namespace",
                "pass an `ip netns` name, /proc/PID/ns/net, /run/netns/NAME or pid:PID",
            )
        raise CtfixError(f"cannot enter network namespace {what}: {os.strerror(err)}")


def _open(ns: Netns) -> int:
    try:
        return os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        raise PrivilegeError(f"opening network namespace {ns.spec}", "CAP_SYS_ADMIN") from None
    except OSError as err:
        raise CtfixError(f"cannot open network namespace {ns.spec}: {err.strerror}") from None


def enter(ns: Netns) -> None:
    """Move the calling thread (the whole process, if single-threaded) into ns."""
    if ns is CURRENT or ns.path == CURRENT.path:
        return
    fd = _open(ns)
    try:
        _setns(fd, ns.spec)
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(ns: Netns | str) -> Iterator[None]:
    """Run the body in ns on this thread, then return to the original namespace."""
    target = ns if isinstance(ns, Netns) else resolve(ns)
    if target is CURRENT:
        yield
        return
    fd = _open(target)
    try:
        with entered_fd(fd, target.spec):
            yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered_fd(fd: int, what: str, home: int | None = None) -> Iterator[None]:
    """`entered()` for a namespace already opened (fd stays the caller's to close).
    `home`: an open descriptor of the namespace to come back to, for a caller that
    enters often (`watch --all-netns`); default: the thread's namespace now."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC) if home is None else home
    try:
        _setns(fd, what)
        try:
            yield
        finally:
            _setns(own, "(return to the original)")
    finally:
        if home is None:
            os.close(own)


#: enters a namespace for its block (a caller that lives elsewhere: `watch --all-netns`)
Inside = Callable[[], AbstractContextManager[None]]


def within(inside: Inside | None) -> AbstractContextManager[None]:
    """`inside()`, or nothing to do when None (the thread is in the namespace)."""
    return contextlib.nullcontext() if inside is None else inside()


class NamespaceGone(CtfixError):
    """The namespace no longer exists (its last process exited, its mount went)."""


class Entering:
    """An `Inside` for one namespace opened once (`fd`, its own from then on), entered
    from `home` and back: two setns calls. Re-entrant: a block nested in another of the
    same namespace does nothing (the outer block comes back home, not the inner one).
    Once closed it is NamespaceGone: its descriptor's number may name another file by
    then (another namespace's even), which setns must never be given."""

    def __init__(self, fd: int, what: str, home: int) -> None:
        self.fd = fd
        self.what = what
        self.home = home
        self._depth = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.fd < 0:
            raise NamespaceGone(f"network namespace {self.what} is no longer watched")
        if self._depth:
            yield
            return
        with entered_fd(self.fd, self.what, self.home):
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
