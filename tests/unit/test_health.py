"""Conntrack health: the statistics decoder on recorded real messages (checked against
what `conntrack -S` / `-C` said in the same instant), hostile input, and the verdict
and reasons of the health model from recorded readings."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctfix.core import ctstats, decode
from ctfix.core.ctstats import CpuStats
from ctfix.core.health import COUNTERS, PROBLEM_CODES, RISING_CODES, Sample, assess, increase
from ctfix.render import health as render
from ctfix.render.style import Style

ROOT = pathlib.Path(__file__).parents[2]
RECORDS: list[dict[str, Any]] = json.loads(
    (ROOT / "tests" / "unit" / "fixtures" / "ctstats_messages.json").read_text()
)
BY_NAME = {r["name"]: r for r in RECORDS}


def sample(name: str) -> Sample:
    """A recorded reading, decoded."""
    record = BY_NAME[name]
    cpus = ctstats.decode_stats(bytes.fromhex(record["stats_cpu_hex"])).cpus
    global_stats = ctstats.decode_stats(bytes.fromhex(record["stats_hex"])).global_stats
    assert global_stats is not None
    return Sample(
        record["taken"],
        tuple(cpus),
        global_stats.entries,
        global_stats.max_entries,
        record["buckets"],
    )


def with_counters(base: Sample, taken: float, **rises: int) -> Sample:
    """base, `taken` seconds later, with counters risen on CPU 0."""
    first = base.cpus[0]
    counters = dict(first.counters)
    for name, rise in rises.items():
        counters[name] = counters.get(name, 0) + rise
    return dataclasses.replace(
        base, taken=base.taken + taken, cpus=(CpuStats(first.cpu, counters), *base.cpus[1:])
    )


# -- the decoder ------------------------------------------------------------------------


def test_fixtures_hold_a_quiet_a_driven_and_a_full_namespace() -> None:
    assert [r["name"] for r in RECORDS] == ["quiet", "driven", "full"]
    driven = BY_NAME["driven"]["conntrack_S"]
    assert sum(cpu["insert_failed"] for cpu in driven.values()) > 0
    assert sum(cpu["error"] for cpu in driven.values()) > 0
    full = BY_NAME["full"]
    assert sum(cpu["early_drop"] for cpu in full["conntrack_S"].values()) > 0


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r["name"])
def test_recorded_messages_decode_to_what_conntrack_said_in_the_same_instant(
    record: dict[str, Any],
) -> None:
    per_cpu = ctstats.decode_stats(bytes.fromhex(record["stats_cpu_hex"]))
    assert per_cpu.done and per_cpu.error == 0 and per_cpu.malformed == 0
    assert {str(c.cpu): c.counters for c in per_cpu.cpus} == record["conntrack_S"]
    global_batch = ctstats.decode_stats(bytes.fromhex(record["stats_hex"]))
    assert global_batch.done and global_batch.error == 0 and global_batch.malformed == 0
    assert global_batch.global_stats is not None
    assert global_batch.global_stats.entries == record["conntrack_C"]
    assert global_batch.global_stats.max_entries == 262144


def test_requests_are_what_the_kernel_expects() -> None:
    dump = ctstats.stats_cpu_request(seq=7)
    # nlmsghdr: len 20, type (NFNL_SUBSYS_CTNETLINK << 8) | 4, REQUEST|DUMP, seq 7.
    assert dump.hex() == "14000000" + "0401" + "0103" + "07000000" + "00000000" + "00000000"
    acked = ctstats.stats_request()
    assert acked[4:8].hex() == "0501" + "0500"  # GET_STATS, REQUEST|ACK


@given(st.binary(max_size=512))
def test_any_bytes_decode_without_raising(data: bytes) -> None:
    batch = ctstats.decode_stats(data)
    assert batch.malformed >= 0


def test_every_truncation_of_a_recorded_reply_decodes_without_raising() -> None:
    raw = bytes.fromhex(BY_NAME["driven"]["stats_cpu_hex"])
    for end in range(len(raw)):
        batch = ctstats.decode_stats(raw[:end])
        assert len(batch.cpus) <= 2


counter_values = st.dictionaries(
    st.sampled_from(ctstats.CPU_ATTRIBUTES), st.integers(0, 2**32 - 1), max_size=15
)


@given(st.integers(0, 4095), counter_values)
def test_encoded_counters_decode_to_the_same_values(cpu: int, counters: dict[str, int]) -> None:
    raw = ctstats.encode_cpu_stats(CpuStats(cpu, counters))
    assert ctstats.decode_stats(raw).cpus == [CpuStats(cpu, counters)]


def test_unknown_attributes_are_skipped_and_missing_ones_stay_absent() -> None:
    raw = bytearray(ctstats.encode_cpu_stats(CpuStats(1, {"drop": 5})))
    # A counter from a newer kernel (type 42) after the known one.
    extra = decode.nla(42, (9).to_bytes(4, "big"))
    raw += extra
    raw[0:4] = len(raw).to_bytes(4, "little")
    [cpu] = ctstats.decode_stats(bytes(raw)).cpus
    assert cpu.counters == {"drop": 5}
    assert cpu.get("clash_resolve") is None


def test_a_netlink_error_is_reported_not_raised() -> None:
    header = (36).to_bytes(4, "little") + (2).to_bytes(2, "little") + bytes(10)
    error = header + (-1 & 0xFFFFFFFF).to_bytes(4, "little") + bytes(16)  # -EPERM
    batch = ctstats.decode_stats(error)
    assert batch.done and batch.error == 1


# -- the model ----------------------------------------------------------------------------


def test_one_quiet_reading_is_healthy_and_says_it_cannot_see_rates() -> None:
    health = assess(sample("quiet"))
    assert health.verdict == "healthy"
    assert health.codes == ("no-problem-seen", "totals-only")
    assert health.interval is None
    assert all(c.total == 0 and c.rate is None for c in health.counters)
    assert health.fill == 0.0


def test_old_drops_in_one_reading_are_told_not_judged() -> None:
    health = assess(sample("driven"))
    assert health.verdict == "healthy"
    assert health.counter("insert_failed").total == 3
    assert "insert_failed=3" in dict((r.code, r.text) for r in health.reasons)["totals-only"]


def test_the_snat_collision_interval_is_a_problem_with_its_rates() -> None:
    quiet, driven = sample("quiet"), sample("driven")
    health = assess(driven, quiet)
    assert health.verdict == "problem"
    assert health.codes == ("insert-failed-rising", "drops-rising", "error-rising")
    assert health.interval == pytest.approx(driven.taken - quiet.taken)
    failed = health.counter("insert_failed")
    assert failed.increase == 3 and failed.total == 3
    assert failed.rate == pytest.approx(3 / (driven.taken - quiet.taken))
    assert health.counter("insert").increase == 200
    assert health.counter("early_drop").increase == 0


def test_a_full_table_is_a_problem_in_one_reading_and_over_an_interval() -> None:
    one = assess(sample("full"))
    assert one.verdict == "problem"
    assert one.codes[0] == "table-full"
    assert one.fill == 100.0
    interval = assess(sample("full"), sample("driven"))
    assert interval.verdict == "problem"
    assert interval.codes == ("table-full", "early-drops-rising")
    assert interval.counter("early_drop").increase == sample("full").total("early_drop")


def test_nearly_full_starts_at_85_percent() -> None:
    base = sample("quiet")
    limit = base.max_entries
    assert limit is not None
    below = dataclasses.replace(base, entries=limit * 85 // 100 - 1)
    at = dataclasses.replace(base, entries=-(-limit * 85 // 100))
    assert assess(below).verdict == "healthy"
    assert assess(at).codes[0] == "table-nearly-full"
    assert assess(at).verdict == "problem"


def test_a_quiet_interval_is_healthy() -> None:
    quiet = sample("quiet")
    health = assess(with_counters(quiet, 5.0), quiet)
    assert health.verdict == "healthy"
    assert health.codes == ("no-problem-seen",)
    assert all(c.increase == 0 and c.rate == 0.0 for c in health.counters)


@pytest.mark.parametrize(
    ("rises", "codes", "verdict"),
    [
        ({"chain_toolong": 2, "insert_failed": 2, "drop": 2}, 4, "problem"),
        ({"clash_resolve": 40}, ("no-problem-seen", "clash-resolve-rising"), "healthy"),
        ({"search_restart": 1}, ("no-problem-seen", "search-restart-rising"), "healthy"),
        ({"invalid": 3}, ("no-problem-seen", "invalid-rising"), "healthy"),
        ({"early_drop": 1}, ("early-drops-rising",), "problem"),
        ({"drop": 1}, ("drops-rising",), "problem"),
    ],
)
def test_each_counter_turns_the_verdict_or_is_told(
    rises: dict[str, int], codes: tuple[str, ...] | int, verdict: str
) -> None:
    quiet = sample("quiet")
    health = assess(with_counters(quiet, 2.0, **rises), quiet)
    assert health.verdict == verdict
    if isinstance(codes, int):
        assert set(health.codes) == {
            "insert-failed-rising",
            "drops-rising",
            "chain-too-long-rising",
        }
        assert len(health.codes) == 3
    else:
        assert health.codes == codes
    for name, rise in rises.items():
        assert health.counter(name).rate == pytest.approx(rise / 2.0)


def test_u32_counters_wrap_per_cpu() -> None:
    before = Sample(0.0, (CpuStats(0, {"drop": 2**32 - 2}), CpuStats(1, {"drop": 7})), 0, 1)
    after = Sample(1.0, (CpuStats(0, {"drop": 1}), CpuStats(1, {"drop": 7})), 0, 1)
    assert increase("drop", before, after) == 3
    assert assess(after, before).counter("drop").rate == 3.0


def test_a_kernel_without_newer_counters_says_so() -> None:
    old = {name: 0 for name in COUNTERS if name not in ("clash_resolve", "chain_toolong")}
    first = Sample(0.0, (CpuStats(0, old),), 10, 1000)
    health = assess(dataclasses.replace(first, taken=1.0), first)
    assert health.counter("chain_toolong").total is None
    assert health.counter("chain_toolong").rate is None
    assert health.verdict == "healthy"
    assert health.codes[-1] == "counters-not-reported"


def test_no_limit_means_no_fill() -> None:
    health = assess(dataclasses.replace(sample("quiet"), max_entries=0))
    assert health.fill is None and health.verdict == "healthy"


# -- rendering and the documented contract -----------------------------------------------


def test_json_document_has_the_documented_keys_and_the_kernel_names() -> None:
    health = assess(sample("driven"), sample("quiet"))
    doc = render.to_json_obj(health, "ns1")
    assert doc["schema"] == 2 and doc["netns"] == "ns1"
    assert (doc["entries"], doc["max"]) == (203, 262144)
    assert doc["fill"] == round(100 * 203 / 262144, 3)
    driven = BY_NAME["driven"]["conntrack_S"]
    for name in COUNTERS:
        assert doc[name] == sum(cpu[name] for cpu in driven.values())
    assert [cpu["cpu"] for cpu in doc["per_cpu"]] == [0, 1]
    assert doc["increase"]["insert_failed"] == 3
    assert doc["rates"]["drop"] > 0
    assert doc["verdict"] == "problem"
    assert [r["code"] for r in doc["reasons"]] == list(health.codes)
    one = render.to_json_obj(assess(sample("quiet")), "current")
    assert one["interval"] is None and one["rates"] is None and one["increase"] is None


def test_text_report_shows_every_reason_code_and_counter() -> None:
    health = assess(sample("full"), sample("driven"))
    text = render.render_text(health, "ns1", Style(False))
    for code in health.codes:
        assert f"[{code}]" in text
    for name in COUNTERS:
        assert re.search(rf"^  {name} ", text, re.MULTILINE)


def _documented_codes() -> dict[str, str]:
    """code -> verdict, from the code table of docs/json.md's health section."""
    doc = (ROOT / "docs" / "json.md").read_text()
    section = doc.split("## health", 1)[1].split("\n## ", 1)[0]
    section = section.split("| code | verdict |", 1)[1]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| (\w+) \|", section, re.MULTILINE)
    return dict(rows)


def test_every_reason_code_is_documented_in_docs_json_md() -> None:
    source = (ROOT / "ctfix" / "core" / "health.py").read_text()
    emitted = set(re.findall(r'Reason\(\s*"([a-z0-9-]+)"', source))
    emitted |= set(RISING_CODES.values())
    assert emitted >= PROBLEM_CODES
    documented = _documented_codes()
    assert emitted == set(documented)
    assert {code for code, verdict in documented.items() if verdict == "problem"} == PROBLEM_CODES


# -- the command line -------------------------------------------------------------------


def test_count_without_interval_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    from ctfix.cli import main

    assert main(["health", "--count", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ctfix health: error: --count")


@pytest.mark.parametrize("bad", [["--interval", "0"], ["--interval", "5", "--count", "0"]])
def test_bad_numbers_are_usage_errors(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from ctfix.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["health", *bad])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_health_help_imports_no_heavy_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom ctfix.cli import main\n"
        "try:\n    main(['health', '--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('pyroute2', 'iptc', 'yaml', 'prometheus_client', 'nftables')"
        " if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
