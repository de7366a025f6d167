"""`ctfix lab` as a user runs it: the story, its exit status, and a clean machine after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

from ctfix.lab.topology import leftover_namespaces

LAB = [sys.executable, "-m", "ctfix", "lab"]


def _marked() -> tuple[str, dict[str, str]]:
    """A mark for one run of the lab, and the environment that carries it: every
    process the lab starts inherits it, so the test can find what this run left
    behind without mistaking another run's servers (another checkout's tests, on the
    same machine, in namespaces of their own) for its own."""
    mark = f"CTFIX_TEST_RUN={uuid.uuid4().hex}"
    name, _, value = mark.partition("=")
    return mark, dict(os.environ, **{name: value})


def _run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAB, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def _namespaces_named_in(output: str) -> set[str]:
    names = set(re.findall(r"\b(ctfix-[0-9a-f]{8}-(?:host|ctr|up))\b", output))
    assert len(names) == 3, output
    return names


def _left_by(mark: str) -> list[int]:
    """Pids of processes still running that one lab run started (they carry its mark:
    the servers, and anything they started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
        except OSError:
            continue
        if mark.encode() in environ:
            pids.append(int(entry))
    return pids


def test_lab_reproduces_bug_and_fix_v4_and_v6() -> None:
    mark, env = _marked()
    proc = _run("--ipv6", "--port", "40123", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Result: bug reproduced, fix confirmed." in out
    # The broken server: the uplink address gets nothing, for both families.
    assert re.search(r"✗", out) is None
    assert "-> 198.51.100.13:40123" in out and "-> [2001:db8:2::13]:40123" in out
    # The evidence names the wrong source: the bridge address.
    assert "a new flow from 192.0.2.1:40123, not 198.51.100.13:40123" in out
    assert "a new flow from [2001:db8:1::1]:40123, not [2001:db8:2::13]:40123" in out
    assert "ICMP port unreachable from 192.0.2.3" in out
    # The reference server answers from the address each client used.
    assert "seen:     reply from 198.51.100.13:40123" in out
    assert "seen:     reply from [2001:db8:2::13]:40123" in out
    assert not _namespaces_named_in(out) & set(leftover_namespaces())
    assert not _left_by(mark)


def test_lab_keep_leaves_namespaces_and_says_how_to_remove_them() -> None:
    mark, env = _marked()
    proc = _run("--keep", "--port", "40124", env=env)
    left = _namespaces_named_in(proc.stdout)
    try:
        assert left <= set(leftover_namespaces())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert len(left) == 3
        for ns in left:
            assert f"ip netns del {ns}" in proc.stdout
            assert f"ip netns exec {ns}" in proc.stdout or ns.endswith("-up")
        assert not _left_by(mark)
    finally:
        for ns in left:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_lab_sigterm_mid_run_tears_everything_down() -> None:
    mark, env = _marked()
    proc = subprocess.Popen([*LAB, "--port", "40125"], stdout=subprocess.PIPE, text=True, env=env)
    seen = ""
    try:
        assert proc.stdout is not None
        # Wait until the broken server runs, then interrupt.
        for line in proc.stdout:
            seen += line
            if "pid" in line:
                break
        # The server runs and carries the run's mark (so the check below can fail).
        [server] = re.findall(r"pid (\d+)", seen)
        assert int(server) in _left_by(mark), seen
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status != 0
    assert not _namespaces_named_in(seen) & set(leftover_namespaces())
    assert not _left_by(mark)
