"""ctfix.pktinfo's pure rules: parsing pktinfo, building the reply's, and refusing.

No sockets: the ancillary data is built by hand exactly as Linux lays it out
(struct in_pktinfo / in6_pktinfo), and `reply()` gets a stand-in that records what
would have been sent.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctfix import pktinfo
from ctfix.cli import main
from ctfix.pktinfo import IN6_PKTINFO, IN_PKTINFO, Dropped, Request

V4 = socket.AF_INET
V6 = socket.AF_INET6


@pytest.fixture(autouse=True)
def _fresh_drop_counts() -> None:
    """Drop logging is rate-limited per kind, process-wide: start each test at zero."""
    pktinfo.reset_drop_counts()


def in_pktinfo(ifindex: int, spec_dst: str, addr: str) -> tuple[int, int, bytes]:
    data = IN_PKTINFO.pack(ifindex, socket.inet_aton(spec_dst), socket.inet_aton(addr))
    return (socket.IPPROTO_IP, pktinfo.IP_PKTINFO, data)


def in6_pktinfo(addr: str, ifindex: int) -> tuple[int, int, bytes]:
    data = IN6_PKTINFO.pack(socket.inet_pton(V6, addr), ifindex)
    return (socket.IPPROTO_IPV6, pktinfo.IPV6_PKTINFO, data)


def parsed(*args: Any) -> Request:
    """A request the address rules accept (the reflection rules, about source ports,
    are tested on their own below)."""
    result = pktinfo.parse_request(*args, guard_reflection=False)
    assert isinstance(result, Request), result
    return result


def sent_pktinfo(request: Request) -> tuple[int, str, int]:
    """(level, source address, ifindex) of the reply's one control message."""
    [(level, kind, data)] = pktinfo.reply_ancillary(request)
    if level == socket.IPPROTO_IP:
        assert kind == pktinfo.IP_PKTINFO
        ifindex, spec_dst, _ = IN_PKTINFO.unpack(data)
        return level, socket.inet_ntop(V4, spec_dst), ifindex
    assert (level, kind) == (socket.IPPROTO_IPV6, pktinfo.IPV6_PKTINFO)
    addr, ifindex = IN6_PKTINFO.unpack(data)
    return level, socket.inet_ntop(V6, addr), ifindex


def test_linux_constants_python_311_lacks() -> None:
    assert (pktinfo.IP_PKTINFO, pktinfo.IPV6_RECVPKTINFO, pktinfo.IPV6_PKTINFO) == (8, 49, 50)
    assert (IN_PKTINFO.size, IN6_PKTINFO.size) == (12, 20)


# -- IPv4 -------------------------------------------------------------------------


def test_ipv4_unicast_reply_leaves_from_the_destination_with_ifindex_0() -> None:
    request = parsed(
        b"q", [in_pktinfo(3, "198.51.100.13", "198.51.100.13")], 0, ("192.0.2.3", 4000), V4
    )
    assert (request.destination, request.local_address, request.ifindex) == (
        "198.51.100.13",
        "198.51.100.13",
        3,
    )
    assert sent_pktinfo(request) == (socket.IPPROTO_IP, "198.51.100.13", 0)


@pytest.mark.parametrize("group", ["192.0.2.255", "255.255.255.255", "239.255.0.1"])
def test_ipv4_broadcast_and_multicast_reply_from_spec_dst_not_the_group(group: str) -> None:
    request = parsed(b"q", [in_pktinfo(2, "192.0.2.1", group)], 0, ("192.0.2.3", 4000), V4)
    assert request.destination == group
    assert sent_pktinfo(request) == (socket.IPPROTO_IP, "192.0.2.1", 0)


@given(
    spec_dst=st.ip_addresses(v=4).map(str),
    addr=st.ip_addresses(v=4).map(str),
    ifindex=st.integers(1, 2**31 - 1),
)
def test_ipv4_reply_source_is_always_spec_dst(spec_dst: str, addr: str, ifindex: int) -> None:
    request = parsed(b"q", [in_pktinfo(ifindex, spec_dst, addr)], 0, ("192.0.2.3", 1), V4)
    assert sent_pktinfo(request) == (socket.IPPROTO_IP, spec_dst, 0)


# -- IPv6 -------------------------------------------------------------------------


def test_ipv6_global_reply_pins_the_source_and_leaves_the_interface_to_routing() -> None:
    request = parsed(b"q", [in6_pktinfo("2001:db8:2::13", 3)], 0, ("2001:db8:1::3", 4000, 0, 0), V6)
    assert sent_pktinfo(request) == (socket.IPPROTO_IPV6, "2001:db8:2::13", 0)


