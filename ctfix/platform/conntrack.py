"""The kernel's conntrack table over raw ctnetlink: dumps and live events.

`dump()` lists entries (filtered in the kernel where it can, >= 5.8, and always again
in user space); `EventSocket` subscribes to events (NEW/UPDATE by default; DESTROY
too for watch's unanswered flows) with an in-kernel BPF filter that lets only UDP
through, and of DESTROY events only entries that never saw a reply, a large receive
buffer, and tells the caller about overflows instead of dying on them. Both decode
with `ctfix.core.decode`.

Know before changing: a netlink socket belongs to the network namespace of the
thread that created it; create sockets after entering the namespace (or inside
`ctfix.platform.netns.entered`). The BPF filter reads fixed offsets of the IPv4 and
IPv6 layouts and lets through whatever it does not recognise, so a new kernel
layout costs speed, never events.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ctfix.core import decode
from ctfix.core.decode import CtEntry, CtEvent, CtTuple, CtUsage
from ctfix.errors import MissingFeatureError, PrivilegeError
from ctfix.platform import bpf

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3

DEFAULT_RCVBUF = 64 << 20
_RECV_SIZE = 1 << 16  # dumps fill skbs up to ~32 KiB; events are one message each

_UNAVAILABLE = {errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.ENOENT, errno.EAFNOSUPPORT}

__all__ = ["CtEntry", "CtEvent", "CtUsage", "EventSocket", "Overflow", "available", "delete",
           "dump"]


def _unavailable() -> MissingFeatureError:
    return MissingFeatureError(
        "conntrack is not available in this network namespace (no ctnetlink)",
        "load the kernel modules: modprobe nf_conntrack nf_conntrack_netlink",
    )


def _open(what: str) -> socket.socket:
    try:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except PermissionError:
        raise PrivilegeError(what) from None
    except OSError as err:
        if err.errno in _UNAVAILABLE:
            raise _unavailable() from None
        raise


def _raise_for(err: int, what: str) -> None:
    if err in (errno.EPERM, errno.EACCES):
        raise PrivilegeError(what)
    if err in _UNAVAILABLE:
        raise _unavailable()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def dump_buffers(
    family: int,
    proto: int | None,
    sport: int | None = None,
    dport: int | None = None,
    *,
    reply_sport: int | None = None,
    src: str | None = None,
    until_done: bool = True,
) -> Generator[bytes, None, None]:
    """The raw recv() buffers of one dump (for `dump()`, benchmarks and fixtures).

    until_done=False: the caller decodes each buffer and stops reading at the end
    itself (`_dump_family`), so the buffers are not walked twice."""
    sock = _open("reading the conntrack table")
    try:
        sock.bind((0, 0))
        request = decode.dump_request(
            family=family,
            proto=proto,
            sport=sport,
            dport=dport,
            reply_sport=reply_sport,
            src=src,
        )
        try:
            sock.send(request)
        except PermissionError:
            raise PrivilegeError("reading the conntrack table") from None
        buf = bytearray(_RECV_SIZE)
        while True:
            n = sock.recv_into(buf)
            chunk = bytes(buf[:n])
            yield chunk
            if until_done and decode.ends_dump(chunk):
                return
    finally:
        sock.close()


def _dump_family(
    family: int,
    proto: int | None,
    sport: int | None,
    dport: int | None,
    reply_sport: int | None = None,
    touching: frozenset[int] | None = None,
    usage: dict[int, CtUsage] | None = None,
    src: str | None = None,
    unreplied: decode.UnrepliedSink | None = None,
) -> Iterator[CtEntry]:
    first = True
    chunks = dump_buffers(
        family, proto, sport, dport, reply_sport=reply_sport, src=src, until_done=False
    )
    for chunk in chunks:
        batch = decode.decode(
            chunk, ports=touching, usage=usage is not None, unreplied=unreplied
        )
        if batch.error:
            if first and batch.error in (errno.EINVAL, errno.EOPNOTSUPP) and proto:
                # A kernel without dump filtering (< 5.8) refuses CTA_FILTER: ask for
                # everything and let the caller's user-space filter work.
                yield from _dump_family(
                    family, None, None, None, touching=touching, usage=usage, unreplied=unreplied
                )
                return
            if first and batch.error == errno.EINVAL and proto is None:
                # nfnetlink answers EINVAL for a subsystem nobody registered: no
                # nf_conntrack_netlink (or no conntrack at all) in this kernel.
                raise _unavailable()
            _raise_for(batch.error, "reading the conntrack table")
        first = False
        if usage is not None and batch.usage is not None:
            for event, used in zip(batch.events, batch.usage, strict=True):
                if event.entry.id is not None:
                    usage[event.entry.id] = used
        for event in batch.events:
            yield event.entry
        # The end (or what ends_dump would call one: not netlink, or empty).
        if batch.done or batch.malformed or not chunk:
            chunks.close()
            return


def dump(
    *,
    family: int | None = None,
    proto: int = 17,
    port: int | None = None,
    zone: int | None = None,
    sport: int | None = None,
    reply_sport: int | None = None,
    touching: frozenset[int] | None = None,
    usage: dict[int, CtUsage] | None = None,
    src: str | None = None,
    unreplied: decode.UnrepliedSink | None = None,
) -> Iterator[CtEntry]:
    """Yield the conntrack entries of the current network namespace.

    family: socket.AF_INET or AF_INET6 (None: both); proto: IP protocol of the
    original tuple (17 = UDP); port: the original tuple's destination port (what
    `conntrack -L -p udp --dport P` selects: requests to a service on P); sport: the
    original tuple's source port (entries a service on P started, e.g. its
    wrong-source replies); reply_sport: the reply tuple's source port (requests a
    DNAT forwarded to a service on P, whatever port they were sent to); zone: only
    this conntrack zone (0 = default); touching: only entries whose orig sport, orig
    dport or reply sport is one of these (checked on the bytes, before decoding: a
    dump of a whole big table read for a few ports, as `ctfix scan` reads it); usage:
    a dict to fill with each entry's age and counters (CtUsage) by conntrack id;
    src: only entries whose original source is this address (the flows this host
    started from it; `family` must be its family); unreplied: with `touching`, the
    entries it leaves out that never saw a reply go to this sink as raw values
    (decode.decode; scan's count of requests to ports with nothing bound), but for
    one in an unusual layout, which is yielded.
    The kernel filters family, protocol, ports and src (>= 5.8); the same conditions are
    checked again here, so older kernels give the same answer, slower. Raises
    PrivilegeError without CAP_NET_ADMIN and MissingFeatureError without ctnetlink.
    """
    families = [family] if family is not None else [socket.AF_INET, socket.AF_INET6]
    for fam in families:
        for entry in _dump_family(
            fam, proto, sport, port, reply_sport, touching, usage, src, unreplied
        ):
            orig = entry.orig
            if (
                touching is not None
                and orig.sport not in touching
                and orig.dport not in touching
                and entry.reply.sport not in touching
                and not (unreplied is not None and not entry.status & decode.IPS_SEEN_REPLY)
            ):
                continue
            if (
                orig.family != fam
                or orig.proto != proto
                or (port is not None and orig.dport != port)
                or (sport is not None and orig.sport != sport)
                or (reply_sport is not None and entry.reply.sport != reply_sport)
                or (zone is not None and entry.zone != zone)
                or (src is not None and orig.src != src)
            ):
                continue
            yield entry


def available() -> None:
    """Raise a one-line error unless ctnetlink answers here (and we may use it)."""
    # A dump for a port no entry has is cheap and exercises privilege and module.
    for _entry in dump(family=socket.AF_INET, proto=17, port=1, zone=None):
        break


class Deleted(NamedTuple):
    """What `delete` did: entries removed, entries already gone (expired, or their
    tuple now belongs to a newer entry with another id, which is kept)."""

    deleted: tuple[CtEntry, ...]
    gone: tuple[CtEntry, ...]


def delete(entries: Iterable[CtEntry]) -> Deleted:
    """Delete exactly these entries, never a wide flush: for each, read the entry that
    holds its original tuple now (IPCTNL_MSG_CT_GET) and delete it (by tuple, zone and
    id, `ctfix.core.decode.delete_request`) only if it is still the same one: same id
    and same reply source (its DNAT target). An entry that expired, or whose tuple now
    belongs to a newer flow (one that follows the rules: another reply source), is left
    alone and counted as gone."""
    sock = _open("deleting conntrack entries")
    deleted: list[CtEntry] = []
    gone: list[CtEntry] = []
    try:
        sock.bind((0, 0))
        for seq, entry in enumerate(entries, 1):
            now, err = _request(sock, decode.get_request(entry, seq=2 * seq))
            target = (entry.reply.src, entry.reply.sport)
            same = (
                bool(now)
                and now[0].id == entry.id
                and (now[0].reply.src, now[0].reply.sport) == target
            )
            if err not in (0, errno.ENOENT):
                _raise_for(err, "reading a conntrack entry")
            if same:
                _, err = _request(sock, decode.delete_request(entry, seq=2 * seq + 1))
                if err not in (0, errno.ENOENT):
                    _raise_for(err, "deleting a conntrack entry")
            (deleted if same and err == 0 else gone).append(entry)
    finally:
        sock.close()
    return Deleted(tuple(deleted), tuple(gone))


def _request(sock: socket.socket, request: bytes) -> tuple[list[CtEntry], int]:
    """Send one acknowledged request: the entries it answered with, and its errno (0:
    done)."""
    try:
        sock.send(request)
    except PermissionError:
        raise PrivilegeError("changing the conntrack table") from None
    buf = bytearray(_RECV_SIZE)
    found: list[CtEntry] = []
    while True:
        n = sock.recv_into(buf)
        batch = decode.decode(memoryview(buf)[:n])
        found += [event.entry for event in batch.events]
        if batch.error or batch.done or not n:
            return found, batch.error


# -- events --------------------------------------------------------------------------


def _be(native: bytes) -> int:
    """What BPF's big-endian load reads from these host-order bytes."""
    return int.from_bytes(native, "big")


def _nla_hdr(length: int, nla_type: int) -> int:
    return _be(struct.pack("=HH", length, nla_type))


#: nlmsg_type of a DESTROY event (IPCTNL_MSG_CT_DELETE), as BPF's ld_h reads it
_BPF_DELETE = _be(struct.pack("=H", decode.MSG_CT_DELETE))
_BPF_PROTO_NUM = _nla_hdr(5, decode.CTA_PROTO_NUM)
_BPF_ID = _nla_hdr(8, decode.CTA_ID)
_BPF_ZONE = _nla_hdr(6, decode.CTA_ZONE)
_BPF_STATUS = _nla_hdr(8, decode.CTA_STATUS)


def _bpf_udp_only() -> bytes:
    """Classic BPF: drop ctnetlink events whose original protocol is not UDP, and
    DESTROY events of entries that saw a reply (IPS_SEEN_REPLY set in CTA_STATUS).

    Offsets: nfgenmsg family at 16; the PROTO_NUM attribute header (len 5, type 1) at
    48 (IPv4) / 72 (IPv6), its value 4 bytes later; nlmsg_type at 4. After the two
    tuples (at 124 / 172) a DESTROY event carries CTA_ZONE (only for a non-default
    zone; 8 bytes padded), CTA_ID and CTA_STATUS (8 bytes each), in that order
    (ctnetlink_conntrack_event). NEW and UPDATE events are filtered on UDP alone. An
    unknown family or layout is accepted: user space checks again.
    """
    ld_b, ld_h, ld_w, jeq, jset, ret = 0x30, 0x28, 0x20, 0x15, 0x45, 0x06
    accept, reject = "accept", "reject"
    prog: list[tuple[int, str | int, str | int, int]] = []
    labels: dict[str, int] = {}

    def op(code: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        prog.append((code, jt, jf, k))

    op(ld_b, 16)
    op(jeq, socket.AF_INET, "v4", "not4")
    labels["not4"] = len(prog)
    op(jeq, socket.AF_INET6, "v6", accept)
    for name, hdr_at, tuples_end in (("v4", 48, 124), ("v6", 72, 172)):
        labels[name] = len(prog)
        op(ld_w, hdr_at)
        op(jeq, _BPF_PROTO_NUM, 0, accept)
        op(ld_b, hdr_at + 4)
        op(jeq, socket.IPPROTO_UDP, 0, reject)
        op(ld_h, 4)
        op(jeq, _BPF_DELETE, 0, accept)  # NEW or UPDATE: UDP is enough
        op(ld_w, tuples_end)
        op(jeq, _BPF_ID, f"{name}-id", 0)
        op(jeq, _BPF_ZONE, 0, accept)
        op(ld_w, tuples_end + 8)
        op(jeq, _BPF_ID, 0, accept)
        op(ld_w, tuples_end + 16)  # zone, id, then status
        op(jeq, _BPF_STATUS, f"{name}-zoned", accept)
        labels[f"{name}-id"] = len(prog)
        op(ld_w, tuples_end + 8)  # id, then status
        op(jeq, _BPF_STATUS, 0, accept)
        op(ld_w, tuples_end + 12)
        op(jset, decode.IPS_SEEN_REPLY, reject, accept)
        labels[f"{name}-zoned"] = len(prog)
        op(ld_w, tuples_end + 20)
        op(jset, decode.IPS_SEEN_REPLY, reject, accept)
    labels[accept] = len(prog)
    op(ret, 0xFFFFFFFF)
    labels[reject] = len(prog)
    op(ret, 0)

    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt_n = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf_n = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out += struct.pack("=HBBI", code, jt_n, jf_n, k)
    return out


class Overflow(Exception):
    """The kernel dropped events (ENOBUFS): resynchronise from a dump, then go on."""


@dataclass
class EventSocket:
    """A subscription to conntrack events in the current network namespace."""

    groups: tuple[int, ...] = (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE)
    rcvbuf: int = DEFAULT_RCVBUF
    udp_only: bool = True

    def __post_init__(self) -> None:
        self.sock = _open("subscribing to conntrack events")
        try:
            self.sock.bind((0, 0))
            for group in self.groups:
                try:
                    self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
                except OSError as err:
                    _raise_for(err.errno or 0, "subscribing to conntrack events")
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            except PermissionError:
                # Without CAP_NET_ADMIN only rmem_max applies; still better than nothing.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            if self.udp_only:
                bpf.attach(self.sock, _bpf_udp_only())
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self._buf = bytearray(_RECV_SIZE)
        self._view = memoryview(self._buf)
        self.inode = os.fstat(self.sock.fileno()).st_ino

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self) -> memoryview | None:
        """The next waiting message, as a view of this socket's buffer, valid until
        the next call (None when none waits); raises Overflow after a kernel drop."""
        try:
            n = self.sock.recv_into(self._buf)
        except BlockingIOError:
            return None
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                raise Overflow() from None
            raise
        return self._view[:n]

    def read(self) -> list[CtEvent]:
        """Events available now ([] when none); raises Overflow after a kernel drop."""
        view = self.recv_into()
        return [] if view is None else decode.decode(view).events

    def read_raw(self) -> bytes | None:
        """One raw message (for recording fixtures); None when none is waiting."""
        try:
            return self.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                raise Overflow() from None
            raise

    def drops(self) -> int | None:
        """Events the kernel dropped for this socket so far (/proc/net/netlink Drops)."""
        try:
            with open("/proc/self/net/netlink") as fh:
                header = fh.readline().split()
                col = header.index("Drops")
                ino_col = header.index("Inode")
                for line in fh:
                    fields = line.split()
                    if len(fields) > ino_col and fields[ino_col] == str(self.inode):
                        return int(fields[col])
        except (OSError, ValueError):
            return None
        return None

    def close(self) -> None:
        self.sock.close()


# -- is a family tracked at all? ---------------------------------------------------------


def probe_tracking(family: int) -> bool | None:
    """Send one datagram over loopback and see whether conntrack made an entry for it.

    The kernel tracks a family in a namespace only once some loaded rule needs
    conntrack (NAT, ct state, ...); /proc's nf_conntrack_count is per namespace but not
    per family, so a probe is the direct test. The datagram goes to the probe socket
    itself (its own address and port): no other socket receives it, and no rule on a
    well-known port counts it. The entry is asked for by its tuple (a hash lookup: a
    dump would walk the conntrack table of the whole host, every namespace's entries,
    ~160 ms at 250k entries). None: cannot tell (loopback is down or has no address of
    that family).
    """
    loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        return None
    try:
        sock.bind((loopback, 0))
        port = sock.getsockname()[1]
        sock.sendto(b"ctfix: is this family tracked?", (loopback, port))
    except OSError:
        return None
    finally:
        sock.close()
    udp = socket.IPPROTO_UDP
    tuple_ = CtTuple(loopback, loopback, port, port, udp, family)
    ask = _open("reading the conntrack table")
    try:
        ask.bind((0, 0))
        found, err = _request(ask, decode.get_request(CtEntry(tuple_, tuple_)))
    finally:
        ask.close()
    if err not in (0, errno.ENOENT):
        _raise_for(err, "reading the conntrack table")
    return bool(found)
