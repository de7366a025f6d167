"""UDP sockets on a port (sock_diag), and the process that owns each one.

Know before changing: sock_diag answers for the calling thread's network namespace,
but /proc is the whole PID namespace: the owner of a socket is found by its inode
(`socket:[INODE]` links under /proc/PID/fd), which is unique across namespaces.
A netcat-style server `connect()`s to its first client, so a connected socket on the
port is still the service: list both unconnected and connected sockets.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ctfix.core.model import ContainerRef, Family, Listener
from ctfix.platform import nlsock
from ctfix.platform.procfs import read_text

SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_SKV6ONLY = 11
TCP_ESTABLISHED = 1
ALL_STATES = 0xFFFFFFFF

# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid
# (sport, dport big-endian, src[16], dst[16], if, cookie[2]).
_REQUEST = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_SIZE = 48
# inet_diag_msg: family, state, timer, retrans, sockid, expires, rqueue, wqueue, uid, inode
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_MSG_SIZE = _MSG_HEAD.size + _SOCKID_SIZE + _MSG_TAIL.size


@dataclass(frozen=True, slots=True)
class UdpSocket:
    """One UDP socket as sock_diag reports it."""

    family: Family
    address: str
    port: int
    peer: str | None  # connected peer "addr:port", None when unconnected
    inode: int
    uid: int
    v6only: bool | None


def _address(family: int, raw: bytes) -> str:
    size = 4 if family == socket.AF_INET else 16
    return socket.inet_ntop(family, raw[:size])


def udp_sockets(port: int | None = None) -> list[UdpSocket]:
    """Every UDP socket (IPv4 and IPv6, any state) whose local port is `port` (None:
    every UDP socket of the namespace)."""
    from ctfix.core.addr import endpoint

    found: list[UdpSocket] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        # Dump all UDP sockets of the family and filter here: a host has few UDP
        # sockets, and an exact-match request would miss wildcard binds.
        payload = _REQUEST.pack(family, socket.IPPROTO_UDP, 0, ALL_STATES) + b"\0" * _SOCKID_SIZE
        for _kind, body in nlsock.request(
            nlsock.NETLINK_SOCK_DIAG,
            SOCK_DIAG_BY_FAMILY,
            payload,
            dump=True,
            what="listing UDP sockets (sock_diag)",
        ):
            if len(body) < _MSG_SIZE:
                continue
            fam, state, _timer, _retrans = _MSG_HEAD.unpack_from(body)
            sport, dport, src, dst = _SOCKID.unpack_from(body, _MSG_HEAD.size)
            if port is not None and sport != port:
                continue
            _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(body, _MSG_HEAD.size + _SOCKID_SIZE)
            attrs = nlsock.attributes(body, _MSG_SIZE, len(body))
            v6only_raw = attrs.get(INET_DIAG_SKV6ONLY)
            peer = (
                endpoint(_address(fam, dst), dport) if state == TCP_ESTABLISHED and dport else None
            )
            found.append(
                UdpSocket(
                    family="ipv6" if fam == socket.AF_INET6 else "ipv4",
                    address=_address(fam, src),
                    port=sport,
                    peer=peer,
                    inode=inode,
                    uid=uid,
                    v6only=bool(v6only_raw[0]) if v6only_raw else None,
                )
            )
    return found


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    process: str | None
    cmdline: tuple[str, ...]
    unit: str | None
    exe: str | None = None  # /proc/PID/exe's target; None when it cannot be read
    container: ContainerRef | None = None


_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")


def socket_holders(inodes: Iterable[int], proc: str = "/proc") -> dict[int, list[Owner]]:
    """inode -> every process holding that socket open, lowest pid first.

    A pre-forking daemon (nsd, kamailio, a master with workers) shares one socket
    among several processes; any of them may answer, so all are listed. Every
    process's descriptors are read: the scan cannot stop at the first holder.
    """
    wanted = set(inodes)
    holders: dict[int, list[Owner]] = {}
    if not wanted:
        return holders
    pids = sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to read
        held: set[int] = set()
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            match = _SOCKET_LINK.fullmatch(target)
            if match is not None and int(match.group(1)) in wanted:
                held.add(int(match.group(1)))
        if held:
            owner = _owner(pid, proc)
            for inode in held:
                holders.setdefault(inode, []).append(owner)
    return holders


def _owner(pid: int, proc: str) -> Owner:
    comm = read_text(f"{proc}/{pid}/comm")
    raw_cmdline = read_text(f"{proc}/{pid}/cmdline") or ""
    cmdline = tuple(part for part in raw_cmdline.split("\0") if part)
    try:
        exe: str | None = os.readlink(f"{proc}/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = None  # a kernel thread, or another user's process without privileges
    cgroup = read_text(f"{proc}/{pid}/cgroup") or ""
    from ctfix.platform import containers

    return Owner(
        pid=pid,
        process=comm.strip() if comm else None,
        cmdline=cmdline,
        unit=unit_from_cgroup(cgroup),
        exe=exe,
        container=containers.resolver().for_cgroup(cgroup),
    )


def unit_from_cgroup(text: str) -> str | None:
    """A container (`docker:abcdef123456`) or a systemd unit from /proc/PID/cgroup."""
    from ctfix.platform.containers import container_from_cgroup

    found = container_from_cgroup(text)
    if found is not None:
        return f"{found.engine or 'container'}:{found.id[:12]}"
    for line in text.splitlines():
        parts = [part for part in line.split(":", 2)[-1].split("/") if part]
        for part in reversed(parts):
            if part.endswith((".service", ".scope")) and not part.startswith("session-"):
                return part
    return None


def listeners(port: int | None = None) -> list[tuple[Listener, int]]:
    """The port's sockets (None: every UDP socket) with their owners, each with the
    socket's uid (for routing)."""
    sockets = udp_sockets(port)
    holders = socket_holders(sock.inode for sock in sockets)
    result: list[tuple[Listener, int]] = []
    for sock in sockets:
        held_by = holders.get(sock.inode, [])
        owner = held_by[0] if held_by else None
        listener = Listener(
            address=sock.address,
            port=sock.port,
            family=sock.family,
            state="connected" if sock.peer else "listening",
            pid=owner.pid if owner else None,
            process=owner.process if owner else None,
            cmdline=owner.cmdline if owner else (),
            unit=owner.unit if owner else None,
            container=owner.container if owner else None,
            v6only=sock.v6only if sock.family == "ipv6" else None,
            peer=sock.peer,
            exe=owner.exe if owner else None,
            processes=tuple((held.pid, held.process) for held in held_by),
        )
        result.append((listener, sock.uid))
    return result
