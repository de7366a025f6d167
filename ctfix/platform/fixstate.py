"""The record of what `ctfix fix` made in one network namespace.

One JSON file per namespace, under /run/ctfix/fix/ (or $CTFIX_STATE_DIR), named by
the namespace's cookie (SO_NETNS_COOKIE), so `--netns NAME` and `--netns pid:PID` of
the same namespace share it. Not by its inode: the kernel reuses the inode of a
deleted namespace, and a new namespace must never inherit a stale record (it would
read as "already applied"). The inode is the fallback on kernels before 5.14.
/run is right: every object recorded here lives in the kernel and dies with a
reboot, and so does the record.

Know before changing: the file is written atomically (temp file, fsync, rename,
fsync of the directory) and a step is recorded as "pending" BEFORE it is applied,
so after a `kill -9` at any moment the file lists everything that may exist; revert
removes pending steps too, tolerating their absence. Each save rewrites the whole
file from this process's view, so whoever changes it (apply, revert) must hold
`FixState.locked` from load to last save: two runs interleaving would otherwise lose
each other's records (last writer wins). Reading (--status) needs no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ctfix.core.model import Method
from ctfix.core.plan import (
    BACKENDS,
    METHODS,
    Backend,
    Plan,
    Spec,
    Step,
    cover_to_dict,
    step_from_dict,
    step_to_dict,
)
from ctfix.errors import CtfixError
from ctfix.platform.locks import flock_within

DEFAULT_DIR = "/run/ctfix/fix"
VERSION = 1
#: how long an apply or revert waits for another one in the same namespace
LOCK_TIMEOUT = 60.0

StepStatus = Literal["pending", "done"]


def state_dir() -> str:
    return os.environ.get("CTFIX_STATE_DIR") or DEFAULT_DIR


SO_NETNS_COOKIE = 71  # Linux >= 5.14; not in Python's socket module


def namespace_key() -> str:
    """`netns-cookie-<n>` of the calling thread's namespace, unique until reboot."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        return f"netns-cookie-{int.from_bytes(raw, 'little')}"
    except OSError:
        return f"netns-{os.stat('/proc/thread-self/ns/net').st_ino}"


Choice = TypeVar("Choice", bound=str)


def _one_of(value: object, allowed: tuple[Choice, ...]) -> Choice:
    """`value` as one of the `allowed` strings (a Literal's members); ValueError else."""
    for option in allowed:
        if value == option:
            return option
    raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")


