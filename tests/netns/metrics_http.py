"""Scraping `ctfix watch --metrics` inside a test's namespace: a port free there (the
machine's own namespace is never asked: another run may listen on any port of it),
and one GET of /metrics."""

from __future__ import annotations

import socket

from ctfix.platform import netns


def free_port(ns: str) -> int:
    """A TCP port nothing listens on in namespace `ns` (on its loopback)."""
    with netns.entered(ns):
        probe = socket.socket()
    with probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def scrape(ns: str, port: int, timeout: float = 30.0) -> str:
    """The answer (headers and body) to GET /metrics on 127.0.0.1:PORT in `ns`;
    ConnectionRefusedError while nothing listens there yet."""
    with netns.entered(ns):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()
