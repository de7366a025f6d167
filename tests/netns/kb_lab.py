"""What the knowledge-base tests need: where a reply really came from, and requests.

`probe()` sends one request from a `connect()`ed client socket in the container
namespace, as resolvers and most UDP clients do, and says which source the reply
came from. A wrong-source reply never reaches a connected socket (its kernel drops it
and answers ICMP port unreachable), so waiting for it would only tell "nothing came"
after a timeout. Instead a second, unconnected "catcher" socket shares the client's
port (SO_REUSEADDR): the kernel delivers a datagram from the addressed server to the
connected socket (the more specific match) and one from any other source to the
catcher. The test so sees at once both what the client noticed (an answer, or none)
and the address and port the reply actually left from.

The request builders below speak just enough of each protocol to draw a reply (an
error reply counts: its source is what is tested).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ctfix.lab.topology import CONTAINER_V4, CONTAINER_V6, family_of
from ctfix.platform import netns

#: Where scripts/setup unpacks the daemons that conflict with an installed package.
KB_ROOT = Path(__file__).resolve().parents[2] / ".venv" / "kb-root"


@dataclass(frozen=True, slots=True)
class Seen:
    """The first reply to one request: its source, and whether the client accepted it."""

    target: tuple[str, int]
    source: tuple[str, int] | None  # None: nothing came back before the deadline
    connected: bool  # True: the connect()ed client got it (it came from `target`)
    data: bytes = b""


def probe(
    ns: str,
    target: str,
    port: int,
    payload: bytes,
    *,
    client_port: int = 0,
    timeout: float = 5.0,
) -> Seen:
    """Send `payload` to target:port from a connected socket in `ns`; see module doc."""
    family = family_of(target)
    wildcard, own = ("::", CONTAINER_V6) if family == socket.AF_INET6 else ("0.0.0.0", CONTAINER_V4)
    with netns.entered(ns):
        catcher = socket.socket(family, socket.SOCK_DGRAM)
        client = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for sock in (catcher, client):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            catcher.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        catcher.bind((wildcard, client_port))
        client.bind((own, catcher.getsockname()[1]))
        client.connect((target, port))
        client.send(payload)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([client, catcher], [], [], left)
            for sock in ready:
                try:
                    data, peer = sock.recvfrom(65535)
                except ConnectionRefusedError:
                    continue  # ICMP port unreachable: nothing listens (yet)
                return Seen((target, port), (peer[0], peer[1]), sock is client, data)
        return Seen((target, port), None, False)
    finally:
        catcher.close()
        client.close()


def wait_for(path: Path, needle: bytes, timeout: float = 10.0) -> bool:
    """Poll a file (a daemon's log or output) until it contains `needle`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if needle in path.read_bytes():
                return True
        time.sleep(0.05)
    return False


def run(*argv: str, env: dict[str, str] | None = None) -> str:
    """A set-up command (key generation and the like); a failure names its output."""
    proc = subprocess.run(
        argv, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr or proc.stdout}")
    return proc.stdout


# -- requests ---------------------------------------------------------------------------


def dns_query(name: str = "version.bind.", qtype: int = 16, qclass: int = 3) -> bytes:
    """A DNS query (default: version.bind CH TXT, which most servers answer at once)."""
    labels = b"".join(
        bytes([len(part)]) + part.encode() for part in name.rstrip(".").split(".") if part
    )
    header = struct.pack("!HHHHHH", secrets.randbits(16), 0x0100, 1, 0, 0, 0)
    return header + labels + b"\0" + struct.pack("!HH", qtype, qclass)


def ntp_request() -> bytes:
    """An NTPv4 client-mode packet (LI 0, VN 4, mode 3) with a transmit time."""
    return bytes([0x23]) + bytes(39) + struct.pack("!II", int(time.time()) + 2208988800, 0)


def snmp_get(community: bytes = b"public") -> bytes:
    """SNMPv2c GetRequest for sysDescr.0 (1.3.6.1.2.1.1.1.0)."""
    oid = bytes([0x06, 0x08, 0x2B, 6, 1, 2, 1, 1, 1, 0])
    varbind = _tlv(0x30, oid + b"\x05\x00")
    pdu = _tlv(
        0xA0,
        _tlv(0x02, secrets.token_bytes(2).lstrip(b"\0") or b"\1")
        + b"\x02\x01\x00\x02\x01\x00"
        + _tlv(0x30, varbind),
    )
    return _tlv(0x30, b"\x02\x01\x01" + _tlv(0x04, community) + pdu)


def radius_access_request(secret: bytes, user: bytes = b"ctfix", password: bytes = b"x") -> bytes:
    """RADIUS Access-Request (RFC 2865) with User-Name and User-Password."""
    authenticator = secrets.token_bytes(16)
    padded = password + bytes(-len(password) % 16)
    hidden = b""
    last = authenticator
    for i in range(0, len(padded), 16):
        mask = hashlib.md5(secret + last).digest()
        last = bytes(a ^ b for a, b in zip(padded[i : i + 16], mask, strict=True))
        hidden += last
    attrs = bytes([1, 2 + len(user)]) + user + bytes([2, 2 + len(hidden)]) + hidden
    attrs += bytes([80, 18]) + bytes(16)  # Message-Authenticator, filled in below
    head = struct.pack("!BBH", 1, secrets.randbits(8), 20 + len(attrs))
    mac = hmac.new(secret, head + authenticator + attrs, hashlib.md5).digest()
    return head + authenticator + attrs[:-16] + mac


def tftp_rrq(name: bytes = b"ctfix-test.txt") -> bytes:
    """TFTP read request (RFC 1350), octet mode."""
    return b"\x00\x01" + name + b"\0octet\0"


def stun_binding() -> bytes:
    """STUN Binding Request (RFC 5389): the TURN server's simplest question."""
    return struct.pack("!HHI", 0x0001, 0, 0x2112A442) + secrets.token_bytes(12)


def memcached_version() -> bytes:
    """memcached's UDP frame header (request id, sequence 0, 1 datagram) + `version`."""
    return struct.pack("!HHHH", secrets.randbits(16), 0, 1, 0) + b"version\r\n"


def syslog_line(tag: str) -> bytes:
    return f"<13>Jan  1 00:00:00 client ctfix: {tag}".encode()


def sip_options(target: str, port: int) -> bytes:
    """A SIP OPTIONS request (RFC 3261) over UDP; any status line is a reply."""
    host = f"[{target}]" if ":" in target else target
    branch = "z9hG4bK" + secrets.token_hex(6)
    lines = [
        f"OPTIONS sip:ping@{host}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {host}:5999;branch={branch};rport",
        "Max-Forwards: 70",
        f"To: <sip:ping@{host}>",
        f"From: <sip:ctfix@{host}>;tag={secrets.token_hex(4)}",
        f"Call-ID: {secrets.token_hex(8)}",
        "CSeq: 1 OPTIONS",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ike_sa_init() -> bytes:
    """An IKEv2 IKE_SA_INIT request (RFC 7296): one proposal (AES-CBC-128,
    HMAC-SHA2-256, PRF-SHA2-256, MODP-2048), a KE and a nonce. A responder with no
    matching configuration still answers (NO_PROPOSAL_CHOSEN or a full response)."""

    def transform(last: bool, kind: int, ident: int, attrs: bytes = b"") -> bytes:
        return struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attrs), kind, 0, ident) + attrs

    transforms = (
        transform(False, 1, 12, struct.pack("!HH", 0x800E, 128))  # ENCR AES-CBC, 128 bits
        + transform(False, 3, 12)  # INTEG HMAC-SHA2-256-128
        + transform(False, 2, 5)  # PRF HMAC-SHA2-256
        + transform(True, 4, 14)  # D-H group 14
    )
    proposal = struct.pack("!BBHBBBB", 0, 0, 8 + len(transforms), 1, 1, 0, 4) + transforms
    key = b"\x01" + secrets.token_bytes(255)
    ke = struct.pack("!HH", 14, 0) + key
    nonce = secrets.token_bytes(32)
    payloads = (
        struct.pack("!BBH", 34, 0, 4 + len(proposal)) + proposal  # SA, next KE
        + struct.pack("!BBH", 40, 0, 4 + len(ke)) + ke  # KE, next Nonce
        + struct.pack("!BBH", 0, 0, 4 + len(nonce)) + nonce  # Nonce, last
    )
    header = struct.pack("!8s8sBBBBII", secrets.token_bytes(8), bytes(8), 33, 0x20, 34, 0x08, 0,
                         28 + len(payloads))
    return header + payloads