@dataclass
class RecordedStep:
    step: Step
    status: StepStatus
    #: what the kernel said of the object once made (an nftables table's handle), so
    #: that revert can tell it from one made again by somebody else
    made: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecordedFix:
    port: int
    method: Method
    backend: Backend
    started: float
    complete: bool
    steps: list[RecordedStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. legacy tables it loaded
    #: when the apply finished (None: unfinished, or an older record: `started` then)
    applied: float | None = None
    #: snat-zone: the clients it remembers ({"service", "target", "label", "hooks"})
    covers: list[dict[str, Any]] = field(default_factory=list)

    def same_plan(self, plan: Plan) -> bool:
        return (
            self.method == plan.method
            and self.backend == plan.backend
            and [r.step for r in self.steps] == list(plan.steps)
        )


@dataclass
class FixState:
    """Every fix recorded for one namespace; `save()` after each change."""

    path: str
    netns: str
    fixes: dict[int, RecordedFix] = field(default_factory=dict)

    # -- persistence ---------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def locked(
        cls, netns_label: str, key: str | None = None, timeout: float = LOCK_TIMEOUT
    ) -> Iterator[FixState]:
        """The namespace's state, loaded and held against other applies and reverts.

        An flock on `<key>.lock` next to the state file: the kernel drops it when the
        holder exits, even by `kill -9`, so a crashed run never blocks the next.
        """
        key = key or namespace_key()
        directory = state_dir()
        path = os.path.join(directory, f"{key}.lock")
        deadline = time.monotonic() + timeout
        while True:
            fd = _open_lock(directory, path)
            try:
                if not flock_within(fd, max(0.0, deadline - time.monotonic())):
                    raise CtfixError(
                        f"another `ctfix fix --apply/--revert` in netns {netns_label} "
                        f"has held {path} for {timeout:g} s; nothing changed",
                        "wait for it to finish (`ctfix fix --status` shows its record)",
                    )
            except BaseException:
                os.close(fd)
                raise
            if _still_at(fd, path):
                break
            # The holder before us found no record left and unlinked the lock file
            # while holding it: our flock is on a file nobody else can open. Again.
            os.close(fd)
        try:
            state = cls.load(netns_label, key)
            yield state
        finally:
            try:
                # No record left (reverted, refused, rolled back): the lock file goes
                # too, unlinked while held, so that nothing of ctfix stays behind.
                # Whoever waits on it sees it gone (`_still_at`) and opens a new one.
                if not os.path.exists(os.path.join(directory, f"{key}.json")):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            finally:
                os.close(fd)  # releases the flock

    @classmethod
    def load(cls, netns_label: str, key: str | None = None) -> FixState:
        path = os.path.join(state_dir(), f"{key or namespace_key()}.json")
        try:
            with open(path) as fh:
                raw = json.load(fh)
        except FileNotFoundError:
            return cls(path, netns_label)
        except PermissionError:
            raise CtfixError(
                f"cannot read the fix state file {path}: permission denied",
                "run as root (sudo ctfix fix ...): the file is root's, like what it records",
            ) from None
        except ValueError as err:  # not JSON at all (UnicodeDecodeError is one too)
            raise _malformed(path, f"not JSON ({err})") from None
        except OSError as err:
            raise CtfixError(
                f"cannot read the fix state file {path}: {err.strerror or err}",
                "fix the cause (disk, permissions) and try again",
            ) from None
        if not isinstance(raw, dict):
            held = _JSON_KINDS.get(type(raw), "a value")
            raise _malformed(path, f"holds {held}, not a JSON object")
        if raw.get("version") != VERSION:
            raise _malformed(path, f"state file version {raw.get('version')!r} not understood")
        fixes = raw.get("fixes", {})
        if not isinstance(fixes, dict):
            raise _malformed(path, "'fixes' is not a JSON object")
        state = cls(path, str(raw.get("netns") or netns_label))
        for port_text, fix in fixes.items():
            try:
                state.fixes[int(port_text)] = _recorded_fix(int(port_text), fix)
            except (KeyError, TypeError, ValueError, AttributeError, CtfixError) as err:
                why = _why(err)
                raise _malformed(path, f"unreadable fix for port {port_text} ({why})") from None
        return state

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "netns": self.netns,
            "fixes": {
                str(port): {
                    "method": fix.method,
                    "backend": fix.backend,
                    "started": fix.started,
                    "complete": fix.complete,
                    "notes": fix.notes,
                    "applied": fix.applied,
                    "covers": fix.covers,
                    "steps": [
                        {"status": r.status, "step": step_to_dict(r.step)}
                        | ({"made": r.made} if r.made else {})
                        for r in fix.steps
                    ],
                }
                for port, fix in sorted(self.fixes.items())
            },
        }

    def save(self) -> None:
        """Write atomically; with no fix left, remove the file."""
        directory = os.path.dirname(self.path)
        if not self.fixes:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
                _fsync_dir(directory)
            return
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
        except OSError as err:
            raise CtfixError(f"cannot write the fix state in {directory}: {err.strerror}") from None
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_json(), fh, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)

    def specs(self) -> list[tuple[int, Spec]]:
        """(port, spec) of every recorded step: what explains a marked kernel object."""
        return [(port, r.step.spec) for port, fix in self.fixes.items() for r in fix.steps]

    # -- recording -----------------------------------------------------------------

    def begin(self, plan: Plan) -> RecordedFix:
        fix = RecordedFix(
            plan.port, plan.method, plan.backend, time.time(), complete=False,
            covers=[cover_to_dict(t) for t in plan.covers],
        )
        self.fixes[plan.port] = fix
        self.save()
        return fix

    def record_pending(self, fix: RecordedFix, step: Step) -> RecordedStep:
        recorded = RecordedStep(step, "pending")
        fix.steps.append(recorded)
        self.save()
        return recorded

    def mark_done(self, recorded: RecordedStep, made: dict[str, Any] | None = None) -> None:
        recorded.status = "done"
        recorded.made = dict(made or {})
        self.save()

    def drop_step(self, fix: RecordedFix, recorded: RecordedStep) -> None:
        """The step's objects are gone (undone, or never made): stop listing it."""
        fix.steps.remove(recorded)
        self.save()

    def finish(self, fix: RecordedFix) -> None:
        fix.complete = True
        fix.applied = time.time()
        self.save()

    def forget(self, port: int) -> None:
        self.fixes.pop(port, None)
        self.save()


