"""`ctfix serve` and `ctfix.pktinfo` in the lab topology: every reply from the right address.

Each test builds its own namespaces (`lab_topology(ipv6=True)`), starts the server in
the host namespace and talks to it from the container namespace. A `connect()`ed
client (`udp_exchange`) is what resolvers use: it only accepts a reply from the
address it sent to, so "answered" already means "from the right source". Requests to
broadcast and multicast groups need an unconnected client, and the tests then check
the reply's source themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ctfix import pktinfo
from ctfix.core.addr import endpoint
from ctfix.lab.topology import (
    BRIDGE_V4,
    BRIDGE_V6,
    CONTAINER_V4,
    CONTAINER_V6,
    UPLINK_V4,
    UPLINK_V6,
    Topology,
    lab_topology,
    udp_exchange,
    wait_udp_bound,
)
from ctfix.platform import netns

PORT = 47001
#: seconds a reply that must come may take on a loaded machine. Only a failing test
#: waits this long: a reply from the wrong source never reaches a connect()ed client.
ANSWER = 10.0
EVERY_ADDRESS = [UPLINK_V4, BRIDGE_V4, UPLINK_V6, BRIDGE_V6]


@pytest.fixture
def topo() -> Iterator[Topology]:
    with lab_topology(ipv6=True) as built:
        yield built


def start_server(topo: Topology, *options: str, stderr: bool = False) -> subprocess.Popen[bytes]:
    """`ctfix serve` in the host namespace, once it says it listens (every socket is
    bound then, with pktinfo on: a port bound is not yet a server that answers)."""
    proc = topo.spawn(
        topo.host,
        [sys.executable, "-m", "ctfix", "serve", "--port", str(PORT), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    read_until(proc, "ctfix serve: listening on", stream=proc.stdout)
    return proc


def stop_server(topo: Topology, proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """SIGTERM the server; return its exit status and everything it wrote on stderr."""
    proc.terminate()
    _, err = proc.communicate(timeout=5)
    topo.stop(proc)
    return proc.returncode, err.decode() if err else ""


def read_until(
    proc: subprocess.Popen[bytes], needle: str, timeout: float = ANSWER, stream: Any = None
) -> str:
    """Read the server's stderr (or `stream`) until needle shows up (no sleeping on
    guesses; only a failing test waits `timeout`)."""
    stream = proc.stderr if stream is None else stream
    assert stream is not None
    fd = stream.fileno()
    seen = b""
    while needle.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"server never wrote {needle!r}; stderr so far: {seen.decode()!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"server exited before writing {needle!r}: {seen.decode()!r}"
        seen += chunk
    return seen.decode()


def client_socket(topo: Topology, family: int = socket.AF_INET) -> socket.socket:
    with netns.entered(topo.container):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    return sock


def ifindex(topo: Topology, ns: str, name: str) -> int:
    with netns.entered(ns):
        return socket.if_nametoindex(name)


def link_local(topo: Topology, ns: str, dev: str) -> str:
    shown = json.loads(topo.run(ns, "ip", "-j", "-6", "addr", "show", "dev", dev, "scope", "link"))
    # `ip -j` lists an empty {} for the interface's other families: skip it.
    return next(str(a["local"]) for a in shown[0]["addr_info"] if "local" in a)


def nc_echo(topo: Topology, addresses: list[str]) -> dict[str, str]:
    """netcat-openbsd in the container, one per address, in parallel (each waits 1 s)."""
    procs = {
        address: subprocess.Popen(
            topo.exec_argv(topo.container, ["nc", "-u", "-w1", address, str(PORT)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for address in addresses
    }
    try:
        # Feed every nc before reading any: nc -w1 gives up after 1 s of idle stdin.
        for address, proc in procs.items():
            assert proc.stdin is not None
            proc.stdin.write(f"hello via {address}\n".encode())
            proc.stdin.close()
        answers = {}
        for address, proc in procs.items():
            assert proc.stdout is not None
            answers[address] = proc.stdout.read().decode()
            proc.wait(5)
        return answers
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- the README's promise: every local address, v4 and v6 -------------------------


@pytest.mark.parametrize("mode", [[], ["--dual-stack"]], ids=["two-sockets", "dual-stack"])
def test_connected_client_gets_echo_via_every_local_address(
    topo: Topology, mode: list[str]
) -> None:
    start_server(topo, *mode)
    for address in EVERY_ADDRESS:
        exchange = udp_exchange(
            topo.container, address, PORT, b"echo " + address.encode(), timeout=ANSWER
        )
        assert exchange.reply == b"echo " + address.encode(), f"no echo via {address}"
        assert exchange.reply_from == (address, PORT)


def test_broken_server_fails_via_uplink_and_works_via_bridge(topo: Topology) -> None:
    start_server(topo, "--broken")
    for uplink, bridge in [(UPLINK_V4, BRIDGE_V4), (UPLINK_V6, BRIDGE_V6)]:
        assert not udp_exchange(topo.container, uplink, PORT).answered
        assert udp_exchange(topo.container, bridge, PORT, timeout=ANSWER).answered
        # The reply was sent, from the bridge address: exactly the bug.
        unconnected = udp_exchange(topo.container, uplink, PORT, connect=False, timeout=ANSWER)
        assert unconnected.reply_from == (bridge, PORT)


def test_netcat_gets_echo_via_every_local_address(topo: Topology) -> None:
    proc = start_server(topo)
    answers = nc_echo(topo, EVERY_ADDRESS)
    assert answers == {a: f"hello via {a}\n" for a in EVERY_ADDRESS}
    stop_server(topo, proc)

    start_server(topo, "--broken")
    answers = nc_echo(topo, [UPLINK_V4, BRIDGE_V4, UPLINK_V6, BRIDGE_V6])
    assert answers[UPLINK_V4] == answers[UPLINK_V6] == ""
    assert answers[BRIDGE_V4] == f"hello via {BRIDGE_V4}\n"
    assert answers[BRIDGE_V6] == f"hello via {BRIDGE_V6}\n"


def test_server_says_where_it_listens_and_exits_0_on_sigterm(topo: Topology) -> None:
    proc = topo.spawn(
        topo.host,
        [sys.executable, "-m", "ctfix", "serve", "--port", str(PORT)],
        stdout=subprocess.PIPE,
    )
    wait_udp_bound(proc.pid, PORT)
    proc.terminate()
    out, _ = proc.communicate(timeout=5)
    topo.stop(proc)
    assert out.decode() == f"ctfix serve: listening on 0.0.0.0:{PORT}, [::]:{PORT} (pktinfo)\n"
    assert proc.returncode == 0


def test_address_option_binds_only_those_addresses(topo: Topology) -> None:
    bridge_ll = link_local(topo, topo.host, topo.bridge)
    start_server(topo, "--address", UPLINK_V4, "--address", f"{bridge_ll}%{topo.bridge}")
    exchange = udp_exchange(topo.container, UPLINK_V4, PORT, timeout=ANSWER)
    assert exchange.reply_from == (UPLINK_V4, PORT)
    scope = ifindex(topo, topo.container, topo.container_if)
    exchange = udp_exchange(topo.container, bridge_ll, PORT, scope_id=scope, timeout=ANSWER)
    assert exchange.reply_from == (bridge_ll, PORT)
    assert not udp_exchange(topo.container, BRIDGE_V4, PORT, timeout=0.3).answered


def test_netns_option_serves_inside_that_namespace(topo: Topology) -> None:
    # Started in the test's own namespace: the server must enter the host's itself.
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctfix", "serve", "--port", str(PORT), "--netns", topo.host],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    topo.processes.append(proc)  # stopped by pid at teardown, whatever happens
    wait_udp_bound(proc.pid, PORT)
    exchange = udp_exchange(topo.container, UPLINK_V4, PORT, timeout=ANSWER)
    assert exchange.reply_from == (UPLINK_V4, PORT)
    status, _ = stop_server(topo, proc)
    assert status == 0


# -- addresses the wildcard does not name --------------------------------------------


def test_secondary_addresses_answer_from_themselves(topo: Topology) -> None:
    topo.ip(topo.host, "addr add 203.0.113.13/24 dev eth0\naddr add 198.51.100.14/24 dev eth0")
    start_server(topo)
    for address in ["203.0.113.13", "198.51.100.14"]:
        exchange = udp_exchange(topo.container, address, PORT, timeout=ANSWER)
        assert exchange.reply_from == (address, PORT), f"no echo via secondary {address}"


def test_dnat_request_is_answered_from_the_address_the_client_used(topo: Topology) -> None:
    topo.run(
        topo.host,
        "nft",
        "-f",
        "-",
        stdin=f"""table ip ctfix_test {{
 chain pre {{ type nat hook prerouting priority dstnat; policy accept;
  ip daddr 203.0.113.80 udp dport {PORT} dnat to {UPLINK_V4}
 }}
}}
table ip6 ctfix_test {{
 chain pre {{ type nat hook prerouting priority dstnat; policy accept;
  ip6 daddr 2001:db8:3::80 udp dport {PORT} dnat to {UPLINK_V6}
 }}
}}
""",
    )
    start_server(topo)
    for public in ["203.0.113.80", "2001:db8:3::80"]:
        exchange = udp_exchange(topo.container, public, PORT, timeout=ANSWER)
        assert exchange.reply_from == (public, PORT), f"no echo via DNAT address {public}"


def test_broadcast_request_is_answered_from_the_interface_address(topo: Topology) -> None:
    for mode in ([], ["--dual-stack"]):
        proc = start_server(topo, *mode)
        client = client_socket(topo)
        with client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            for broadcast in ["192.0.2.255", "255.255.255.255"]:
                client.sendto(b"who is there", (broadcast, PORT))
                reply, source = client.recvfrom(100)
                assert (reply, source) == (b"who is there", (BRIDGE_V4, PORT)), mode
        stop_server(topo, proc)


@contextlib.contextmanager
def joined_v4(topo: Topology, group: str, dev: str) -> Iterator[None]:
    """Join group on dev in the host namespace (the server's wildcard socket then
    receives it, IP_MULTICAST_ALL being on by default)."""
    with netns.entered(topo.host):
        member = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        index = socket.if_nametoindex(dev)
    with member:
        mreqn = struct.pack("=4s4si", socket.inet_aton(group), bytes(4), index)
        member.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        yield


def test_ipv4_multicast_request_is_answered_from_a_unicast_address(topo: Topology) -> None:
    start_server(topo)
    with joined_v4(topo, "239.255.0.1", topo.bridge), client_socket(topo) as client:
        client.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        client.sendto(b"anyone?", ("239.255.0.1", PORT))
        assert client.recvfrom(100) == (b"anyone?", (BRIDGE_V4, PORT))


def test_ipv6_multicast_request_is_answered_from_the_receiving_interface(topo: Topology) -> None:
    start_server(topo)
    bridge_ll = link_local(topo, topo.host, topo.bridge)
    scope = ifindex(topo, topo.container, topo.container_if)
    with client_socket(topo, socket.AF_INET6) as client:
        client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        client.sendto(b"anyone6?", ("ff02::1", PORT, 0, scope))
        reply, source = client.recvfrom(100)
    assert reply == b"anyone6?"
    # The kernel's choice on br0: its link-local address, never the group.
    assert source[:2] == (bridge_ll, PORT)


def test_link_local_request_keeps_its_scope(topo: Topology) -> None:
    start_server(topo)
    bridge_ll = link_local(topo, topo.host, topo.bridge)
    scope = ifindex(topo, topo.container, topo.container_if)
    exchange = udp_exchange(topo.container, bridge_ll, PORT, scope_id=scope, timeout=ANSWER)
    assert exchange.reply_from == (bridge_ll, PORT)


# -- an address that vanishes: drop, never answer from another ----------------------


@pytest.mark.parametrize(
    ("secondary", "prefix", "client"),
    [("203.0.113.13", 24, CONTAINER_V4), ("2001:db8:2::99", 64, CONTAINER_V6)],
    ids=["ipv4", "ipv6"],
)
def test_reply_is_dropped_when_its_address_vanished(
    topo: Topology, secondary: str, prefix: int, client: str
) -> None:
    topo.ip(topo.host, f"addr add {secondary}/{prefix} dev eth0")
    proc = start_server(topo, "--verbose", "--reply-delay", "0.3", stderr=True)
    family = socket.AF_INET6 if ":" in secondary else socket.AF_INET
    with client_socket(topo, family) as sock:
        sock.sendto(b"are you there", (secondary, PORT))
        read_until(proc, f"to {secondary}")  # the server holds the request now
        topo.ip(topo.host, f"addr del {secondary}/{prefix} dev eth0")
        logged = read_until(proc, "reply dropped")
        # Unconnected: a reply from any other address would show up here.
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            print("unexpected reply:", sock.recvfrom(100))
    client_host = endpoint(client, 0).rsplit(":", 1)[0]  # 192.0.2.3 or [2001:db8:1::3]
    assert f"cannot answer {client_host}:" in logged
    assert f"from {secondary}: " in logged
    assert "the address is gone; reply dropped" in logged
    # Still serving the addresses that remain.
    assert udp_exchange(topo.container, BRIDGE_V4, PORT, timeout=ANSWER).answered
    status, _ = stop_server(topo, proc)
    assert status == 0


# -- the library, in process ----------------------------------------------------------


def test_asyncio_server_answers_from_the_right_address(
    topo: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    with netns.entered(topo.host):
        sockets = pktinfo.open_sockets(PORT)

    async def echo(request: pktinfo.Request) -> bytes:
        await asyncio.sleep(0)
        # A longer reply must never leave, whatever the handler says (amplification).
        return request.payload * 10 if request.payload == b"big?" else request.payload

    loop = asyncio.new_event_loop()
    task = loop.create_task(pktinfo.serve_async(sockets, echo))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for address in [UPLINK_V4, UPLINK_V6]:
            exchange = udp_exchange(topo.container, address, PORT, b"quiet", timeout=ANSWER)
            assert (exchange.reply, exchange.reply_from) == (b"quiet", (address, PORT))
        with caplog.at_level(logging.WARNING, logger="ctfix.pktinfo"), client_socket(topo) as sock:
            sock.sendto(b"big?", (UPLINK_V4, PORT))
            # The server's word that it refused to answer (not a guess at how long it
            # takes to get there), then nothing arrives: it sent nothing, and a reply
            # of any length would be here by now.
            deadline = time.monotonic() + ANSWER
            while not any("larger than its 4-byte request" in r.message for r in caplog.records):
                assert time.monotonic() < deadline, "the server never refused the big reply"
                time.sleep(0.02)
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                print("unexpected reply:", sock.recvfrom(100))
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(5)
        loop.close()
        for sock in sockets:
            sock.close()


def test_a_request_that_arrives_the_moment_a_socket_is_bound_is_answered(
    topo: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends as soon as the port is bound (a test, a restart under load)
    must not meet a socket without pktinfo. Each socket gets a datagram right after its
    bind, before open_sockets returns; the address to answer from must be the one it
    was sent to."""
    early = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}

    class SentToAtOnce(socket.socket):
        def bind(self, address: Any) -> None:
            super().bind(address)
            # A client socket never calls bind(): the kernel picks its port.
            with socket.socket(self.family, socket.SOCK_DGRAM) as client:
                client.sendto(b"early", (early[self.family], PORT))

    with netns.entered(topo.host):
        monkeypatch.setattr(socket, "socket", SentToAtOnce)
        try:
            sockets = pktinfo.open_sockets(PORT)
        finally:
            monkeypatch.undo()
    try:
        for sock in sockets:
            sock.settimeout(ANSWER)
            request = pktinfo.receive(sock)
            assert request is not None, f"the early request to {sock.family!r} was dropped"
            # The address to answer from: with pktinfo enabled only after the datagram
            # was queued, IPv4's was 0.0.0.0 (routing's choice: the bug itself).
            address = early[sock.family]
            assert (request.payload, request.local_address) == (b"early", address)
    finally:
        for sock in sockets:
            sock.close()


def test_truncated_ancillary_data_and_port_0_are_dropped(
    topo: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    with netns.entered(topo.host):
        server, _ = sockets = pktinfo.open_sockets(PORT)
    with netns.entered(topo.container):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    try:
        server.settimeout(1.0)
        with caplog.at_level(logging.WARNING, logger="ctfix.pktinfo"):
            with client_socket(topo) as client:
                client.sendto(b"hello", (UPLINK_V4, PORT))
            assert pktinfo.receive(server, ancillary_size=1) is None
            # A UDP header by hand: source port 0, checksum 0 (none, legal for IPv4).
            raw.sendto(struct.pack("!HHHH", 0, PORT, 8 + 5, 0) + b"spoof", (UPLINK_V4, 0))
            assert pktinfo.receive(server) is None
        messages = " | ".join(r.message for r in caplog.records)
        assert "truncated (MSG_CTRUNC)" in messages
        assert f"request from {CONTAINER_V4}:0: source port 0 is never answered" in messages
    finally:
        raw.close()
        for sock in sockets:
            sock.close()
