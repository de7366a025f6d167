"""Make many new UDP flows fast, for the watch and dump benchmarks.

One raw socket (IP_HDRINCL) in the sending namespace writes complete IPv4/UDP
datagrams with a new (source port, destination port) each time: every datagram is
a new conntrack entry at the receiving namespace. Only documentation addresses, only
inside namespaces the benchmark built.

Know before changing: the kernel fills in the IP checksum and id when they are 0;
the UDP checksum 0 means "none" in IPv4, so no checksum is computed here.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator, Sequence

from ctfix.platform import netns


def flow_ports(count: int, dports: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """(sport, dport) pairs, all distinct: source ports 1024-65535 per destination port."""
    per_port = 65535 - 1024
    if count > per_port * len(dports):
        raise ValueError(f"{count} flows need more than {len(dports)} destination ports")
    for i in range(count):
        yield 1024 + i % per_port, dports[i // per_port]


def _packet(src: str, dst: str) -> bytearray:
    """An IPv4/UDP datagram src -> dst; its ports are at offset 20 (`_PORTS`)."""
    payload = b"ctfix-bench"
    return bytearray(
        struct.pack(
            ">BBHHHBBH4s4sHHHH",
            0x45,
            0,
            28 + len(payload),
            0,
            0,
            64,
            socket.IPPROTO_UDP,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
            0,
            0,
            8 + len(payload),
            0,
        )
        + payload
    )


_PORTS = struct.Struct(">HH")


def _raw_socket(ns: str) -> socket.socket:
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    return sock


def blast(ns: str, src: str, dst: str, count: int, dports: tuple[int, ...]) -> float:
    """Send `count` single-datagram flows src -> dst from ns; return the seconds taken."""
    sock = _raw_socket(ns)
    try:
        packet = _packet(src, dst)
        pack_into = _PORTS.pack_into
        sendto = sock.sendto
        target = (dst, 0)
        started = time.perf_counter()
        for sport, dport in flow_ports(count, dports):
            pack_into(packet, 20, sport, dport)
            while True:
                try:
                    sendto(packet, target)
                    break
                except (BlockingIOError, OSError):
                    time.sleep(0.0005)  # ENOBUFS from the qdisc: back off, never skip
        return time.perf_counter() - started
    finally:
        sock.close()


def blast_many(
    namespaces: Sequence[str], src: str, dst: str, count: int, dports: tuple[int, ...]
) -> float:
    """`count` single-datagram flows src -> dst in each namespace, round robin (one
    flow in each, then the next in each, ...); the seconds taken."""
    socks = [_raw_socket(ns) for ns in namespaces]
    try:
        packet = _packet(src, dst)
        pack_into = _PORTS.pack_into
        sends = [sock.sendto for sock in socks]
        target = (dst, 0)
        started = time.perf_counter()
        for sport, dport in flow_ports(count, dports):
            pack_into(packet, 20, sport, dport)
            for sendto in sends:
                while True:
                    try:
                        sendto(packet, target)
                        break
                    except (BlockingIOError, OSError):
                        time.sleep(0.0005)
        return time.perf_counter() - started
    finally:
        for sock in socks:
            sock.close()
