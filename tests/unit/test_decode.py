"""The ctnetlink decoder: recorded real messages, both paths, and hostile input."""

from __future__ import annotations

import json
import pathlib
import socket
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ctfix.core import ctlayout, ctnetlink, decode
from ctfix.core.decode import CtEntry, CtTuple

FIXTURES = json.loads(
    (pathlib.Path(__file__).parent / "fixtures" / "ctnetlink_messages.json").read_text()
)
EVENTS = [r for r in FIXTURES if r["source"] == "event"]
DUMPS = [r for r in FIXTURES if r["source"] == "dump"]
RAW = [bytes.fromhex(r["hex"]) for r in FIXTURES]


def _expected(record: dict[str, Any]) -> CtEntry:
    return CtEntry(
        CtTuple(**record["orig"]),
        CtTuple(**record["reply"]),
        record["status"],
        record["zone"],
        record["mark"],
        record["timeout"],
    )


def _without_id(entry: CtEntry) -> CtEntry:
    return entry._replace(id=None)


def test_fixtures_cover_both_families_zones_and_the_bug_pair() -> None:
    families = {r["entry"]["orig"]["family"] for r in EVENTS}
    assert families == {socket.AF_INET, socket.AF_INET6}
    assert any(r["entry"]["zone"] == 7 and r["entry"]["mark"] == 5 for r in EVENTS)
    assert any(r["done"] for r in DUMPS)


def test_recorded_events_decode_to_their_recorded_values_on_both_paths() -> None:
    for record in EVENTS:
        raw = bytes.fromhex(record["hex"])
        for fast in (True, False):
            batch = decode.decode(raw, fast=fast)
            assert batch.malformed == 0
            assert [e.kind for e in batch.events] == [record["kind"]]
            assert _without_id(batch.events[0].entry) == _expected(record["entry"])
        assert decode.decode_event(raw) == decode.decode(raw).events[0]


def test_recorded_events_take_the_fast_path() -> None:
    for record in EVENTS:
        raw = bytes.fromhex(record["hex"])
        decode.decode_event(raw)
        # Its layout is learned: the next message of its shape is one unpack.
        assert ctlayout.cached(raw, 0, len(raw)) is not None


def test_recorded_dumps_decode_every_entry_and_the_end() -> None:
    for record in DUMPS:
        batch = decode.decode(bytes.fromhex(record["hex"]))
        assert batch.malformed == 0
        assert batch.done == record["done"]
        assert [_without_id(e.entry) for e in batch.events] == [
            _expected(e) for e in record["entries"]
        ]
        assert all(e.kind == decode.DUMPED for e in batch.events)


def test_the_bug_pair_reads_as_request_then_wrong_source_reply() -> None:
    v4 = [decode.decode_event(bytes.fromhex(r["hex"])) for r in EVENTS[:2]]
    assert v4[0] is not None and v4[1] is not None
    request, reply = v4[0].entry, v4[1].entry
    assert not request.seen_reply
    assert (request.reply.src, request.reply.sport) == ("198.51.100.13", 56789)
    assert (reply.orig.src, reply.orig.dst) == ("192.0.2.1", request.reply.dst)


