"""`ctfix watch` where the kernel has no usable ctnetlink: one line, exit 2, nothing done.

The kernel is stood in for at the socket call, with what it really answers:
- no nfnetlink at all: socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER) fails with
  EPROTONOSUPPORT (netlink_create: the protocol is not registered);
- nfnetlink without nf_conntrack_netlink (or without conntrack): the socket opens,
  and a conntrack request is answered with NLMSG_ERROR -EINVAL (nfnetlink_rcv_msg
  finds no subsystem), filtered or not;
- no CAP_NET_ADMIN over the namespace: NLMSG_ERROR -EPERM.
Every other socket is a real one.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

import pytest

from ctfix.cli import main
from ctfix.platform import conntrack

REAL_SOCKET = socket.socket


class RefusingNetfilterSocket:
    """A NETLINK_NETFILTER socket of a kernel that answers every request with -err."""

    def __init__(self, err: int) -> None:
        self.err = err
        self.replies: list[bytes] = []

    def bind(self, address: tuple[int, int]) -> None:
        del address

    def setsockopt(self, *args: Any) -> None:
        del args

    def setblocking(self, flag: bool) -> None:
        del flag

    def send(self, request: bytes) -> int:
        seq = struct.unpack_from("=I", request, 8)[0]
        # NLMSG_ERROR: header, the negative errno, then the request's header.
        self.replies.append(struct.pack("=IHHIIi", 36, 2, 0, seq, 0, -self.err) + request[:16])
        return len(request)

    def recv_into(self, buf: bytearray) -> int:
        reply = self.replies.pop(0)
        buf[: len(reply)] = reply
        return len(reply)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


def kernel(monkeypatch: pytest.MonkeyPatch, *, socket_error: int = 0, answer: int = 0) -> None:
    """Make NETLINK_NETFILTER sockets fail with socket_error, or answer -answer."""

    def fake_socket(family: int = -1, kind: int = -1, proto: int = -1, *rest: Any) -> Any:
        if family == socket.AF_NETLINK and proto == conntrack.NETLINK_NETFILTER:
            if socket_error:
                raise OSError(socket_error, "simulated kernel")
            return RefusingNetfilterSocket(answer)
        return REAL_SOCKET(family, kind, proto, *rest)

    monkeypatch.setattr(socket, "socket", fake_socket)
    monkeypatch.setattr("os.geteuid", lambda: 0)  # past the early privilege check
    # --track must never get as far as loading its table.
    monkeypatch.setattr("ctfix.platform.nft.run_text", pytest.fail)


@pytest.mark.parametrize(
    "failure",
    [{"socket_error": errno.EPROTONOSUPPORT}, {"answer": errno.EINVAL}],
    ids=["no-nfnetlink", "no-ctnetlink"],
)
def test_conntrack_unavailable_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], failure: dict[str, int]
) -> None:
    kernel(monkeypatch, **failure)
    status = main(["watch", "--json", "--track", "--duration", "1"])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""  # no summary: watching never started
    assert err.count("\n") == 1
    assert err.startswith("ctfix watch: error: conntrack is not available in this network")
    assert "modprobe nf_conntrack nf_conntrack_netlink" in err


def test_no_cap_net_admin_over_the_namespace_names_the_capability(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel(monkeypatch, answer=errno.EPERM)
    assert main(["watch", "--duration", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "CAP_NET_ADMIN" in err and err.startswith("ctfix watch: error: ")
