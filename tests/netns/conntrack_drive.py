"""Move conntrack's statistics in a lab's host namespace, and read them the way the
reference tool does (`conntrack -S`, `conntrack -C`). Used by the health tests and by
tests/unit/fixtures/record_health.py.

Know before changing: every way here is deterministic. insert_failed and drop come
from a plain SNAT of a wild-card server's wrong-source reply (FACTS.md "Why plain
SNAT cannot fix it": the rewritten reply collides with the request's entry, one
insert_failed and one drop per reply); error from an ICMP port unreachable about a
flow conntrack never saw; insert from `conntrack -R`.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

from bench.explain_bench import entries_file
from ctfix.lab.topology import (
    BRIDGE_V4,
    CONTAINER_NET_V4,
    CONTAINER_V4,
    UPLINK_V4,
    Topology,
    wait_udp_bound,
)
from ctfix.platform import netns

CpuCounters = dict[int, dict[str, int]]

#: conntrack -S's names that differ from the uapi attribute names ctfix uses.
_TOOL_NAMES = {"chaintoolong": "chain_toolong"}


def conntrack_stats(topo: Topology) -> CpuCounters:
    """`conntrack -S` in the host namespace: cpu -> counter -> value (ctfix's names)."""
    out = topo.run(topo.host, "conntrack", "-S")
    stats: CpuCounters = {}
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "cpu" in fields:
            cpu = int(fields.pop("cpu"))
            stats[cpu] = {_TOOL_NAMES.get(k, k): int(v) for k, v in fields.items()}
    return stats


def conntrack_count(topo: Topology) -> int:
    """`conntrack -C` in the host namespace."""
    return int(topo.run(topo.host, "conntrack", "-C").strip())


def summed(stats: CpuCounters, name: str) -> int:
    return sum(cpu.get(name, 0) for cpu in stats.values())


def start_broken_server(topo: Topology, port: int) -> subprocess.Popen[bytes]:
    """A wild-card recvfrom/sendto server in the host namespace (answers from br0)."""
    server = topo.spawn(
        topo.host, [sys.executable, "-m", "ctfix", "serve", "--broken", "--port", str(port)]
    )
    wait_udp_bound(server.pid, port)
    return server


def add_colliding_snat(topo: Topology, port: int) -> None:
    """The plain SNAT "fix" whose rewritten replies collide with the requests' entries."""
    topo.run(
        topo.host,
        "nft",
        f"add rule ip ctfix_lab postrouting ip saddr {BRIDGE_V4} ip daddr {CONTAINER_NET_V4} "
        f"udp sport {port} snat to {UPLINK_V4}:{port}",
    )


def send_requests(topo: Topology, port: int, count: int) -> None:
    """`count` requests to the uplink address, each from a new client socket; no wait."""
    with netns.entered(topo.container):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.connect((UPLINK_V4, port))
            sock.send(b"ctfix-health")
    finally:
        for sock in socks:
            sock.close()


def wait_counter(topo: Topology, name: str, at_least: int, timeout: float = 10.0) -> CpuCounters:
    """Poll `conntrack -S` until `name` summed over CPUs reaches at_least."""
    deadline = time.monotonic() + timeout
    while True:
        stats = conntrack_stats(topo)
        if summed(stats, name) >= at_least:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stayed at {summed(stats, name)} (< {at_least})")
        time.sleep(0.05)


def collide(topo: Topology, port: int, count: int) -> CpuCounters:
    """`count` replies dropped by the colliding SNAT; waits until conntrack counted them."""
    before = summed(conntrack_stats(topo), "insert_failed")
    send_requests(topo, port, count)
    return wait_counter(topo, "insert_failed", before + count)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def send_unrelated_icmp_error(topo: Topology) -> None:
    """An ICMP port unreachable from the host about a datagram conntrack never saw:
    conntrack cannot relate it to an entry and counts it in `error`."""
    inner_udp = struct.pack("!HHHH", 40001, 40002, 8, 0)
    inner_ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        28,
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(CONTAINER_V4),
        socket.inet_aton(BRIDGE_V4),
    )
    inner_ip = inner_ip[:10] + struct.pack("!H", _checksum(inner_ip)) + inner_ip[12:]
    body = struct.pack("!BBHI", 3, 3, 0, 0) + inner_ip + inner_udp
    icmp = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
    with netns.entered(topo.host):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        sock.sendto(icmp, (CONTAINER_V4, 0))
    finally:
        sock.close()


def load_entries(topo: Topology, count: int, first: int = 0) -> None:
    """`conntrack -R` of `count` unreplied UDP entries that live 600 s (insert += count,
    as far as the table has room); loads with different `first` do not overlap.
    conntrack -R stops at the first entry it cannot add."""
    path = entries_file(count, 0, first=first)
    try:
        subprocess.run(
            topo.exec_argv(topo.host, ["conntrack", "-R", path]), capture_output=True, check=False
        )
    finally:
        os.unlink(path)
