"""The namespace's DNAT rules (nftables and iptables-legacy) as the NAT model, and a
cheap way to tell whether they changed.

Read-only. The rules are read by ctfix.platform.netfilter_read (once per command: a
command that reads them for other reasons too hands its read over); the parsing is
pure (ctfix.core.nat.nft_json, ctfix.core.nat.legacy).

`RulesetChanges` is what `ctfix watch` listens to: nftables change notifications
(netlink group NFNLGRP_NFTABLES, which iptables-nft's changes go through too) and a
fingerprint of the legacy nat tables, polled: one getsockopt(IPT_SO_GET_ENTRIES) per
existing table, counters zeroed, hashed (no fork, no libiptc).

Know before changing: a backend that cannot be read is an error in the ruleset
(`NatRuleset.errors`), never an empty ruleset: a rule ctfix did not see may be the one
that forwards, so nothing may be called stale then.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct

from ctfix.core.model import Family
from ctfix.core.nat import NatChain, NatRuleset
from ctfix.errors import CtfixError
from ctfix.platform import iptables_legacy, netfilter_read
from ctfix.platform.netfilter_read import Ruleset

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7


def read(ruleset: Ruleset | None = None) -> NatRuleset:
    """Every NAT-relevant chain of the current namespace, both backends, from the
    rules a command read (`netfilter_read.read()`), or from its own read of them."""
    from ctfix.core.nat import legacy, nft_json

    if ruleset is None:
        ruleset = netfilter_read.read(legacy_tables=("nat",))
    chains: list[NatChain] = []
    errors = ruleset.error_lines()
    try:
        chains.extend(nft_json.nat_chains(ruleset.nft, ruleset.nft_texts))
    except CtfixError as err:  # the rule texts could not be read
        errors.append(f"nftables: {err.one_line()}")
    for tables in ruleset.legacy.values():
        for table in tables:
            if table.name == "nat":
                chains.extend(legacy.nat_chains(table))
    return NatRuleset(tuple(chains), tuple(errors))


# -- change notifications -----------------------------------------------------------------

# linux/netfilter_ipv4/ip_tables.h, linux/netfilter_ipv6/ip6_tables.h
_SO_GET_INFO = 64
_SO_GET_ENTRIES = 65
_INFO = struct.Struct("=32sI5I5III")  # name, valid_hooks, hook_entry, underflow, num, size
#: per family: getsockopt level, entry offsets of (comefrom, counters end), next_offset
_LEGACY_LAYOUT: dict[Family, tuple[int, int, int, int, int]] = {
    "ipv4": (socket.SOL_IP, socket.AF_INET, 92, 112, 90),
    "ipv6": (socket.IPPROTO_IPV6, socket.AF_INET6, 144, 168, 142),
}


def legacy_fingerprint() -> bytes:
    """A digest of the existing legacy nat tables' rules (not their counters): it
    changes when a rule is added, removed or edited. b"" when there are none."""
    digest = hashlib.sha256()
    found = False
    for family, (level, af, counters_from, counters_to, next_at) in _LEGACY_LAYOUT.items():
        try:
            if "nat" not in iptables_legacy.loaded_tables(family):
                continue
        except CtfixError:
            continue  # not root: read() says so; nothing to fingerprint
        blob = _legacy_entries(level, af, b"nat")
        if blob is None:
            continue
        found = True
        digest.update(family.encode())
        digest.update(_without_counters(blob, counters_from, counters_to, next_at))
    return digest.digest() if found else b""


def _getsockopt(sock: socket.socket, level: int, option: int, data: bytes) -> bytes:
    """getsockopt with an input buffer (Python's passes only a length, zero-filled)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(data, len(data))
    size = ctypes.c_uint(len(data))
    if libc.getsockopt(sock.fileno(), level, option, buf, ctypes.byref(size)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return buf.raw[: size.value]


def _legacy_entries(level: int, af: int, name: bytes) -> bytes | None:
    try:
        sock = socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError:
        return None
    try:
        asked = struct.pack("=32s", name) + bytes(_INFO.size - 32)
        size = _INFO.unpack(_getsockopt(sock, level, _SO_GET_INFO, asked))[-1]
        # struct ipt_get_entries: name, size, then the entries, 8-byte aligned (u64
        # counters): they start at 40.
        request = struct.pack("=32sI4x", name, size) + bytes(size)
        reply = _getsockopt(sock, level, _SO_GET_ENTRIES, request)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.EPERM, errno.ENOPROTOOPT, errno.EAGAIN):
            return None
        raise
    finally:
        sock.close()
    return reply[40:]


def _without_counters(blob: bytes, start: int, end: int, next_at: int) -> bytes:
    """The entries with each entry's comefrom and packet/byte counters zeroed."""
    data = bytearray(blob)
    offset = 0
    while offset + end <= len(data):
        data[offset + start : offset + end] = bytes(end - start)
        step = struct.unpack_from("=H", data, offset + next_at)[0]
        if step <= 0:
            break
        offset += step
    return bytes(data)


class RulesetChanges:
    """Tells watch when the namespace's NAT rules may have changed.

    `sock` is readable when nftables changed (drain it with `drain()`); `poll()`
    compares the legacy fingerprint with the last one (call it about once a second).
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        #: why nftables changes cannot be followed (None: they are)
        self.unsubscribed: str | None = None
        try:
            self.sock.bind((0, 0))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError as err:  # no nf_tables in this kernel, say
            self.unsubscribed = err.strerror or str(err)
        self._legacy = legacy_fingerprint()

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        """Read what is waiting; True when it said something changed (any message,
        or a lost one)."""
        changed = False
        for _ in range(4096):
            try:
                if not self.sock.recv(1 << 16):
                    break
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
            changed = True
        return changed

    def poll(self) -> bool:
        """True when the legacy nat tables changed since the last call."""
        now = legacy_fingerprint()
        changed = now != self._legacy
        self._legacy = now
        return changed

    def close(self) -> None:
        self.sock.close()