def dhcp_relayed_discover(relay: str) -> bytes:
    """A DHCPDISCOVER as a relay agent forwards it (giaddr = the relay, hops 1): the
    server answers the relay's address on port 67 with a plain UDP datagram."""
    mac = b"\x02\x00\x00" + secrets.token_bytes(3)
    fixed = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1, 1, 6, 1, secrets.randbits(32), 0, 0,
        bytes(4), bytes(4), bytes(4), socket.inet_aton(relay), mac + bytes(10), b"", b"",
    )
    options = b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\xff"
    return fixed + options


def krb5_as_req(realm: str, user: str = "ctfix") -> bytes:
    """A minimal Kerberos 5 AS-REQ (RFC 4120) for user@realm; the KDC answers with a
    KRB-ERROR (unknown principal, or pre-authentication required)."""

    def ctx(n: int, body: bytes) -> bytes:
        return _tlv(0xA0 + n, body)

    def integer(n: int) -> bytes:
        raw = n.to_bytes((n.bit_length() + 8) // 8 or 1, "big")
        return _tlv(0x02, raw)

    def string(text: str) -> bytes:
        return _tlv(0x1B, text.encode())  # GeneralString

    def principal(kind: int, *parts: str) -> bytes:
        return _tlv(0x30, ctx(0, integer(kind)) + ctx(1, _tlv(0x30, b"".join(map(string, parts)))))

    body = _tlv(
        0x30,
        ctx(0, _tlv(0x03, b"\x00\x00\x00\x00\x00"))  # kdc-options
        + ctx(1, principal(1, user))
        + ctx(2, string(realm))
        + ctx(3, principal(2, "krbtgt", realm))
        + ctx(5, _tlv(0x18, b"20370913024805Z"))
        + ctx(7, integer(secrets.randbits(31)))
        + ctx(8, _tlv(0x30, integer(18) + integer(17))),
    )
    return _tlv(0x6A, _tlv(0x30, ctx(1, integer(5)) + ctx(2, integer(10)) + ctx(4, body)))


def _tlv(tag: int, value: bytes) -> bytes:
    size = len(value)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + value


def openvpn_hard_reset() -> bytes:
    """OpenVPN P_CONTROL_HARD_RESET_CLIENT_V2 (no tls-auth): opcode 7, key id 0, a
    session id, an empty ack array and message packet id 0. A TLS server answers with
    P_CONTROL_HARD_RESET_SERVER_V2."""
    return bytes([7 << 3]) + secrets.token_bytes(8) + b"\x00" + struct.pack("!I", 0)
