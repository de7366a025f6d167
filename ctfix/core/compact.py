"""Conntrack entries kept as bytes: a dump's entries held for a second look without
holding them as objects. Pure.

A `CtEntry` with its two tuples and their strings costs about 700 bytes in CPython;
here one costs 54 bytes (IPv4) or 102 (IPv6) in one growing bytearray. Each record
starts with the family and the bytes a detector looks an entry up by (its original
destination address and port, as the wrong-source detector packs them), so a reader
can skip a record without building anything (`probes`) and build only the entries it
needs (`entry_at`), equal to the ones stored: addresses are formatted by
`ctfix.core.decode`'s own (cached) formatting, as the dump's decoder did.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

from ctfix.core.decode import CtEntry, CtTuple, address_bytes, address_text

# family | orig dst, dport (the probe) | orig src, sport | reply src, dst, sport, dport |
# orig proto, reply proto | status, zone | which of mark, timeout, id, start are None |
# mark, timeout, id, start
_V4 = struct.Struct(">B4sH4sH4s4sHHBBIHBIIIQ")
_V6 = struct.Struct(">B16sH16sH16s16sHHBBIHBIIIQ")
_MARK, _TIMEOUT, _ID, _START = 1, 2, 4, 8
_new_tuple = tuple.__new__


class CompactEntries:
    """Entries appended in order, read back in the same order (module doc)."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return len(self._data)

    def append(self, entry: CtEntry) -> None:
        orig, reply = entry.orig, entry.reply
        none = (
            (_MARK if entry.mark is None else 0)
            | (_TIMEOUT if entry.timeout is None else 0)
            | (_ID if entry.id is None else 0)
            | (_START if entry.start is None else 0)
        )
        pack = address_bytes
        self._data += (_V6 if orig.family == socket.AF_INET6 else _V4).pack(
            orig.family,
            pack(orig.dst), orig.dport,
            pack(orig.src), orig.sport,
            pack(reply.src), pack(reply.dst), reply.sport, reply.dport,
            orig.proto, reply.proto,
            entry.status, entry.zone, none,
            entry.mark or 0, entry.timeout or 0, entry.id or 0, entry.start or 0,
        )  # fmt: skip
        self._count += 1

    def probes(self) -> Iterator[tuple[bytes, int]]:
        """(orig dst address + port as bytes, the record's offset) of each entry, in order."""
        data = self._data
        offset = 0
        end = len(data)
        v6 = socket.AF_INET6
        while offset < end:
            if data[offset] == v6:
                yield bytes(data[offset + 1 : offset + 19]), offset
                offset += _V6.size
            else:
                yield bytes(data[offset + 1 : offset + 7]), offset
                offset += _V4.size

    def entry_at(self, offset: int) -> CtEntry:
        """The entry whose record starts at `offset` (from `probes`)."""
        data = self._data
        layout = _V6 if data[offset] == socket.AF_INET6 else _V4
        (fam, odst, odport, osrc, osport, rsrc, rdst, rsport, rdport, oproto, rproto,
         status, zone, none, mark, timeout, ct_id, start) = layout.unpack_from(data, offset)
        text = address_text
        orig = _new_tuple(CtTuple, (text(osrc), text(odst), osport, odport, oproto, fam))
        reply = _new_tuple(CtTuple, (text(rsrc), text(rdst), rsport, rdport, rproto, fam))
        return _new_tuple(
            CtEntry,
            (
                orig, reply, status, zone,
                None if none & _MARK else mark,
                None if none & _TIMEOUT else timeout,
                None if none & _ID else ct_id,
                None if none & _START else start,
            ),
        )  # fmt: skip

    def __iter__(self) -> Iterator[CtEntry]:
        for _probe, offset in self.probes():
            yield self.entry_at(offset)
