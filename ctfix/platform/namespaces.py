"""Every network namespace on the host, found cheaply enough to look again every few
seconds: the host's, each container's, each `ip netns` one (for `--all-netns`).

Where they are found: every process's /proc/PID/ns/net, and every nsfs bind mount of
a network namespace in /proc/self/mountinfo (`ip netns` under /run/netns, Docker's
/run/docker/netns, CNI's /var/run/netns/cni-*, anyone's), plus the files of those
known directories when mountinfo cannot be read. Each namespace is listed once, by
its (device, inode), labelled by what people call it: the container (or pod) whose
first process lives in it, else its `ip netns` name, else the bind mount's path,
else `pid:PID` of its lowest process; pid 1's is `host`.

Know before changing: the kernel reuses a deleted namespace's inode, so a namespace
is keyed across snapshots by its id (the nsfs NS_GET_ID ioctl, Linux 6.18+, which is
also the SO_NETNS_COOKIE of its sockets; older kernels: the cookie of a socket made
inside it, remembered per inode until the inode is gone from a snapshot). Nothing is
entered or kept open here except for that fallback, and nothing raises for a process
or a mount that vanished while we looked: that namespace is simply not in this
snapshot. A thread that setns()'d elsewhere (as ctfix's own `netns.entered()` does)
is not seen: only each process's own namespace is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ctfix.core.model import ContainerRef
from ctfix.core.netns_scan import NamespaceKind
from ctfix.errors import CtfixError
from ctfix.platform.netns import NamespaceGone as NamespaceGone  # also Entering's
from ctfix.platform.procfs import read_text, stat_key

NamespaceId = int

#: directories whose files are bind mounts of network namespaces
NETNS_DIRS = ("/run/netns", "/var/run/netns", "/run/docker/netns", "/var/run/docker/netns")
_IP_NETNS_DIRS = ("/run/netns/", "/var/run/netns/")

_NSIO = 0xB7
#: _IOR(NSIO, 13, __u64): the namespace's 64-bit id (equal to its netns cookie)
NS_GET_ID = (2 << 30) | (8 << 16) | (_NSIO << 8) | 13
#: _IO(NSIO, 3): the namespace's CLONE_NEW* type
NS_GET_NSTYPE = (_NSIO << 8) | 3
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71


@dataclass(frozen=True, slots=True)
class NamespaceRef:
    """One network namespace as found: how to name it, and how to enter it.

    `id` is stable for the namespace's life and never reused (see the module's note);
    `path` opens it (a bind mount when there is one: it outlives any process);
    `spec` is what `--netns` takes to reach it again; `label` is what output calls
    it; `pid` is its lowest process (None: only a bind mount holds it).
    """

    id: NamespaceId
    dev: int
    inode: int
    path: str
    label: str
    spec: str
    kind: NamespaceKind
    pid: int | None = None
    process: str | None = None  # the lowest process's name (comm)
    container: ContainerRef | None = None
    mounts: tuple[str, ...] = ()


# -- mountinfo ---------------------------------------------------------------------


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \040 \011 \012 \134."""
    if "\\" not in field:
        return field
    out, index = [], 0
    while index < len(field):
        chunk = field[index : index + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and chunk[1:].isdigit():
            out.append(chr(int(chunk[1:], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def netns_mounts(mountinfo: str) -> list[tuple[int, str]]:
    """(inode, mount point) of every bind-mounted network namespace in a
    /proc/PID/mountinfo text, in its order (the same namespace may appear twice)."""
    found: list[tuple[int, str]] = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        if not sep or not tail.startswith("nsfs "):
            continue
        fields = head.split(" ")
        if len(fields) < 5:
            continue
        root = fields[3]
        if root.startswith("net:[") and root.endswith("]") and root[5:-1].isdigit():
            found.append((int(root[5:-1]), _unescape(fields[4])))
    return found


# -- ids ---------------------------------------------------------------------------


_ioctl_works: bool | None = None
#: the fallback's cookies, per (dev, inode), dropped when the inode leaves a snapshot
_cookies: dict[tuple[int, int], int] = {}


def _open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _cookie_inside(fd: int) -> int | None:
    """SO_NETNS_COOKIE of a socket made inside the namespace (kernels before 6.18)."""
    from ctfix.platform import netns

    try:
        with netns.entered_fd(fd, "a namespace being identified"):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with probe:
            raw = probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        value: int = struct.unpack("=Q", raw)[0]
    except (CtfixError, OSError):
        return None
    return value


def namespace_id(fd: int, key: tuple[int, int]) -> NamespaceId:
    """The namespace's id: NS_GET_ID where the kernel has it, else its netns cookie,
    else (a kernel before 5.14, or no privilege to enter) its inode."""
    global _ioctl_works
    if _ioctl_works is not False:
        try:
            value: int = struct.unpack("=Q", fcntl.ioctl(fd, NS_GET_ID, b"\0" * 8))[0]
            _ioctl_works = True
            return value
        except OSError as err:
            if err.errno not in (errno.ENOTTY, errno.EINVAL) or not _is_netns_fd(fd):
                return key[1]  # not a namespace file after all: nothing learnt
            _ioctl_works = False  # a network namespace without NS_GET_ID: an older kernel
    cached = _cookies.get(key)
    if cached is None:
        cached = _cookie_inside(fd) or key[1]
        _cookies[key] = cached
    return cached


# -- discovery ---------------------------------------------------------------------


@dataclass
class _Found:
    """What was seen of one namespace while walking."""

    pids: list[int]
    mounts: list[str]


def _walk_processes(proc: str, found: dict[tuple[int, int], _Found]) -> None:
    try:
        names = os.listdir(proc)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            key = stat_key(f"{proc}/{name}/ns/net")
            if key is not None:
                found.setdefault(key, _Found([], [])).pids.append(int(name))


def _is_netns_fd(fd: int) -> bool:
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def _is_netns(path: str) -> bool:
    fd = _open(path)
    if fd is None:
        return False
    try:
        return _is_netns_fd(fd)
    finally:
        os.close(fd)


def _walk_mounts(proc: str, nsfs_dev: int | None, found: dict[tuple[int, int], _Found]) -> None:
    text = read_text(f"{proc}/self/mountinfo")
    if text is not None:
        candidates = [path for _inode, path in netns_mounts(text)]
    else:
        candidates = []
        for directory in NETNS_DIRS:
            with contextlib.suppress(OSError):
                candidates += [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
    for path in candidates:
        key = stat_key(path)
        # A leftover file whose mount is gone is a plain file of the directory's fs.
        if key is None or (nsfs_dev is not None and key[0] != nsfs_dev):
            continue
        if text is None and not _is_netns(path):
            continue
        entry = found.setdefault(key, _Found([], []))
        if path not in entry.mounts:
            entry.mounts.append(path)


def _label(
    key: tuple[int, int],
    seen: _Found,
    host: tuple[int, int] | None,
    proc: str,
    name_containers: bool,
) -> tuple[str, str, NamespaceKind, ContainerRef | None, str | None]:
    """(label, spec, kind, container, process) of one namespace."""
    pid = seen.pids[0] if seen.pids else None
    process = None
    if pid is not None:
        comm = read_text(f"{proc}/{pid}/comm")
        process = comm.strip() if comm else None
    ip_netns = [m for m in seen.mounts if m.startswith(_IP_NETNS_DIRS)]
    if key == host:
        return "host", f"{proc}/{pid}/ns/net", "host", None, process
    container = None
    if pid is not None and name_containers:
        from ctfix.platform import containers

        container = containers.resolver().for_pid(pid)
    if container is not None:
        label = (
            f"{container.namespace}/{container.pod}"
            if container.pod and container.namespace
            else container.pod or container.name
        )
        named = container.name != container.id[:12]
        # An `ip netns` name (a pod's cni-*) always resolves; `container:NAME` needs
        # the engine (and a CRI lists no pod sandboxes); a mount outlives a pid.
        spec = (
            os.path.basename(ip_netns[0])
            if ip_netns
            else f"container:{container.name}"
            if named
            else seen.mounts[0]
            if seen.mounts
            else f"pid:{pid}"
        )
        return label, spec, "container", container, process
    if ip_netns:
        name = os.path.basename(ip_netns[0])
        return name, name, "ip-netns", None, process
    if seen.mounts:
        return seen.mounts[0], seen.mounts[0], "mount", None, process
    return f"pid:{pid}", f"pid:{pid}", "process", None, process


def host_key(proc: str = "/proc") -> tuple[int, int] | None:
    """(dev, inode) of the host's namespace: pid 1's, or kthreadd's (pid 2, always in
    the initial namespace) where pid 1 cannot be looked at (a sandbox's own init)."""
    key = stat_key(f"{proc}/1/ns/net")
    if key is None and (read_text(f"{proc}/2/comm") or "").strip() == "kthreadd":
        key = stat_key(f"{proc}/2/ns/net")
    return key


def snapshot(
    proc: str = "/proc", *, name_containers: bool = True
) -> dict[NamespaceId, NamespaceRef]:
    """Every network namespace visible now, by id. A few ms for hundreds of processes:
    one stat per process, one read of mountinfo, one open per namespace."""
    found: dict[tuple[int, int], _Found] = {}
    _walk_processes(proc, found)
    own = stat_key(f"{proc}/self/ns/net")
    _walk_mounts(proc, own[0] if own else None, found)
    host = host_key(proc)
    refs: dict[NamespaceId, NamespaceRef] = {}
    for key, seen in found.items():
        seen.pids.sort()
        paths = seen.mounts + [f"{proc}/{pid}/ns/net" for pid in seen.pids[:3]]
        for path in paths:
            fd = _open(path)
            if fd is None:
                continue
            try:
                if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != key:
                    continue  # the pid was reused meanwhile
                ident = namespace_id(fd, key)
            finally:
                os.close(fd)
            label, spec, kind, container, process = _label(key, seen, host, proc, name_containers)
            refs[ident] = NamespaceRef(
                id=ident,
                dev=key[0],
                inode=key[1],
                path=path,
                label=label,
                spec=spec,
                kind=kind,
                pid=seen.pids[0] if seen.pids else None,
                process=process,
                container=container,
                mounts=tuple(seen.mounts),
            )
            break
    for stale in set(_cookies) - set(found):
        del _cookies[stale]
    return _unique_labels(refs)


def _unique_labels(refs: dict[NamespaceId, NamespaceRef]) -> dict[NamespaceId, NamespaceRef]:
    """Two namespaces never share a label in output (a container named like an `ip
    netns` one): the later ones get their id appended."""
    import dataclasses

    seen: set[str] = set()
    unique: dict[NamespaceId, NamespaceRef] = {}
    for ident, ref in sorted(refs.items(), key=lambda item: (_ORDER[item[1].kind], item[0])):
        if ref.label in seen:
            ref = dataclasses.replace(ref, label=f"{ref.label}#{ident}")
        seen.add(ref.label)
        unique[ident] = ref
    return unique


#: the order namespaces are listed in: the host first, then the named ones
_ORDER: dict[NamespaceKind, int] = {
    "host": 0,
    "container": 1,
    "ip-netns": 2,
    "mount": 3,
    "process": 4,
    "chosen": 5,
}


def ordered(refs: Mapping[NamespaceId, NamespaceRef]) -> list[NamespaceRef]:
    """The host first, then containers, `ip netns` ones, mounts, processes; by label."""
    return sorted(refs.values(), key=lambda ref: (_ORDER[ref.kind], ref.label))


@dataclass(frozen=True, slots=True)
class Changes:
    """What happened between two snapshots (a watcher's follow-up)."""

    added: tuple[NamespaceRef, ...]
    removed: tuple[NamespaceRef, ...]
    #: same namespace, new label or path (a container's name became known, a mount went)
    changed: tuple[NamespaceRef, ...]


def diff(
    before: Mapping[NamespaceId, NamespaceRef], after: Mapping[NamespaceId, NamespaceRef]
) -> Changes:
    """Namespaces that appeared, disappeared, or were renamed, in `ordered()` order."""
    return Changes(
        added=tuple(ordered({i: r for i, r in after.items() if i not in before})),
        removed=tuple(ordered({i: r for i, r in before.items() if i not in after})),
        changed=tuple(
            ordered(
                {
                    i: r
                    for i, r in after.items()
                    if i in before and (before[i].label, before[i].path) != (r.label, r.path)
                }
            )
        ),
    )


def open_ref(ref: NamespaceRef) -> int:
    """An open descriptor of the namespace (the caller closes it), checked to be that
    namespace and not a newer one on a reused inode. Raises NamespaceGone when it no
    longer exists (or its pid now names another one)."""
    for path in (ref.path, *ref.mounts):
        fd = _open(path)
        if fd is None:
            continue
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        # The same inode may name a newer namespace: the id tells them apart.
        if key == (ref.dev, ref.inode) and namespace_id(fd, key) == ref.id:
            return fd
        os.close(fd)
    raise NamespaceGone(f"network namespace {ref.label} is gone")


@contextlib.contextmanager
def entered(ref: NamespaceRef) -> Iterator[None]:
    """Run the body inside the namespace on this thread, then come back. Raises
    NamespaceGone when it no longer exists (or its pid now names another one)."""
    from ctfix.platform import netns

    fd = open_ref(ref)
    try:
        with contextlib.ExitStack() as inside:
            try:
                inside.enter_context(netns.entered_fd(fd, ref.label))
            except CtfixError as err:
                if gone(ref):
                    raise NamespaceGone(f"network namespace {ref.label} is gone") from err
                raise
            yield
    finally:
        os.close(fd)


def gone(ref: NamespaceRef) -> bool:
    """The namespace no longer exists: what a failure to open or enter it is, when it
    went meanwhile (a skip, never an error)."""
    try:
        os.close(open_ref(ref))
    except NamespaceGone:
        return True
    return False


def current_id() -> NamespaceId:
    """The id of the calling thread's namespace (after `--netns` was entered)."""
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        return namespace_id(fd, (st.st_dev, st.st_ino))
    finally:
        os.close(fd)
