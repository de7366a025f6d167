"""`ctfix serve`: the reference UDP echo server, and its broken twin for the lab.

The correct server is a thin shell around `ctfix.pktinfo` (every rule lives there);
`--broken` is the bug on purpose: wildcard sockets answered with `recvfrom`/`sendto`,
so the kernel picks the reply's source by routing.

Know before changing: `ctfix lab` and the namespace tests read the one start-up line
("ctfix serve: listening on ...") and wait for the port to be bound; keep that line's
shape, print it only once every socket is bound, and exit 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType

from ctfix import pktinfo
from ctfix.commands.common import add_netns_argument, enter_netns, port_number
from ctfix.core.addr import endpoint
from ctfix.errors import CtfixError, PrivilegeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run a UDP echo server that always answers from the address each request was\n"
        "sent to (IP_PKTINFO / IPV6_PKTINFO with recvmsg/sendmsg), the proper fix, as\n"
        "dnsmasq does it. Its socket code is ctfix/pktinfo.py, a small library\n"
        "(blocking and asyncio) to copy or import; docs/pktinfo.md explains each rule.\n"
        "--broken answers with recvfrom/sendto instead, to reproduce the bug."
    )
    parser.epilog = (
        "examples:\n"
        "  ctfix serve --port 5353                     IPv4 and IPv6 wildcard sockets\n"
        "  ctfix serve --port 5353 --dual-stack        one :: socket for both families\n"
        "  ctfix serve --port 5353 --address 192.0.2.1 --address fe80::1%br0\n"
        "  ctfix serve --port 5353 --broken -v         the bug, logging each reply\n"
        "\n"
        "exit status: 0 stopped by Ctrl-C or SIGTERM (cleanly); 2 errors (the port is taken,\n"
        "an address this host does not have, missing privilege)."
    )
    parser.add_argument(
        "--port", type=port_number, required=True, metavar="P", help="UDP port to serve"
    )
    parser.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="ADDR",
        help="bind this address instead of the wildcards (repeatable; fe80::1%%br0 for "
        "a link-local address)",
    )
    parser.add_argument(
        "--dual-stack",
        action="store_true",
        help="one AF_INET6 socket on :: that also serves IPv4 clients (::ffff:a.b.c.d) "
        "instead of separate 0.0.0.0 and :: sockets",
    )
    parser.add_argument(
        "--broken",
        action="store_true",
        help="reproduce the bug: answer with recvfrom/sendto from wildcard sockets",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every request and reply on stderr"
    )
    add_netns_argument(parser)
    # Test hook: hold each reply back, so a test can remove the address meanwhile.
    parser.add_argument("--reply-delay", type=float, default=0.0, help=argparse.SUPPRESS)


def _check_addresses(addresses: Sequence[str]) -> list[str]:
    checked = []
    for text in addresses:
        host, _, scope = text.partition("%")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise CtfixError(
                f"--address {text!r} is not an IP address", "use e.g. 192.0.2.1 or 2001:db8::1"
            ) from None
        if ip.is_multicast:
            raise CtfixError(
                f"--address {text} is a multicast group",
                "bind a unicast address, or the wildcard (no --address)",
            )
        if scope and ip.version == 4:
            raise CtfixError(f"--address {text}: only IPv6 addresses take a %scope")
        checked.append(f"{ip}%{scope}" if scope else str(ip))
    return checked


def _bind_error(err: OSError, port: int, where: str) -> CtfixError:
    if err.errno == errno.EADDRINUSE:
        return CtfixError(
            f"UDP port {port} is already in use ({where})",
            f"stop the other server (`ss -ulpn sport = :{port}`) or choose another --port",
        )
    if err.errno == errno.EACCES:
        return PrivilegeError(f"binding UDP port {port}", "CAP_NET_BIND_SERVICE")
    if err.errno == errno.EADDRNOTAVAIL:
        return CtfixError(f"{where} is not an address of this host", "list them with `ip address`")
    if err.errno == errno.ENODEV or isinstance(err, socket.gaierror):
        return CtfixError(f"{where}: no such interface", "list them with `ip link`")
    return CtfixError(f"cannot bind UDP port {port} ({where}): {err.strerror or err}")


def _open(args: argparse.Namespace, addresses: list[str]) -> list[socket.socket]:
    where = ", ".join(addresses) if addresses else "the wildcard addresses"
    try:
        if args.broken:
            return _open_broken(args.port, args.dual_stack)
        return pktinfo.open_sockets(args.port, addresses, dual_stack=args.dual_stack)
    except OSError as err:
        raise _bind_error(err, args.port, where) from None


def _open_broken(port: int, dual_stack: bool) -> list[socket.socket]:
    if dual_stack:
        return [pktinfo.bind_udp("::", port, v6only=False)]
    sockets = [pktinfo.bind_udp("0.0.0.0", port)]
    try:
        sockets.append(pktinfo.bind_udp("::", port))
    except OSError:
        sockets[0].close()
        raise
    return sockets


def _serve_broken(sockets: Sequence[socket.socket], stop: pktinfo.Stopper, delay: float) -> None:
    """The bug: the reply's source is whatever routing picks for the client."""
    log = logging.getLogger("ctfix.pktinfo")
    for sock in pktinfo.readable(sockets, stop):
        try:
            payload, peer = sock.recvfrom(pktinfo.MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            continue
        if peer[1] == 0:
            continue
        risk = pktinfo.reflection_risk(peer[1], sock.getsockname()[1])
        if risk is not None:  # broken on purpose, but never a loop or a reflector
            pktinfo.log_drop("reflection", f"request from {endpoint(peer[0], peer[1])}: {risk}")
            continue
        # recvfrom() cannot say which local address the request was sent to: that
        # blindness is the bug, so the log can only name the client.
        log.debug("request of %d bytes from %s", len(payload), endpoint(peer[0], peer[1]))
        if delay:
            time.sleep(delay)
        try:
            sock.sendto(payload, peer)
        except OSError as err:
            log.warning("sendto %s failed: %s", peer[0], err.strerror)
            continue
        log.debug(
            "echo %d bytes to %s with sendto(): the kernel picks the source",
            len(payload),
            endpoint(peer[0], peer[1]),
        )


def run(args: argparse.Namespace) -> int:
    if args.broken and args.address:
        raise CtfixError("--broken binds the wildcard addresses on purpose; it takes no --address")
    if args.dual_stack and args.address:
        raise CtfixError("--dual-stack binds :: itself; it takes no --address")
    if args.reply_delay < 0:
        raise CtfixError("--reply-delay must be 0 or more seconds")
    addresses = _check_addresses(args.address)
    enter_netns(args.netns)

    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("ctfix serve: %(message)s"))
    logger = logging.getLogger("ctfix.pktinfo")
    logger.addHandler(stderr)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logger.propagate = False

    sockets = _open(args, addresses)
    stop = pktinfo.Stopper()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        mode = "recvfrom/sendto, broken on purpose" if args.broken else "pktinfo"
        if args.dual_stack:
            mode += ", dual-stack"
        listening = ", ".join(pktinfo.describe(sock) for sock in sockets)
        print(f"ctfix serve: listening on {listening} ({mode})", flush=True)
        if args.broken:
            _serve_broken(sockets, stop, args.reply_delay)
        else:
            delay = args.reply_delay

            def echo(request: pktinfo.Request) -> bytes:
                if delay:
                    time.sleep(delay)
                return request.payload

            pktinfo.serve_forever(sockets, echo, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()
        stop.close()
        logger.removeHandler(stderr)
    return 0
