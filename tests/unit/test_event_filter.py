"""watch's in-kernel event filter, run over real recorded messages without a kernel.

The program (`ctfix.platform.conntrack._bpf_udp_only`) is classic BPF; a small
interpreter of the few instructions it uses runs it here over the messages of
fixtures/ctnetlink_destroy.json (recorded by fixtures/record_destroy.py): UDP flows
that ended answered and unanswered, IPv4 and IPv6, default zone and zone 7, and TCP
and IGMP entries. What passes must be exactly what the unanswered detector needs:
every UDP NEW and UPDATE, and a UDP DESTROY only when the entry never saw a reply.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from ctfix.core import decode
from ctfix.platform.conntrack import _bpf_udp_only

FIXTURE = Path(__file__).with_name("fixtures") / "ctnetlink_destroy.json"


def run_bpf(program: bytes, packet: bytes) -> int:
    """The return value of a classic BPF program (only the opcodes the filter uses;
    an out-of-bounds load returns 0, as the kernel's interpreter does)."""
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc = 0
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code in (0x30, 0x28, 0x20):  # ld b/h/w absolute, big-endian
            size = {0x30: 1, 0x28: 2, 0x20: 4}[code]
            if k + size > len(packet):
                return 0
            acc = int.from_bytes(packet[k : k + size], "big")
        elif code == 0x15:  # jeq k
            pc += jt if acc == k else jf
        elif code == 0x45:  # jset k
            pc += jt if acc & k else jf
        elif code == 0x06:  # ret k
            return int(k)
        else:
            raise AssertionError(f"opcode {code:#x} not interpreted")


def _records() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(FIXTURE.read_text())
    return records


def _passes(raw: bytes) -> bool:
    return run_bpf(_bpf_udp_only(), raw) != 0


def test_the_fixture_covers_what_the_filter_decides() -> None:
    """Not blind: answered and unanswered DESTROYs of both families and both zones."""
    seen = {
        (r["kind"], r["entry"]["orig"]["family"], r["entry"]["orig"]["proto"],
         bool(r["entry"]["status"] & decode.IPS_SEEN_REPLY), r["entry"]["zone"] != 0)
        for r in _records()
    }
    for family in (2, 10):
        for replied in (False, True):
            for zoned in (False, True):
                assert (decode.DESTROY, family, 17, replied, zoned) in seen
    assert any(kind == decode.DESTROY and proto == 6 for kind, _f, proto, _r, _z in seen)


@pytest.mark.parametrize("index", range(len(_records())))
def test_the_filter_passes_udp_and_only_unreplied_destroys(index: int) -> None:
    record = _records()[index]
    raw = bytes.fromhex(record["hex"])
    entry = record["entry"]
    udp = entry["orig"]["proto"] == 17
    replied = bool(entry["status"] & decode.IPS_SEEN_REPLY)
    wanted = udp and not (record["kind"] == decode.DESTROY and replied)
    assert _passes(raw) is wanted, record


def _status_at(raw: bytes) -> int:
    """Offset of CTA_STATUS's value in a recorded message (general walk)."""
    pos = 20
    while pos + 4 <= len(raw):
        length, nla_type = struct.unpack_from("=HH", raw, pos)
        if nla_type & decode.NLA_TYPE_MASK == decode.CTA_STATUS:
            return pos + 4
        pos += (length + 3) & ~3
    raise AssertionError("no CTA_STATUS")


def test_an_unknown_layout_passes_rather_than_losing_a_flow() -> None:
    """A kernel that puts another attribute before CTA_STATUS: the filter cannot find
    the status where it expects it and lets the event through (user space decides)."""
    for record in _records():
        entry = record["entry"]
        if record["kind"] != decode.DESTROY or entry["orig"]["proto"] != 17:
            continue
        if not entry["status"] & decode.IPS_SEEN_REPLY:
            continue
        raw = bytearray(bytes.fromhex(record["hex"]))
        header = _status_at(bytes(raw)) - 4
        struct.pack_into("=HH", raw, header, 8, 31)  # an attribute type it does not know
        assert _passes(bytes(raw))
        assert not _passes(bytes.fromhex(record["hex"]))  # the untouched one is dropped


def test_a_truncated_message_is_not_taken_for_udp() -> None:
    record = next(r for r in _records() if r["kind"] == decode.DESTROY)
    assert not _passes(bytes.fromhex(record["hex"])[:40])
