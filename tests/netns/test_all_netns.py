"""Every namespace of the host: discovery, `scan --all-netns` over 50 namespaces, and
`check` as node-problem-detector runs it.

What a user notices: every namespace is found and named (its `ip netns` name, or
`pid:PID` for one only a process holds), one that disappears is reported gone, not
an error; the broken services are found in the namespaces they live in, by name,
and nowhere else; check exits 0, 1 or 2 with one short line that names the worst.

Other tests (and other test runs) may have namespaces of their own while these run:
assertions look only at this run's namespaces.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ctfix.lab.fleet import BROKEN_PORT, OK_PORT, SERVER_V4, SERVICE_V4, Fleet, fleet_topology
from ctfix.lab.topology import Namespaces, built, new_run_id
from ctfix.platform import namespaces
from ctfix.platform.procfs import read_text

CTFIX = [sys.executable, "-m", "ctfix"]
#: what node-problem-detector keeps of the plugin's output (max_output_length)
NPD_MAX_OUTPUT = 80


@dataclasses.dataclass
class Pair(Namespaces):
    """Two empty namespaces, for discovery tests."""

    @property
    def namespaces(self) -> tuple[str, str]:
        return (self.name("a"), self.name("b"))

    def build(self) -> None:
        self.create_namespaces()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with fleet_topology(count=50, broken=3) as built_fleet:
        yield built_fleet


def ctfix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTFIX, *args], capture_output=True, text=True, timeout=300)


def by_label(refs: dict[int, namespaces.NamespaceRef]) -> dict[str, namespaces.NamespaceRef]:
    return {ref.label: ref for ref in refs.values()}


# -- discovery -------------------------------------------------------------------------


def wait_for_exec(pid: int, comm: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while read_text(f"/proc/{pid}/comm") != f"{comm}\n":
        assert time.monotonic() < deadline, f"pid {pid} never became {comm}"
        time.sleep(0.01)


def test_ip_netns_and_process_only_namespaces_are_found_named_and_followed() -> None:
    with built(Pair(new_run_id())) as pair:
        a, b = pair.namespaces
        # A namespace that only a process holds (no bind mount): `unshare -n`.
        lone = subprocess.Popen(["unshare", "-n", "sleep", "600"])
        try:
            wait_for_exec(lone.pid, "sleep")  # unshare has made the namespace by then
            before = namespaces.snapshot()
            labels = by_label(before)
            assert {a, b} <= set(labels)
            assert labels[a].kind == "ip-netns" and labels[a].spec == a
            [mine] = [r for r in before.values() if r.pid == lone.pid]
            assert (mine.kind, mine.label) == ("process", f"pid:{lone.pid}")
            assert sum(r.kind == "host" for r in before.values()) == 1
            # Each namespace once: ids and inodes are unique.
            assert len({(r.dev, r.inode) for r in before.values()}) == len(before)

            subprocess.run(["ip", "netns", "del", b], check=True)
            lone.kill()
            lone.wait()
            # b again: a new namespace under the old name
            subprocess.run(["ip", "netns", "add", b], check=True)
            after = namespaces.snapshot()
            changes = namespaces.diff(before, after)
            removed = {r.label for r in changes.removed}
            added = {r.label for r in changes.added}
            assert {b, f"pid:{lone.pid}"} <= removed
            assert b in added  # same name, another namespace: a new id
            assert a not in removed | added
        finally:
            if lone.poll() is None:
                lone.kill()
                lone.wait()


def test_a_namespace_gone_before_it_is_entered_is_skipped_not_an_error() -> None:
    from ctfix.commands.scan import status_of
    from ctfix.commands.scanning import scan_namespace
    from ctfix.platform import rules_files

    with built(Pair(new_run_id())) as pair:
        a, b = pair.namespaces
        found = by_label(namespaces.snapshot())
        subprocess.run(["ip", "netns", "del", b], check=True)
        with pytest.raises(namespaces.NamespaceGone), namespaces.entered(found[b]):
            pass
        kb = rules_files.load([], builtin=True)
        gone = scan_namespace(found[b], kb, health=True)
        kept = scan_namespace(found[a], kb, health=True)
        assert gone.gone and gone.skipped and not gone.unreadable
        assert not kept.gone and kept.skipped is None and kept.health is not None
        assert status_of([gone, kept]) == 0


# -- scan --all-netns over 50 namespaces ------------------------------------------------


def test_scan_all_netns_finds_the_broken_services_by_namespace_name(fleet: Fleet) -> None:
    done = ctfix("scan", "--all-netns", "--json")
    assert done.returncode == 1, done.stderr
    document = json.loads(done.stdout)
    assert document["schema"] == 2 and document["all_netns"] is True
    listed = {ns["netns"]: ns for ns in document["namespaces"]}
    ours = set(fleet.namespaces)
    assert len(ours) == 50 and ours <= set(listed)
    assert all(listed[name]["kind"] == "ip-netns" for name in ours)
    assert sum(ns["kind"] == "host" for ns in document["namespaces"]) == 1

    services = [s for s in document["services"] if s["netns"] in ours]
    broken = {s["netns"] for s in services if s["verdict"] == "broken"}
    assert broken == set(fleet.broken_servers)
    for service in services:
        if service["verdict"] == "broken":
            assert service["port"] == BROKEN_PORT
            assert "wrong-source-seen" in [r["code"] for r in service["reasons"]]
            [wrong] = service["evidence"]["wrong_source"]
            assert (wrong["service"], wrong["actual_source"]) == (
                f"{SERVICE_V4}:{BROKEN_PORT}",
                f"{SERVER_V4}:{BROKEN_PORT}",
            )
            assert service["netns_container"] is None
    ok = [s for s in services if s["netns"] == fleet.ok_server]
    assert [(s["port"], s["verdict"]) for s in ok] == [(OK_PORT, "ok")]
    # Worst first overall: no broken service after a better one.
    # Other namespaces of the machine (other runs') may hold any verdict: unknown (a
    # family not tracked) too, and an outage ranks with at-risk (core.scan.severity).
    rank = {"broken": 0, "at-risk": 1, "unknown": 2, "ok": 3}
    ranks = [
        min(rank[s["verdict"]], 1) if s["service_down"] else rank[s["verdict"]]
        for s in document["services"]
    ]
    assert ranks == sorted(ranks)
    for name in broken:
        assert listed[name]["counts"]["broken"] == 1


def test_scan_all_netns_text_groups_by_namespace_and_markdown_is_stamped(fleet: Fleet) -> None:
    text = ctfix("scan", "--all-netns")
    assert text.returncode == 1, text.stderr
    headings = [line for line in text.stdout.splitlines() if line.startswith("namespace ")]
    named = [name for name in fleet.broken_servers if any(name in h for h in headings)]
    assert named == list(fleet.broken_servers)
    markdown = ctfix("scan", "--all-netns", "--format", "markdown")
    first = markdown.stdout.splitlines()[0]
    assert "UTC" in first and "ctfix" in first


# -- check --------------------------------------------------------------------------------


def test_check_all_netns_names_a_broken_namespace_and_exits_1(fleet: Fleet) -> None:
    done = ctfix("check", "--all-netns")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0].encode()) < NPD_MAX_OUTPUT
    detail = json.loads(ctfix("check", "--all-netns", "--json").stdout)
    assert detail["status"] == "problem"
    wrong = {(p["netns"], p["port"]) for p in detail["problems"] if p["kind"] == "wrong-source"}
    assert {(name, BROKEN_PORT) for name in fleet.broken_servers} <= wrong
    # The line names the worst problem of its own run (another run's namespaces may
    # come and go between the two: the text line is not compared with this document).
    worst, line = detail["problems"][0], detail["message"]
    assert len(line.encode()) < NPD_MAX_OUTPUT
    if worst["kind"] == "wrong-source" and worst["netns"] in fleet.broken_servers:
        assert line.startswith(f"UDP {BROKEN_PORT} in "), line
        # The name, shortened in its middle ("ctfix-...b0-srv") when the line is full.
        named = line.removeprefix(f"UDP {BROKEN_PORT} in ").split(":", 1)[0]
        head, dots, tail = named.partition("...")
        assert named == worst["netns"] or (
            dots and worst["netns"].startswith(head) and worst["netns"].endswith(tail)
        ), line


@pytest.mark.parametrize(
    ("where", "status", "start"),
    [("ok", 0, "OK:"), ("broken", 1, f"UDP {BROKEN_PORT} in "), ("missing", 2, "unknown:")],
)
def test_check_follows_the_plugin_contract(
    fleet: Fleet, where: str, status: int, start: str
) -> None:
    netns = {
        "ok": fleet.ok_server,
        "broken": fleet.broken_servers[0],
        "missing": fleet.name("never-made"),
    }[where]
    done = ctfix("check", "--netns", netns)
    assert done.returncode == status, done.stdout + done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith(start) and len(line.encode()) < NPD_MAX_OUTPUT
    if where == "broken":
        assert f"{SERVICE_V4} -> {SERVER_V4}" in line