def _open_lock(directory: str, path: str) -> int:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except PermissionError:
        raise CtfixError(
            f"cannot open the fix state lock {path}: permission denied",
            "run as root (sudo ctfix fix ...)",
        ) from None
    except OSError as err:
        raise CtfixError(f"cannot open the fix state lock {path}: {err.strerror}") from None


def _still_at(fd: int, path: str) -> bool:
    """The locked file is the one `path` names now (not one unlinked meanwhile)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


#: JSON's names for what a state file held instead of an object
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


def _malformed(path: str, what: str) -> CtfixError:
    return CtfixError(
        f"{path}: {what}",
        "it is not a state file this ctfix wrote: move it away (`ctfix fix --status` then "
        "finds ctfix's objects by their marks, and `--revert` removes them)",
    )


class _Shape(ValueError):
    """The file's structure is not a state file's, in words (no Python type names)."""


def _why(err: Exception) -> str:
    """What was wrong with a fix of the file, in the file's own terms."""
    if isinstance(err, CtfixError):
        return err.message
    if isinstance(err, KeyError):
        return f"no {err.args[0]!r}" if err.args else "a key is missing"
    if isinstance(err, _Shape):
        return str(err)
    if isinstance(err, ValueError):
        return f"a value it cannot use: {err}"
    return "a value of the wrong kind"  # TypeError, AttributeError: Python's words


def _recorded_fix(port: int, fix: Any) -> RecordedFix:
    """One fix of the file; KeyError/TypeError/ValueError/AttributeError when malformed."""
    if not isinstance(fix, dict) or not isinstance(fix.get("steps"), list):
        raise _Shape("a fix is an object with a list of steps")
    if not isinstance(fix.get("notes", []), list):
        raise _Shape("'notes' is not a list")
    steps = []
    for recorded in fix["steps"]:
        status = recorded["status"]
        if status not in ("pending", "done"):
            raise _Shape(f"step status {status!r} is neither 'pending' nor 'done'")
        steps.append(
            RecordedStep(step_from_dict(recorded["step"]), status, dict(recorded.get("made", {})))
        )
    return RecordedFix(
        port=port,
        method=_one_of(fix["method"], METHODS),
        backend=_one_of(fix["backend"], BACKENDS),
        started=float(fix["started"]),
        complete=bool(fix["complete"]),
        notes=[str(n) for n in fix.get("notes", [])],
        steps=steps,
        # Older records have neither: the apply began at `started`, covers unknown.
        applied=float(fix["applied"]) if fix.get("applied") is not None else None,
        covers=[_cover(c) for c in fix.get("covers", [])],
    )


def _cover(raw: Any) -> dict[str, Any]:
    """One covered target ({"service", "target", ...}); TypeError when malformed."""
    if not isinstance(raw, dict) or not all(
        isinstance(raw.get(key), str) for key in ("service", "target")
    ):
        raise _Shape("a covered target is an object with a service and a target")
    return dict(raw)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
