"""iptables-legacy (x_tables) as seen from the current network namespace.

Know before changing: opening a legacy table with libiptc (python-iptables) makes
the kernel create it if it is not there yet, after which Debian's `iptables`
(nf_tables) warns "iptables-legacy tables present". Read-only code must therefore
only open the tables listed in /proc/thread-self/net/ip{,6}_tables_names (the
calling thread's namespace, also inside `netns.entered()`). python-iptables also
opens *every* table when it resolves a target name: `table_class` declares which
tables exist before anything is opened. And libxtables keeps one protocol's
extensions per process, so each family's libiptc work runs in its own forked child
(`in_child`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ctfix.core.model import Family
from ctfix.errors import CtfixError, MissingFeatureError
from ctfix.platform.locks import flock_within

T = TypeVar("T")

FAMILY_FILES = {
    "ipv4": "/proc/thread-self/net/ip_tables_names",
    "ipv6": "/proc/thread-self/net/ip6_tables_names",
}


class Unreadable(CtfixError):
    """The list of legacy tables is root's (mode 0440): CAP_NET_ADMIN does not open it,
    and asking the kernel table by table would create each table asked about."""


def loaded_tables(family: Family = "ipv4") -> list[str]:
    """Names of the legacy tables that exist in this namespace (nothing is created)."""
    try:
        with open(FAMILY_FILES[family]) as fh:
            return [line.strip() for line in fh if line.strip()]
    except FileNotFoundError:
        return []
    except PermissionError:
        raise Unreadable(
            f"{FAMILY_FILES[family]} is readable by root only, so iptables-legacy "
            "tables were not read (CAP_NET_ADMIN is not enough)",
            "run as root to include them",
        ) from None


def in_use() -> bool:
    """True when this namespace holds any iptables-legacy table (v4 or v6)."""
    return bool(loaded_tables("ipv4") or loaded_tables("ipv6"))


def import_iptc(message: str = "python-iptables is not installed") -> Any:
    """The python-iptables module, imported only when needed (it loads libiptc)."""
    try:
        import iptc
    except ImportError:
        raise MissingFeatureError(
            message, "pip install python-iptables (or run scripts/setup)"
        ) from None
    except Exception as err:
        # iptc.errors.XTablesError, which iptc raises while it imports itself (so it
        # cannot be named here) when iptables' extensions are not installed: without
        # them no rule with a match or target can be read (a minimal container image).
        if type(err).__name__ != "XTablesError":
            raise
        raise MissingFeatureError(
            f"python-iptables cannot load iptables' extensions ({err})",
            "install the iptables package (its extensions, /usr/lib/*/xtables), or set "
            "XTABLES_LIBDIR to where they are",
        ) from None
    return iptc


def table_class(iptc: Any, family: Family, existing: Iterable[str]) -> Any:
    """python-iptables' Table class for the family, told which tables exist.

    Without this it probes (and so creates) every table it has not seen, the first
    time it resolves a target name. Open only tables named in `existing`.
    """
    cls: Any = iptc.Table6 if family == "ipv6" else iptc.Table
    names = set(existing)
    cls.existing_table_names.clear()
    cls.existing_table_names.update({name: name in names for name in cls.ALL})
    return cls


def saved_options(part: Any, ip: Any) -> str:
    """A match's or target's options as iptables-save prints them (leading space)."""
    raw = part._get_saved_buf(ip)
    if raw is None:
        return ""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return text.rstrip("\n")


def in_child(function: Callable[..., T], *args: Any) -> T:
    """Run function(*args) in a forked child; return its result or re-raise its error.

    libxtables keeps one protocol's extensions per process: once libxt_MASQUERADE
    is loaded for IPv4, python-iptables cannot find the IPv6 MASQUERADE ("can't find
    target"). A child per operation keeps each one clean; it inherits the namespace
    the caller entered. Errors come back as `CtfixError`.

    python-iptables is imported here, in the caller, once: importing it costs most
    of a second (ctypes' find_library runs ldconfig), which every child paid again
    when it imported it itself (a revert of a snat-zone fix with a dozen rules spent
    ~20 s of its ~20 s on it). The import loads no extension (those are what a
    process cannot hold for both families), so the children still start clean.
    """
    import_iptc()
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's code
        status = 0
        try:
            os.close(readable)
            try:
                outcome: tuple[str, Any] = ("ok", function(*args))
            except Exception as err:
                outcome = ("error", as_ctfix_error(err))
            with os.fdopen(writable, "wb") as out:
                pickle.dump(outcome, out)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(writable)
    with os.fdopen(readable, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    if not data:
        raise CtfixError("an iptables-legacy operation died without an answer")
    kind, value = pickle.loads(data)
    if kind != "ok":
        raise value
    result: T = value
    return result


def as_ctfix_error(err: Exception) -> CtfixError:
    """The error as a child reports it: a CtfixError as it is, anything else (an
    IPTCError, a ValueError from libxtables) as a one-line CtfixError."""
    if isinstance(err, CtfixError):
        return err
    return CtfixError(f"{type(err).__name__}: {err}")


#: The lock `iptables -w` takes around a table change (iptables' XT_LOCK_NAME; like
#: iptables, XTABLES_LOCKFILE overrides it).
XTABLES_LOCK = "/run/xtables.lock"


@contextlib.contextmanager
def xtables_lock(timeout: float = 10.0) -> Iterator[None]:
    """Hold the xtables lock, as `iptables -w` does, for one read-modify-write.

    libiptc replaces a whole table at commit: without the lock a rule Docker or
    firewalld adds between our read and our commit would be silently lost. Waits up
    to `timeout` seconds, then raises a one-line CtfixError.
    """
    path = os.environ.get("XTABLES_LOCKFILE") or XTABLES_LOCK
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as err:
        raise CtfixError(f"cannot open the xtables lock {path}: {err.strerror}") from None
    try:
        if not flock_within(fd, timeout):
            raise CtfixError(
                f"another program has held the xtables lock {path} for "
                f"{timeout:g} s (iptables, Docker, firewalld?); nothing changed",
                "try again when it is done",
            )
        yield
    finally:
        os.close(fd)
