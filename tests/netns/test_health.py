"""`ctfix health` against the kernel: its figures are `conntrack -S` / `-C`'s, its
verdict turns when conntrack drops packets (a colliding SNAT: insert_failed and drop)
or when the table is full, and the exit status follows; `ctfix watch --metrics`
exports the same counters.

Know before changing: the readings of ctfix and of the conntrack tool are different
moments, so ctfix's figures must lie between the tool's before and after (they are
equal when nothing moved). A verdict over an interval needs the counter to move
inside the interval: the test drives it after ctfix says its first reading is taken,
checks that conntrack had counted it before ctfix's second reading was due (ctfix
reads to a deadline on the monotonic clock), and otherwise starts again with a longer
interval (no sleeps, no timing assumptions).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from ctfix.lab.topology import Topology, lab_topology
from tests.netns.conntrack_drive import (
    add_colliding_snat,
    collide,
    conntrack_count,
    conntrack_stats,
    load_entries,
    send_requests,
    send_unrelated_icmp_error,
    start_broken_server,
    summed,
    wait_counter,
)
from tests.netns.metrics_http import free_port, scrape

PORT = 56789


def health_argv(topo: Topology, *args: str) -> list[str]:
    return [sys.executable, "-m", "ctfix", "health", "--netns", topo.host, "--json", *args]


def health(topo: Topology, *args: str) -> tuple[int, dict[str, Any]]:
    """`ctfix health --netns HOST --json ARGS`: exit status and the (last) document."""
    proc = subprocess.run(
        health_argv(topo, *args),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout.splitlines()[-1])


def health_during(topo: Topology, drive: Callable[[], None]) -> tuple[int, dict[str, Any]]:
    """`ctfix health --interval T` with `drive()` run inside its interval."""
    interval = 2.0
    while True:
        # ctfix's second reading comes `interval` after its first, which comes after
        # this (both on the machine's one monotonic clock): a rise conntrack counted
        # before launched + interval is inside the interval, however slow the rest.
        launched = time.monotonic()
        proc = subprocess.Popen(
            health_argv(topo, "--interval", str(interval)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            started = proc.stderr.readline()
            assert "first reading taken" in started, started + proc.stderr.read()
            drive()
            inside = time.monotonic() < launched + interval
            out, err = proc.communicate(timeout=interval + 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if inside:
            assert proc.returncode in (0, 1), err
            return proc.returncode, json.loads(out)
        # This machine was too slow for the interval: the rise may have missed it.
        interval *= 2
        assert interval <= 64, "could not drive the counter within any interval"


def codes(doc: dict[str, Any]) -> list[str]:
    return [reason["code"] for reason in doc["reasons"]]


def assert_between(low: int, value: int, high: int, what: str) -> None:
    assert low <= value <= high, f"{what}: ctfix {value}, conntrack {low} .. {high}"


def test_health_json_equals_conntrack_summed_over_cpus(lab: Topology) -> None:
    start_broken_server(lab, PORT)
    add_colliding_snat(lab, PORT)
    collide(lab, PORT, 3)
    errors = summed(conntrack_stats(lab), "error")
    send_unrelated_icmp_error(lab)
    wait_counter(lab, "error", errors + 1)
    load_entries(lab, 150)

    before, count_before = conntrack_stats(lab), conntrack_count(lab)
    status, doc = health(lab)
    after, count_after = conntrack_stats(lab), conntrack_count(lab)

    assert status == 0 and doc["verdict"] == "healthy"
    assert doc["schema"] == 2 and doc["netns"] == lab.host
    assert {cpu["cpu"] for cpu in doc["per_cpu"]} == set(after)
    # Every counter the reference tool shows, under the same (kernel) name.
    for name in after[0]:
        assert_between(summed(before, name), doc[name], summed(after, name), name)
        for cpu in doc["per_cpu"]:
            number = cpu["cpu"]
            low, high = before[number][name], after[number][name]
            assert_between(low, cpu[name], high, f"{name} on CPU {number}")
    assert doc["insert_failed"] >= 3 and doc["drop"] >= 3
    assert doc["insert"] >= 150 and doc["error"] >= 1
    low, high = sorted((count_before, count_after))
    assert_between(low, doc["entries"], high, "entries")
    # In a child namespace the limit is the host's.
    host_max = int(pathlib.Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    assert doc["max"] == host_max
    assert doc["fill"] == pytest.approx(100 * doc["entries"] / host_max, abs=1e-3)


def test_dropped_replies_turn_the_verdict_and_the_exit_status(lab: Topology) -> None:
    start_broken_server(lab, PORT)
    add_colliding_snat(lab, PORT)

    status, quiet = health(lab, "--interval", "0.5")
    assert (status, quiet["verdict"]) == (0, "healthy")
    assert codes(quiet) == ["no-problem-seen"]

    def dropped_replies() -> None:
        collide(lab, PORT, 3)

    status, doc = health_during(lab, dropped_replies)
    assert (status, doc["verdict"]) == (1, "problem")
    assert {"insert-failed-rising", "drops-rising"} <= set(codes(doc))
    assert doc["increase"]["insert_failed"] == 3 and doc["increase"]["drop"] == 3
    assert doc["rates"]["insert_failed"] > 0

    # Afterwards the drops are history: one reading tells them, and does not judge.
    status, later = health(lab)
    assert (status, later["verdict"]) == (0, "healthy")
    assert "totals-only" in codes(later) and later["insert_failed"] >= 3


def test_a_full_table_turns_the_verdict_and_evicts() -> None:
    limit = int(pathlib.Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    if limit > 1_000_000:
        pytest.skip(
            f"nf_conntrack_max is {limit}: filling a namespace to it would take too long; "
            "the full-table verdict is covered by the recorded readings (unit tests)"
        )
    # IPv4 only: fewer short-lived entries (neighbour discovery) that come and go.
    with lab_topology(netfilter="nft") as lab:
        fill_and_evict(lab, limit)


def fill_and_evict(lab: Topology, limit: int) -> None:
    # conntrack -R stops at the first entry it cannot add (a full table with nothing to
    # evict near bucket 0); top up until the namespace holds exactly the limit.
    loaded = 0
    while (count := conntrack_count(lab)) < limit:
        load_entries(lab, limit - count + 10, first=loaded)
        loaded += limit - count + 10
    assert count == limit

    status, doc = health(lab)
    assert (status, doc["verdict"]) == (1, "problem")
    assert codes(doc)[0] == "table-full"
    assert doc["entries"] == doc["max"] == limit and doc["fill"] == 100.0

    evicted = summed(conntrack_stats(lab), "early_drop")

    def new_flows() -> None:
        send_requests(lab, PORT + 1, 5)
        wait_counter(lab, "early_drop", evicted + 5)

    status, doc = health_during(lab, new_flows)
    assert (status, doc["verdict"]) == (1, "problem")
    # One new flow may evict several entries (all the unreplied ones of a hash bucket),
    # so the table need not be full any more at the second reading.
    assert codes(doc)[0] in ("table-full", "table-nearly-full")
    assert "early-drops-rising" in codes(doc)
    assert doc["increase"]["early_drop"] >= 5


def _conntrack_values(topo: Topology, port: int) -> dict[str, float]:
    """ctfix_conntrack_* values from watch's metrics in the lab's host namespace (where
    it was started); none while it does not answer yet."""
    try:
        text = scrape(topo.host, port)
    except ConnectionRefusedError:
        return {}
    return {
        line.split("{", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ctfix_conntrack_")
    }


def test_watch_exports_the_counters_conntrack_reports(lab: Topology) -> None:
    start_broken_server(lab, PORT)
    add_colliding_snat(lab, PORT)
    collide(lab, PORT, 2)
    load_entries(lab, 40)
    port = free_port(lab.host)
    watch = lab.spawn(
        lab.host,
        [sys.executable, "-m", "ctfix", "watch", "--metrics", f"127.0.0.1:{port}"],
    )
    try:
        deadline = time.monotonic() + 60  # watch starts slowly on a loaded machine
        while True:
            stats, count = conntrack_stats(lab), conntrack_count(lab)
            values = _conntrack_values(lab, port)
            expected = {f"ctfix_conntrack_{name}_total": summed(stats, name) for name in stats[0]}
            expected["ctfix_conntrack_entries"] = count
            got = {name: values.get(name) for name in expected}
            if got == expected:
                break
            assert time.monotonic() < deadline, f"metrics {got} != conntrack {expected}"
            time.sleep(0.3)
        assert values["ctfix_conntrack_max"] > 0
        assert values["ctfix_conntrack_insert_failed_total"] >= 2
    finally:
        lab.stop(watch)
