"""When and where a report was made: the UTC time, the host name and ctfix's version,
for the reports people paste into incident documents (markdown) and read later (text).

Know before changing: the values are the JSON envelope's own (`generated`, `host`,
`ctfix` in ctfix.render.jsonout), so a markdown report and a JSON document made
together say the same thing about themselves.
"""

from __future__ import annotations

import socket

from ctfix import __version__
from ctfix.render.jsonout import utc_timestamp


def stamp_text(seconds: float | None = None) -> str:
    """`2026-12-01T12:00:00.123Z (UTC) on node1, ctfix 0.2.0`"""
    return f"{utc_timestamp(seconds)} (UTC) on {socket.gethostname()}, ctfix {__version__}"


def markdown_document(body: str, seconds: float | None = None) -> str:
    """A markdown report: the stamp in its first line, then the body."""
    return f"_{stamp_text(seconds)}_\n\n{body}"
