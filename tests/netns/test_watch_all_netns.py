"""`ctfix watch --all-netns` over 50 namespaces (ctfix.lab.fleet), in one process.

What a user notices: wrong-source replies in two separate namespaces are reported in
one run, each record naming its namespace; a namespace created after watch started
is followed (a note names it) and its finding reported; one that disappears is
closed with a note and its findings stay in the final report, with a summary per
namespace and one overall; the namespace cap is said and counted; the metrics have
one `netns` label value per namespace watched.

Other tests (and other test runs) may have namespaces of their own while these run:
watch follows them too; assertions look only at this run's namespaces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import pytest

from ctfix.lab.fleet import BROKEN_PORT, SERVER_V4, SERVICE_V4, Fleet, fleet_topology
from ctfix.lab.topology import Namespaces, built, new_run_id
from tests.netns.logs import JsonLines, wait_for_text
from tests.netns.metrics_http import free_port, scrape

WATCH = [sys.executable, "-m", "ctfix", "watch"]
#: above any machine's count of namespaces (other runs' fleets too): every one of this
#: run's is watched, whatever else the machine holds (the default cap is tested apart)
NO_CAP = ("--max-netns", "4096")
#: starting to watch ~60 namespaces takes two conntrack dumps each, and a dump walks
#: the whole host's table (other tests' entries too): seconds on a busy machine
START_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with fleet_topology(count=50, broken=3) as built_fleet:
        yield built_fleet


class AllWatch:
    """A running `ctfix watch --all-netns --json`: its records as they come (a thread
    reads stdout), its stderr in a file."""

    def __init__(self, proc: subprocess.Popen[str], errors: IO[str]) -> None:
        self.proc = proc
        self.errors = errors
        assert proc.stdout is not None
        self.lines = JsonLines(proc.stdout)
        self.records = self.lines.records

    def stderr(self) -> str:
        with open(self.errors.name) as fh:
            return fh.read()

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, f"never {what}: {self.stderr()}"
            time.sleep(0.05)

    def wait_note(self, text: str, timeout: float = 60.0) -> None:
        self.wait_for(repr(text), lambda: text in self.stderr(), timeout)

    def stop(self) -> list[dict[str, Any]]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        return self.lines.join(timeout=30)


@contextlib.contextmanager
def watching_all(*extra: str, env: dict[str, str] | None = None) -> Iterator[AllWatch]:
    """`watch --all-netns --json EXTRA...` (or, with `--netns`, one namespace), ready."""
    with tempfile.NamedTemporaryFile("w+", prefix="ctfix-watch-all-") as errors:
        every = [] if "--netns" in extra else ["--all-netns", *NO_CAP]
        argv = [*WATCH, *every, "--json", *extra]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        try:
            watch = AllWatch(proc, errors)
            watch.wait_note("ctfix watch: watching ", timeout=START_TIMEOUT)
            yield watch
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def live_wrong_source(records: list[dict[str, Any]], ns: str) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r["kind"] == "wrong-source-reply" and r["netns"] == ns and not r["existing"]
    ]


def test_findings_of_separate_namespaces_are_named_and_a_new_namespace_is_followed(
    fleet: Fleet,
) -> None:
    first, second = fleet.broken_servers[:2]
    with watching_all() as watch:
        fleet.ask_broken()  # each broken server's client asks again: live findings
        watch.wait_for(
            "the two namespaces' findings",
            lambda: all(live_wrong_source(watch.records, ns) for ns in (first, second)),
        )
        # A namespace made after watch started: followed, and its finding reported.
        with fleet_topology(count=2, broken=1) as late:
            [late_server] = late.broken_servers
            watch.wait_note(f"following new namespace {late_server}")
            late.ask_broken()
            watch.wait_for(
                "the new namespace's finding",
                lambda: bool(live_wrong_source(watch.records, late_server)),
            )
        # Torn down: closed with a note, its findings kept for the report.
        watch.wait_note(f"namespace {late_server} is gone")
        records = watch.stop()
    assert watch.proc.returncode == 0, watch.stderr()
    for ns in (first, second, late_server):
        [*_, last] = live_wrong_source(records, ns)  # the final record, from the report
        assert (last["service"], last["actual_source"]) == (
            f"{SERVICE_V4}:{BROKEN_PORT}",
            f"{SERVER_V4}:{BROKEN_PORT}",
        )
        assert last["netns_container"] is None and last["container"] is None
    # Nothing found where nothing is broken.
    quiet = set(fleet.namespaces) - set(fleet.broken_servers)
    assert not [r for r in records if r.get("netns") in quiet and r["kind"] != "namespace-summary"]
    summaries = {r["netns"]: r for r in records if r["kind"] == "namespace-summary"}
    assert set(fleet.namespaces) <= set(summaries)
    assert summaries[late_server]["gone"] is True and summaries[late_server]["findings"] >= 1
    assert summaries[first]["gone"] is False and summaries[first]["findings"] == 1
    assert summaries[first]["tracking"]["ipv4"] is True
    overall = records[-1]
    assert overall["kind"] == "summary" and overall["all_netns"] is True
    assert overall["netns"] is None and overall["namespaces"]["gone"] >= 1
    assert overall["namespaces"]["watched"] >= len(fleet.namespaces) + 1  # and the host
    assert overall["findings"] >= 3


def test_the_namespace_cap_is_said_and_counted(fleet: Fleet) -> None:
    done = subprocess.run(
        [*WATCH, "--all-netns", "--json", "--max-netns", "3", "--duration", "0.5"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    # The three watched may be anyone's (the host's, then other tests' containers or
    # namespaces before ours): a live finding there makes a timed watch exit 1.
    live = [r for r in records if "summary" not in r["kind"] and not r.get("existing")]
    assert done.returncode in ((0, 1) if live else (0,)), done.stderr
    assert "the most --max-netns allows" in done.stderr
    *_, overall = records
    summaries = [r for r in records if r["kind"] == "namespace-summary"]
    # Never more than 3 at once: the 3 still watched at the end, and any that went
    # meanwhile (another run's namespace deleted), whose place a waiting one took.
    assert sum(not r["gone"] for r in summaries) == 3
    assert overall["namespaces"]["watched"] == len(summaries)
    assert overall["namespaces"]["gone"] == len(summaries) - 3
    assert overall["namespaces"]["unwatched"] >= len(fleet.namespaces) - 2
    # The host first (then containers, ip netns...): it is taken up before any other.
    assert summaries[0]["netns"] == "host" and summaries[0]["gone"] is False


def test_metrics_carry_one_netns_label_per_namespace_watched(fleet: Fleet) -> None:
    """Run in one of the fleet's namespaces (its loopback serves the metrics): each
    namespace watched has its series; a namespace that goes takes them with it."""
    home = fleet.ok_server
    port = free_port(home)
    with tempfile.NamedTemporaryFile("w+") as log:
        proc = fleet.spawn(
            home,
            [*WATCH, "--all-netns", *NO_CAP, "--metrics", f"127.0.0.1:{port}"],
            stderr=log.fileno(),
        )
        try:
            wait_for_text(log, "ctfix watch: watching ", timeout=START_TIMEOUT)

            def series(ns: str) -> str:
                return f'ctfix_watch_events_total{{netns="{ns}"}}'

            def wait_scraped(what: str, check: Callable[[str], bool]) -> None:
                deadline = time.monotonic() + 60
                while not check(scrape(home, port)):
                    assert time.monotonic() < deadline, f"never {what}"
                    time.sleep(0.5)

            text = scrape(home, port)
            assert all(series(ns) in text for ns in fleet.namespaces)
            assert "ctfix_build_info{" in text
            with built(Lone(new_run_id())) as lone:
                [name] = lone.namespaces
                wait_scraped("followed", lambda text: series(name) in text)
            wait_scraped("forgotten", lambda text: series(name) not in text)
        finally:
            fleet.stop(proc)


@dataclasses.dataclass
class Lone(Namespaces):
    """One empty namespace."""

    @property
    def namespaces(self) -> tuple[str]:
        return (self.name("lone"),)

    def build(self) -> None:
        self.create_namespaces()
