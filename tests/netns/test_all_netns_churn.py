"""--all-netns beside namespaces made and deleted in a loop (`ip netns add/del`, unique
names, as a CNI plugin or another test run does): one that vanishes between being
listed and being entered is skipped as gone, never an error.

What a user notices: scan and check exit 0 or 1 (never 2 for a namespace that simply
went), none of the churned namespaces is "unchecked" (unknown) or "skipped" for any
reason but being gone; watch follows them and lets them go without a warning.
Assertions look only at the churned namespaces: the machine may hold others.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from ctfix.lab.topology import PREFIX, new_run_id

CTFIX = [sys.executable, "-m", "ctfix"]


class Churn:
    """A thread that adds a namespace and deletes the one before, until stopped."""

    def __init__(self) -> None:
        self.prefix = f"{PREFIX}-{new_run_id()}-churn"
        self.names: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", "netns", *args], check=False, capture_output=True, timeout=60)

    def _run(self) -> None:
        index = 0
        while not self.stop.is_set():
            index += 1
            name = f"{self.prefix}{index}"
            self.names.append(name)  # recorded before it exists: teardown finds it
            self._ip("add", name)
            if index > 1:
                self._ip("del", self.names[-2])

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.names) < count:
            assert self.thread.is_alive() and time.monotonic() < deadline, "no churn"
            time.sleep(0.05)

    def teardown(self) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        for name in self.names:
            if os.path.exists(f"/run/netns/{name}"):
                self._ip("del", name)


@contextlib.contextmanager
def churning() -> Iterator[Churn]:
    churn = Churn()
    try:
        churn.thread.start()
        churn.wait_for(3)
        yield churn
    finally:
        churn.teardown()


def ctfix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTFIX, *args], capture_output=True, text=True, timeout=300)


def test_namespaces_that_come_and_go_are_skipped_never_an_error() -> None:
    with churning() as churn:
        scan = ctfix("scan", "--all-netns", "--json")
        check = ctfix("check", "--all-netns", "--json")
        watch = ctfix("watch", "--all-netns", "--json", "--max-netns", "4096", "--duration", "3")
        made = len(churn.names)
    churned = set(churn.names)
    assert made > 3  # namespaces came and went while each command ran

    assert scan.returncode in (0, 1), scan.stderr
    listed = [ns for ns in json.loads(scan.stdout)["namespaces"] if ns["netns"] in churned]
    assert [ns for ns in listed if ns["skipped"] is not None and not ns["gone"]] == []

    detail = json.loads(check.stdout)
    assert [u for u in detail["unchecked"] if u["netns"] in churned] == []
    assert check.returncode in (0, 1) or detail["unchecked"], check.stdout + check.stderr

    assert watch.returncode in (0, 1), watch.stderr
    assert f"cannot watch namespace {churn.prefix}" not in watch.stderr
    *_, overall = (json.loads(line) for line in watch.stdout.splitlines())
    assert overall["kind"] == "summary" and overall["all_netns"] is True