def test_ipv6_link_local_reply_keeps_the_scope() -> None:
    request = parsed(b"q", [in6_pktinfo("fe80::1", 2)], 0, ("fe80::3", 4000, 0, 2), V6)
    assert sent_pktinfo(request) == (socket.IPPROTO_IPV6, "fe80::1", 2)


def test_ipv6_global_destination_from_a_link_local_peer_keeps_the_scope() -> None:
    request = parsed(b"q", [in6_pktinfo("2001:db8:1::1", 2)], 0, ("fe80::3", 4000, 0, 2), V6)
    assert sent_pktinfo(request) == (socket.IPPROTO_IPV6, "2001:db8:1::1", 2)


@pytest.mark.parametrize("group", ["ff02::1", "ff02::1:ff00:1", "ff05::fb"])
def test_ipv6_multicast_reply_lets_the_kernel_pick_the_source_on_that_interface(
    group: str,
) -> None:
    request = parsed(b"q", [in6_pktinfo(group, 2)], 0, ("fe80::3", 4000, 0, 2), V6)
    assert (request.destination, request.local_address) == (group, "::")
    assert sent_pktinfo(request) == (socket.IPPROTO_IPV6, "::", 2)


# -- dual stack ---------------------------------------------------------------------


def test_dual_stack_ipv4_client_reply_is_mapped_and_uses_spec_dst() -> None:
    ancdata = [in6_pktinfo("::ffff:192.0.2.255", 2), in_pktinfo(2, "192.0.2.1", "192.0.2.255")]
    request = parsed(b"q", ancdata, 0, ("::ffff:192.0.2.3", 4000, 0, 0), V6)
    assert request.mapped
    assert request.destination == "::ffff:192.0.2.255"
    # IPV6_PKTINFO with a mapped address is what ip_cmsg_send turns into the v4 source;
    # no ifindex, so routing still picks the interface.
    assert sent_pktinfo(request) == (socket.IPPROTO_IPV6, "::ffff:192.0.2.1", 0)


def test_dual_stack_without_ip_pktinfo_falls_back_to_the_mapped_destination() -> None:
    request = parsed(
        b"q", [in6_pktinfo("::ffff:198.51.100.13", 3)], 0, ("::ffff:192.0.2.3", 9, 0, 0), V6
    )
    assert sent_pktinfo(request) == (socket.IPPROTO_IPV6, "::ffff:198.51.100.13", 0)


# -- drops ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "peer", "ancdata", "kind"),
    [
        (socket.MSG_CTRUNC, ("192.0.2.3", 4000), [], "ctrunc"),
        (socket.MSG_TRUNC, ("192.0.2.3", 4000), [in_pktinfo(2, "192.0.2.1", "192.0.2.1")], "trunc"),
        (0, ("192.0.2.3", 0), [in_pktinfo(2, "192.0.2.1", "192.0.2.1")], "port0"),
        (0, ("2001:db8:1::3", 0, 0, 0), [in6_pktinfo("2001:db8:1::1", 2)], "port0"),
        (0, ("192.0.2.3", 4000), [], "nopktinfo"),
        # Half a control message is no pktinfo at all, not a guess.
        (0, ("192.0.2.3", 4000), [(socket.IPPROTO_IP, pktinfo.IP_PKTINFO, b"\0" * 6)], "nopktinfo"),
    ],
    ids=["ctrunc", "trunc", "port0-v4", "port0-v6", "no-pktinfo", "short-pktinfo"],
)
def test_requests_that_must_not_be_answered(
    flags: int, peer: pktinfo.Sockaddr, ancdata: pktinfo.Ancillary, kind: str
) -> None:
    family = V6 if ":" in peer[0] else V4
    result = pktinfo.parse_request(b"q", ancdata, flags, peer, family)
    assert isinstance(result, Dropped)
    assert result.kind == kind


@pytest.mark.parametrize(
    ("peer_port", "local_port", "guard", "kind"),
    [
        (7000, 7000, True, "reflection"),  # another echo server on our port: a loop
        (53, 7000, True, "reflection"),
        (1023, None, True, "reflection"),
        (1024, None, True, None),
        (7001, 7000, True, None),
        (123, 123, False, None),  # NTP's symmetric mode, switched off on purpose
    ],
)
def test_requests_that_could_loop_or_reflect_are_dropped(
    peer_port: int, local_port: int | None, guard: bool, kind: str | None
) -> None:
    ancdata = [in_pktinfo(2, "192.0.2.1", "192.0.2.1")]
    result = pktinfo.parse_request(
        b"q", ancdata, 0, ("192.0.2.3", peer_port), V4,
        local_port=local_port, guard_reflection=guard,
    )
    assert (result.kind if isinstance(result, Dropped) else None) == kind


