"""One contract for machine output: the schema-2 envelope, and how JSON is written.

Know before changing: explain, scan, fix, health and check share this envelope
(`schema`, `generated`, `host`, `ctfix`); scripts key on `schema` to know the shape.
Bump SCHEMA only for a change that breaks a reader (a key renamed, removed or
retyped), and say so in docs/json.md. A document is compact on a pipe and indented
on a terminal (as `ip -j -p` and `nft -j` users expect); JSON *lines* (watch) are
always one line each.
"""

from __future__ import annotations

import datetime
import json
import socket
from typing import Any, TextIO

from ctfix import __version__

SCHEMA = 2


def utc_timestamp(seconds: float | None = None) -> str:
    """UTC, ISO 8601 with milliseconds: `2026-12-01T12:00:00.123Z` (now by default)."""
    moment = (
        datetime.datetime.now(tz=datetime.UTC)
        if seconds is None
        else datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def envelope(netns: str | None = None) -> dict[str, Any]:
    """The keys every schema-2 document starts with."""
    head: dict[str, Any] = {
        "schema": SCHEMA,
        "generated": utc_timestamp(),
        "host": socket.gethostname(),
        "ctfix": __version__,
    }
    if netns is not None:
        head["netns"] = netns
    return head


def document(obj: dict[str, Any], stream: TextIO) -> str:
    """One JSON document as text: indented on a terminal, compact on a pipe."""
    tty = hasattr(stream, "isatty") and stream.isatty()
    if tty:
        return json.dumps(obj, indent=2) + "\n"
    return json.dumps(obj, separators=(",", ":")) + "\n"


def write_document(obj: dict[str, Any], stream: TextIO) -> None:
    stream.write(document(obj, stream))
    stream.flush()


def line(obj: dict[str, Any]) -> str:
    """One JSON line (watch's records): always a single line, `, `/`: ` separators."""
    return json.dumps(obj)
