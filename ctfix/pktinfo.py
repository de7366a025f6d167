"""Answer UDP requests from the address they were sent to (IP_PKTINFO / IPV6_PKTINFO).

A UDP server bound to the wildcard (0.0.0.0 or ::) that answers with ``sendto()``
lets the kernel choose the reply's source address by routing. On a host with several
addresses that is often not the address the client sent to, and a client that
``connect()``ed (every stub resolver, most game and VPN clients) drops the reply and
answers ICMP port unreachable. This module is the standard-library-only fix, meant to
be used as is or copied into another service: it asks the kernel which local address
each request arrived on and hands that address back to ``sendmsg()`` as the reply's
source. Synchronous (``receive``/``reply``/``serve_forever``) and asyncio
(``serve_async``) entry points share the same rules.

One module on purpose (about 500 lines): it is meant to be copied whole into another
service.

Know before changing: every reply goes through ``reply()``, and ``reply()`` never falls
back to a plain ``sendto()``. A reply that cannot leave from the right address is
dropped and logged: a reply from the wrong address is worse than none, because the
client cannot tell it from an attack and the failure hides.

Why each rule exists (what dnsmasq, unbound, PowerDNS, quic-go and quinn learned):

* Separate IPv4 and IPv6 sockets, IPV6_V6ONLY set. Whether ``::`` also takes IPv4
  depends on the ``net.ipv6.bindv6only`` sysctl, so unbound and dnsmasq set the option
  explicitly and open one socket per family; a dual-stack socket is opt-in here
  (``dual_stack=True``) and sees IPv4 clients as ``::ffff:a.b.c.d``. For those the
  reply carries IPV6_PKTINFO with the mapped address, which Linux turns into the
  IPv4 source (``ip_cmsg_send`` accepts it on AF_INET6 sockets).
* IPv4 replies use ``ipi_spec_dst``, not ``ipi_addr``. ``ipi_addr`` is the header's
  destination: for a request sent to a broadcast (192.0.2.255, 255.255.255.255) or
  multicast address it is that address, and no reply may come from it. The kernel
  fills ``ipi_spec_dst`` with the destination for unicast and with a unicast address
  of the receiving interface otherwise (``fib_compute_spec_dst``); dnsmasq answers
  from it for the same reason.
* IPv4 replies carry ifindex 0: the source is pinned, the interface is left to
  routing, so policy routing and multi-path setups still apply.
* IPv6 multicast requests (ff02::1, ff05::...) are answered with the source left to
  the kernel (``::``) on the receiving interface, the way unbound does: the group
  address is not a source, and source selection on that interface picks the right
  unicast (often link-local) address.
* IPv6 link-local traffic keeps its scope: a link-local source or peer is only
  meaningful with its interface, so the reply names the interface the request came
  in on; a global address leaves the interface to routing (ifindex 0).
* The ancillary buffer has room for both kinds of pktinfo (a dual-stack socket gets
  IP_PKTINFO and IPV6_PKTINFO for the same IPv4 datagram), and MSG_CTRUNC is checked:
  truncated control data means the destination may be missing, and guessing it is
  exactly the bug this module exists to avoid. Such requests are dropped and logged.
* Never fall back to ``sendto()``. If the address the request came to vanished
  before the reply (DHCP renewal, a VIP moved away, a container restarted), the
  kernel refuses the source with EINVAL, EADDRNOTAVAIL or ENETUNREACH; PowerDNS and
  dnsmasq drop the answer rather than send it from another address.
* Not an amplifier: a reply is never larger than its request, checked in ``reply()``
  for whatever payload a handler returns, so a spoofed request cannot make this
  server send more bytes to a victim than the attacker sent. Requests from source
  port 0 are dropped: no real client can receive on port 0, so they are spoofed or
  broken, and answering them only feeds reflection.
* Not a loop: requests from the server's own port (another echo server like this
  one: two of them and one spoofed datagram would bounce for ever) or from a port
  below 1024 (a spoofed victim's echo, chargen, DNS or NTP service, which answers
  whatever arrives) are dropped. ``guard_reflection=False`` turns this off for a
  protocol whose clients send from low ports and whose replies are never requests.
* Drop messages are logged on the ``ctfix.pktinfo`` logger, the first of each kind
  and then at every power of two, so a flood cannot turn into a log flood.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import selectors
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("ctfix.pktinfo")

#: Linux values; Python 3.11 lacks socket.IP_PKTINFO (added in 3.12).
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO: int = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO: int = getattr(socket, "IPV6_PKTINFO", 50)

#: struct in_pktinfo { int ipi_ifindex; struct in_addr ipi_spec_dst, ipi_addr; }
IN_PKTINFO = struct.Struct("=i4s4s")
#: struct in6_pktinfo { struct in6_addr ipi6_addr; int ipi6_ifindex; }
IN6_PKTINFO = struct.Struct("=16si")

#: Room for both pktinfo messages a dual-stack socket can receive for one datagram.
ANCILLARY_SIZE = socket.CMSG_SPACE(IN_PKTINFO.size) + socket.CMSG_SPACE(IN6_PKTINFO.size)
#: The largest UDP payload; a smaller buffer would truncate (MSG_TRUNC) big requests.
MAX_DATAGRAM = 65535

#: sendmsg errors that mean "this source address (or its interface) is gone".
ADDRESS_GONE_ERRNOS = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH})

Sockaddr: TypeAlias = tuple[str, int] | tuple[str, int, int, int]
Ancillary: TypeAlias = list[tuple[int, int, bytes]]
Handler: TypeAlias = Callable[["Request"], bytes | None]
AsyncHandler: TypeAlias = Callable[["Request"], bytes | Awaitable[bytes | None] | None]


@dataclass(frozen=True, slots=True)
class Request:
    """One datagram and where it came to.

    ``destination`` is the header's destination (possibly a broadcast, multicast or,
    on a dual-stack socket, ``::ffff:a.b.c.d`` address); ``local_address`` is the
    address the reply must leave from (``::`` or ``0.0.0.0``: let the kernel pick on
    ``ifindex``); ``family`` is the receiving socket's family.
    """

    payload: bytes
    peer: Sockaddr
    destination: str
    local_address: str
    ifindex: int
    family: int

    @property
    def peer_port(self) -> int:
        return self.peer[1]

    @property
    def mapped(self) -> bool:
        """An IPv4 client seen by a dual-stack socket."""
        return self.family == socket.AF_INET6 and self.peer[0].startswith("::ffff:")


@dataclass(frozen=True, slots=True)
class Dropped:
    """A datagram that must not be answered, and why (``kind`` is a stable key)."""

    kind: str
    reason: str


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.split("%", 1)[0])


def _peer_text(peer: Sockaddr) -> str:
    host = peer[0].split("%", 1)[0]
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"


# -- pure pieces: what arrived, what to send ------------------------------------------


#: Requests from source ports below this are not answered (reflection guard).
LOWEST_PEER_PORT = 1024


def reflection_risk(peer_port: int, local_port: int | None) -> str | None:
    """Why answering a request from peer_port could loop or reflect (None: it cannot).

    A request from the server's own port may come from another server like this one
    (two echo servers and one spoofed datagram bounce for ever); one from a port
    below 1024 may be a spoofed victim's service (echo, chargen, DNS, NTP answer
    whatever arrives). No real client of such a service sends from those ports.
    """
    if local_port is not None and peer_port == local_port:
        return f"source port {peer_port} is this server's own port (an echo loop)"
    if 0 < peer_port < LOWEST_PEER_PORT:
        return f"source port {peer_port} is below {LOWEST_PEER_PORT} (reflection)"
    return None


def parse_request(
    payload: bytes,
    ancdata: Iterable[tuple[int, int, bytes]],
    flags: int,
    peer: Sockaddr,
    family: int,
    *,
    local_port: int | None = None,
    guard_reflection: bool = True,
) -> Request | Dropped:
    """Turn one recvmsg() result into a Request, or say why it must be dropped.

    `local_port` is the receiving socket's port; `guard_reflection=False` answers
    the requests `reflection_risk` refuses (for a protocol whose clients do send from
    low ports, such as NTP's 123, and whose replies are never requests).
    """
    who = _peer_text(peer)
    if flags & socket.MSG_CTRUNC:
        return Dropped("ctrunc", f"ancillary data from {who} truncated (MSG_CTRUNC)")
    if flags & socket.MSG_TRUNC:
        return Dropped("trunc", f"datagram from {who} larger than the receive buffer")
    if peer[1] == 0:
        return Dropped("port0", f"request from {who}: source port 0 is never answered")
    risk = reflection_risk(peer[1], local_port) if guard_reflection else None
    if risk is not None:
        return Dropped("reflection", f"request from {who}: {risk}")
    v4: tuple[int, str, str] | None = None  # ifindex, spec_dst, addr
    v6: tuple[int, str] | None = None  # ifindex, addr
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= IN_PKTINFO.size:
            ifindex, spec_dst, addr = IN_PKTINFO.unpack_from(data)
            v4 = (
                ifindex,
                socket.inet_ntop(socket.AF_INET, spec_dst),
                socket.inet_ntop(socket.AF_INET, addr),
            )
        elif (
            level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= IN6_PKTINFO.size
        ):
            addr6, ifindex6 = IN6_PKTINFO.unpack_from(data)
            v6 = (ifindex6, socket.inet_ntop(socket.AF_INET6, addr6))
    if family == socket.AF_INET:
        if v4 is None:
            return Dropped("nopktinfo", f"request from {who} without IP_PKTINFO")
        ifindex, spec_dst, addr = v4
        return Request(payload, peer, addr, spec_dst, ifindex, family)
    if v6 is None and v4 is None:
        return Dropped("nopktinfo", f"request from {who} without IPV6_PKTINFO")
    if v4 is not None:
        # An IPv4 datagram on a dual-stack socket: spec_dst is right for broadcast and
        # multicast, where the mapped header destination is not.
        ifindex, spec_dst, addr = v4
        return Request(payload, peer, f"::ffff:{addr}", f"::ffff:{spec_dst}", ifindex, family)
    assert v6 is not None
    ifindex6, addr6 = v6
    local = "::" if _ip(addr6).is_multicast else addr6
    return Request(payload, peer, addr6, local, ifindex6, family)


def reply_ancillary(request: Request) -> Ancillary:
    """The control message that makes the reply leave from request.local_address."""
    if request.family == socket.AF_INET:
        data = IN_PKTINFO.pack(0, socket.inet_pton(socket.AF_INET, request.local_address), bytes(4))
        return [(socket.IPPROTO_IP, IP_PKTINFO, data)]
    local = _ip(request.local_address)
    scoped = (
        local.is_unspecified  # multicast request: the kernel picks the source on ifindex
        or local.is_link_local
        or any(request.peer[3:])  # an IPv6 peer with a scope id
        or _ip(request.peer[0]).is_link_local
    )
    ifindex = request.ifindex if scoped and not request.mapped else 0
    data = IN6_PKTINFO.pack(socket.inet_pton(socket.AF_INET6, str(local)), ifindex)
    return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, data)]


def reply_allowed(request_size: int, reply_size: int) -> bool:
    """The anti-amplification rule: never send more than the request carried."""
    return 0 <= reply_size <= request_size


# -- drop logging ------------------------------------------------------------------

_drops: Counter[str] = Counter()
_drops_lock = threading.Lock()


def log_drop(kind: str, message: str) -> None:
    """Log the first drop of a kind, then at every power of two (1, 2, 4, 8, ...)."""
    with _drops_lock:
        _drops[kind] += 1
        count = _drops[kind]
    if count & (count - 1) == 0:
        suffix = "" if count == 1 else f" ({count} {kind} drops so far)"
        log.warning("%s%s", message, suffix)


def drop_counts() -> dict[str, int]:
    """How many requests/replies were dropped, by kind (for metrics and tests)."""
    with _drops_lock:
        return dict(_drops)


def reset_drop_counts() -> None:
    """Start counting (and logging) drops afresh, e.g. after a metrics scrape."""
    with _drops_lock:
        _drops.clear()


# -- sockets -----------------------------------------------------------------------


def bind_udp(
    address: str, port: int, *, v6only: bool = True, pktinfo: bool = False
) -> socket.socket:
    """A UDP socket bound to address:port (``fe80::1%br0`` style scopes work), plain
    or with pktinfo enabled before the bind: a datagram that arrives the moment the
    socket is bound must carry its destination, or it could only be dropped."""
    host, _, scope = address.partition("%")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        if pktinfo:
            enable_pktinfo(sock)
        if family == socket.AF_INET6:
            scope_id = (
                (int(scope) if scope.isdigit() else socket.if_nametoindex(scope)) if scope else 0
            )
            sock.bind((host, port, 0, scope_id))
        else:
            sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def enable_pktinfo(sock: socket.socket) -> None:
    """Ask the kernel for each datagram's destination and interface."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        return
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    if not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
        # IPv4 clients of a dual-stack socket: IP_PKTINFO adds ipi_spec_dst.
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def open_sockets(
    port: int, addresses: Sequence[str] = (), *, dual_stack: bool = False
) -> list[socket.socket]:
    """Bound UDP sockets with pktinfo enabled.

    No addresses: 0.0.0.0 and :: (IPV6_V6ONLY), or one dual-stack :: socket. With
    addresses: one socket per address. The IPv6 wildcard is skipped, with a log line,
    on a kernel without IPv6. On any error the sockets opened so far are closed.
    """
    sockets: list[socket.socket] = []
    try:
        if addresses:
            for address in addresses:
                sockets.append(bind_udp(address, port, pktinfo=True))
        elif dual_stack:
            sockets.append(bind_udp("::", port, v6only=False, pktinfo=True))
        else:
            sockets.append(bind_udp("0.0.0.0", port, pktinfo=True))
            try:
                sockets.append(bind_udp("::", port, pktinfo=True))
            except OSError as err:
                if err.errno != errno.EAFNOSUPPORT:
                    raise
                log.warning("IPv6 is not available here; serving IPv4 only")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def receive(
    sock: socket.socket,
    *,
    ancillary_size: int = ANCILLARY_SIZE,
    guard_reflection: bool = True,
) -> Request | None:
    """Read one datagram; None if it must not be answered (the reason is logged).

    On a non-blocking socket with nothing to read, BlockingIOError propagates.
    """
    payload, ancdata, flags, peer = sock.recvmsg(MAX_DATAGRAM, ancillary_size)
    parsed = parse_request(
        payload, ancdata, flags, peer, sock.family,
        local_port=sock.getsockname()[1], guard_reflection=guard_reflection,
    )
    if isinstance(parsed, Dropped):
        log_drop(parsed.kind, f"{parsed.reason}; request dropped")
        return None
    log.debug(
        "request of %d bytes from %s to %s",
        len(payload),
        _peer_text(parsed.peer),
        parsed.destination,
    )
    return parsed


def reply(sock: socket.socket, request: Request, payload: bytes) -> bool:
    """Send payload to the request's peer from the address the request came to.

    Returns False, with a log line, when the reply was not sent: it is larger than
    the request, or the kernel refused the source (address gone) or the send.
    """
    if not reply_allowed(len(request.payload), len(payload)):
        log_drop(
            "amplification",
            f"reply of {len(payload)} bytes to {_peer_text(request.peer)} is larger than "
            f"its {len(request.payload)}-byte request; reply dropped",
        )
        return False
    try:
        sock.sendmsg([payload], reply_ancillary(request), 0, request.peer)
    except OSError as err:
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        why = "the address is gone" if err.errno in ADDRESS_GONE_ERRNOS else "send failed"
        log_drop(
            "gone" if err.errno in ADDRESS_GONE_ERRNOS else "sendfail",
            f"cannot answer {_peer_text(request.peer)} from {request.local_address}: "
            f"{err.strerror} ({name}), {why}; reply dropped",
        )
        return False
    log.debug(
        "echo %d bytes to %s from %s",
        len(payload),
        _peer_text(request.peer),
        request.local_address,
    )
    return True


# -- serving loops -----------------------------------------------------------------


class Stopper:
    """Stops serve_forever from another thread or a signal handler (a self-pipe)."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # already signalled (buffer full) or closed
            self._writer.send(b"\0")

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


def readable(
    sockets: Sequence[socket.socket], stop: Stopper | None = None
) -> Iterator[socket.socket]:
    """Each socket whenever it is readable, until stop.stop(); the serving loop.

    The sockets are switched to non-blocking: a readiness report can be stale (a
    datagram with a bad checksum is discarded only when read, so the caller must
    expect BlockingIOError) and a full send buffer should drop one UDP reply, not
    stall the server.
    """
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, sock)
        if stop is not None:
            selector.register(stop, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is stop:
                    return
                yield key.data


def serve_forever(
    sockets: Sequence[socket.socket],
    handler: Handler,
    *,
    stop: Stopper | None = None,
    guard_reflection: bool = True,
) -> None:
    """Answer each request with handler(request) (None: no reply) until stop.stop()."""
    for sock in readable(sockets, stop):
        try:
            request = receive(sock, guard_reflection=guard_reflection)
        except (BlockingIOError, InterruptedError):
            continue
        if request is None:
            continue
        answer = handler(request)
        if answer is not None:
            reply(sock, request, answer)


async def serve_async(
    sockets: Sequence[socket.socket], handler: AsyncHandler, *, guard_reflection: bool = True
) -> None:
    """asyncio version of serve_forever: runs until cancelled.

    handler may return the reply (or None) or an awaitable of it; awaitables run as
    tasks, so a slow handler does not hold up other requests. asyncio's
    DatagramProtocol cannot be used: it never passes ancillary data.
    """
    import asyncio  # here, not at the top: it doubles the import time of `ctfix serve`

    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def finish(
        sock: socket.socket, request: Request, answer: Awaitable[bytes | None]
    ) -> None:
        payload = await answer
        if payload is not None:
            reply(sock, request, payload)

    def readable(sock: socket.socket) -> None:
        for _ in range(64):  # bounded, so one busy socket cannot starve the others
            try:
                request = receive(sock, guard_reflection=guard_reflection)
            except (BlockingIOError, InterruptedError):
                return
            if request is None:
                continue
            answer = handler(request)
            if answer is None or isinstance(answer, bytes):
                if answer is not None:
                    reply(sock, request, answer)
                continue
            task = loop.create_task(finish(sock, request, answer))
            pending.add(task)
            task.add_done_callback(pending.discard)

    for sock in sockets:
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), readable, sock)
    try:
        await loop.create_future()
    finally:
        for sock in sockets:
            loop.remove_reader(sock.fileno())
        for task in pending:
            task.cancel()


def describe(sock: socket.socket) -> str:
    """`0.0.0.0:53`, `[::]:53`: where a socket listens, for start-up messages."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = [
    "ANCILLARY_SIZE",
    "IPV6_PKTINFO",
    "IPV6_RECVPKTINFO",
    "IP_PKTINFO",
    "Dropped",
    "Request",
    "Stopper",
    "bind_udp",
    "describe",
    "drop_counts",
    "enable_pktinfo",
    "log_drop",
    "open_sockets",
    "parse_request",
    "readable",
    "receive",
    "reflection_risk",
    "reply",
    "reply_allowed",
    "reply_ancillary",
    "reset_drop_counts",
    "serve_async",
    "serve_forever",
]