def test_ctrunc_wins_over_whatever_pktinfo_did_fit() -> None:
    ancdata = [in_pktinfo(2, "192.0.2.1", "192.0.2.1")]
    result = pktinfo.parse_request(b"q", ancdata, socket.MSG_CTRUNC, ("192.0.2.3", 1), V4)
    assert isinstance(result, Dropped)
    assert "MSG_CTRUNC" in result.reason


@pytest.mark.parametrize(
    ("request_size", "reply_size", "allowed"),
    [(10, 10, True), (10, 0, True), (10, 9, True), (10, 11, False), (0, 1, False)],
)
def test_a_reply_is_never_larger_than_its_request(
    request_size: int, reply_size: int, allowed: bool
) -> None:
    assert pktinfo.reply_allowed(request_size, reply_size) is allowed


# -- reply(): what reaches the socket ----------------------------------------------------


class RecordingSocket:
    """Stands in for a socket: records sendmsg, can fail it, has no sendto at all."""

    def __init__(self, fail: int | None = None) -> None:
        self.fail = fail
        self.sent: list[tuple[list[bytes], pktinfo.Ancillary, int, object]] = []

    def sendmsg(
        self, buffers: list[bytes], ancdata: pktinfo.Ancillary, flags: int, address: object
    ) -> int:
        if self.fail is not None:
            raise OSError(self.fail, "Network is unreachable")
        self.sent.append((buffers, ancdata, flags, address))
        return sum(map(len, buffers))


def request_to(local: str = "198.51.100.13", payload: bytes = b"ping") -> Request:
    return Request(payload, ("192.0.2.3", 4000), local, local, 3, V4)


def test_reply_sends_the_payload_from_the_request_address() -> None:
    sock = RecordingSocket()
    request = request_to()
    assert pktinfo.reply(cast(socket.socket, sock), request, b"pong")
    assert sock.sent == [([b"pong"], pktinfo.reply_ancillary(request), 0, ("192.0.2.3", 4000))]


def test_reply_larger_than_the_request_is_never_sent(caplog: pytest.LogCaptureFixture) -> None:
    sock = RecordingSocket()
    with caplog.at_level(logging.WARNING, logger="ctfix.pktinfo"):
        assert not pktinfo.reply(cast(socket.socket, sock), request_to(), b"pong" * 100)
    assert sock.sent == []
    assert "larger than its 4-byte request; reply dropped" in caplog.text


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENETUNREACH, errno.EADDRNOTAVAIL])
def test_vanished_address_drops_the_reply_without_falling_back(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    # RecordingSocket has no sendto: a fallback would raise AttributeError here.
    sock = RecordingSocket(fail=code)
    with caplog.at_level(logging.WARNING, logger="ctfix.pktinfo"):
        assert not pktinfo.reply(cast(socket.socket, sock), request_to("203.0.113.13"), b"ping")
    assert "cannot answer 192.0.2.3:4000 from 203.0.113.13" in caplog.text
    assert f"({errno.errorcode[code]}), the address is gone; reply dropped" in caplog.text


def test_drop_log_is_rate_limited_to_powers_of_two(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ctfix.pktinfo"):
        for _ in range(20):
            pktinfo.log_drop("unit-test-flood", "spoofed request")
    assert len(caplog.records) == 5  # 1, 2, 4, 8, 16
    assert caplog.records[-1].message == "spoofed request (16 unit-test-flood drops so far)"
    assert pktinfo.drop_counts()["unit-test-flood"] == 20


# -- `ctfix serve` refuses bad input before binding anything ----------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--address", "nope"], "--address 'nope' is not an IP address"),
        (["--address", "239.255.0.1"], "is a multicast group"),
        (["--address", "192.0.2.1%br0"], "only IPv6 addresses take a %scope"),
        (["--broken", "--address", "192.0.2.1"], "--broken binds the wildcard"),
        (["--dual-stack", "--address", "::"], "--dual-stack binds :: itself"),
        (["--reply-delay", "-1"], "--reply-delay must be 0 or more"),
    ],
)
def test_serve_rejects_bad_options_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--port", "5353", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("ctfix serve: error: ")
    assert message in err