def test_a_kernel_error_and_the_end_of_a_dump_are_reported() -> None:
    error = struct.pack("=IHHII", 36, decode.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1)
    error += b"\0" * 16
    assert decode.decode(error).error == 1
    done = struct.pack("=IHHII", 20, decode.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    assert decode.decode(done).done
    assert decode.ends_dump(done) and not decode.ends_dump(RAW[0])


def test_the_dump_request_asks_the_kernel_to_filter_protocol_and_port() -> None:
    request = decode.dump_request(family=socket.AF_INET, proto=17, dport=5353)
    length, msg_type, flags = struct.unpack_from("=IHH", request)
    assert length == len(request)
    assert msg_type == (1 << 8) | decode.IPCTNL_MSG_CT_GET
    assert flags & 0x300 == 0x300  # NLM_F_DUMP
    attrs = {t: (vs, ve) for t, vs, ve in ctnetlink.attrs(request, 20, len(request))}
    vs, _ = attrs[decode.CTA_FILTER]
    assert struct.unpack_from("=I", request, vs + 4)[0] == (1 << 3) | (1 << 5)
    assert struct.pack(">H", 5353) in request


# -- hostile input ----------------------------------------------------------------------


def _check_never_raises(raw: bytes) -> None:
    batch = decode.decode(raw)
    assert isinstance(batch.events, list)
    decode.decode(raw, fast=False)
    # scan's read for a few ports that hands the unreplied entries to a count
    decode.decode(raw, ports=frozenset({1}), unreplied=lambda *_request: None)
    decode.decode_event(raw)
    decode.packed_event(raw)
    decode.decode_entry(raw)
    decode.ends_dump(raw)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_raise(raw: bytes) -> None:
    _check_never_raises(raw)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(RAW),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=8),
    st.integers(0, 2000),
)
def test_mutated_and_truncated_real_messages_never_raise(
    raw: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    mutated = bytearray(raw)
    for position, value in flips:
        if mutated:
            mutated[position % len(mutated)] = value
    _check_never_raises(bytes(mutated))
    _check_never_raises(bytes(mutated[: cut % (len(mutated) + 1)]))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(RAW), st.integers(0, 0xFFFF))
def test_a_lying_length_field_never_raises(raw: bytes, length: int) -> None:
    mutated = bytearray(raw)
    struct.pack_into("=I", mutated, 0, length)
    _check_never_raises(bytes(mutated))
    if len(mutated) > 24:
        struct.pack_into("=H", mutated, 20, length)  # the first attribute's length
        _check_never_raises(bytes(mutated))


def _first_message(raw: bytes) -> bytes:
    return raw[: struct.unpack_from("=I", raw, 0)[0]]


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(RAW),
    st.sampled_from(RAW),
    st.integers(0, 400),
    st.lists(st.tuples(st.integers(0, 800), st.integers(0, 255)), max_size=4),
)
def test_fast_and_slow_paths_agree_when_a_length_covers_several_messages(
    first: bytes, second: bytes, extra: int, flips: list[tuple[int, int]]
) -> None:
    """Issue 9 item 11: a nlmsg_len that runs into the next message (and other damage)
    must give the same answer on both paths: the same entry, or None on both."""
    one = _first_message(first)
    buf = bytearray(one + second)
    struct.pack_into("=I", buf, 0, min(len(one) + extra, len(buf)))
    for position, value in flips:
        if position < len(buf):
            buf[position] = value
    raw = bytes(buf)
    assert decode.decode_entry(raw, fast=True) == decode.decode_entry(raw, fast=False)
    assert decode.decode(raw, fast=True) == decode.decode(raw, fast=False)
    event = decode.decode_event(raw)
    assert event is None or event.entry == decode.decode_entry(raw, fast=False)


def _packed_agrees(raw: bytes) -> None:
    """watch's hot path (the Packed form) reads a message as decode_event does."""
    event = decode.decode_event(raw)
    packed = decode.packed_event(raw)
    if event is None:
        assert packed is None
    else:
        assert packed == decode.packed_of(event.entry, event.kind)
        assert decode.event_of(packed) == event


def test_recorded_messages_read_the_same_in_the_packed_form() -> None:
    for raw in RAW:
        _packed_agrees(raw)
        _packed_agrees(_first_message(raw))


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(RAW),
    st.sampled_from(RAW),
    st.integers(0, 400),
    st.lists(st.tuples(st.integers(0, 800), st.integers(0, 255)), max_size=4),
)
def test_the_packed_form_agrees_on_damaged_and_overlapping_messages(
    first: bytes, second: bytes, extra: int, flips: list[tuple[int, int]]
) -> None:
    one = _first_message(first)
    buf = bytearray(one + second)
    struct.pack_into("=I", buf, 0, min(len(one) + extra, len(buf)))
    for position, value in flips:
        if position < len(buf):
            buf[position] = value
    _packed_agrees(bytes(buf))

