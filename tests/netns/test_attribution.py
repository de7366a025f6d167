"""Issue 8, item 5: explain names the program by what it is, and every process on the socket.

- A pre-forking server shares one socket among its processes, and any of them may
  answer: explain lists them all (JSON `processes`, text "shared with").
- A program is recognised by its process (comm, executable, command line), not by the
  port: atftpd on port 69 is atftpd, never tftpd-hpa with that entry's advice.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctfix.lab.topology import Topology, lab_topology, wait_udp_bound
from tests.netns.kb_lab import KB_ROOT
from tests.netns.test_explain import explain_port

PREFORK_PORT = 47301

PREFORK = textwrap.dedent(
    """
    import os, socket, sys, time
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", int(sys.argv[1])))
    for _ in range(2):
        if os.fork() == 0:  # a worker: shares the parent's socket
            while True:
                data, peer = sock.recvfrom(2048)
                sock.sendto(data, peer)
    while True:
        time.sleep(60)
    """
)


@pytest.fixture
def lab4() -> Iterator[Topology]:
    with lab_topology(ipv6=False) as topo:
        yield topo


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            found |= {int(child) for child in fh.read().split()}
    return found


def test_every_process_of_a_pre_forking_server_is_listed(lab4: Topology, tmp_path: Path) -> None:
    script = tmp_path / "prefork.py"
    script.write_text(PREFORK)
    server = lab4.spawn(lab4.host, [sys.executable, str(script), str(PREFORK_PORT)])
    wait_udp_bound(server.pid, PREFORK_PORT)
    deadline = time.monotonic() + 10
    while len(_children(server.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = _children(server.pid)
    assert len(workers) == 2
    _status, doc = explain_port(lab4, PREFORK_PORT)
    (listener,) = doc["listeners"]
    listed = {entry["pid"] for entry in listener["processes"]}
    assert listed == {server.pid, *workers}
    assert listener["pid"] == server.pid  # the lowest pid, the parent, is the owner
    assert listener["exe"] and os.path.basename(listener["exe"]).startswith("python")


def test_atftpd_is_recognised_as_atftpd_not_as_tftpd_hpa(lab4: Topology, tmp_path: Path) -> None:
    atftpd = KB_ROOT / "atftpd/usr/sbin/atftpd"
    if not atftpd.exists():
        pytest.skip("atftpd is not unpacked: run scripts/setup")
    server = lab4.spawn(
        lab4.host,
        [str(atftpd), "--daemon", "--no-fork", "--logfile", "-", "--user", "root.root",
         "--port", "69", str(tmp_path)],
    )
    wait_udp_bound(server.pid, 69)
    _status, doc = explain_port(lab4, 69)
    assert doc["service"] is not None and "atftpd" in doc["service"]
    assert not any("tftpd-hpa" in fix["summary"] for fix in doc["fixes"])
    assert doc["verdict"] == "ok"  # atftpd answers from the address asked (measured)
