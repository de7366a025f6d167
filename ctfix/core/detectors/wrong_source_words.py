"""A wrong-source finding in words, the same in watch, explain and scan. Pure.

Know before changing: engineers compare watch's lines with explain's evidence, so
both come from `wrong_source_text`, and it takes anything shaped like a finding
(`WrongSourceRecord`): the detector's finding and explain's evidence record alike.
"""

from __future__ import annotations

from typing import Protocol

from ctfix.core.model import Mismatch


def _plural(count: int, word: str, words: str) -> str:
    return f"{count} {word if count == 1 else words}"


def replies_text(count: int, clients: int, network: str | None, latest: str) -> str:
    """ "1 reply to C", "3 replies to C", "2 replies to 2 client ports in NET, latest C".

    `clients` counts client ports (address:port as the server saw them), where an
    unanswered record counts client hosts: the words say which."""
    replies = _plural(count, "reply", "replies")
    if clients <= 1 or count <= 1:
        return f"{replies} to {latest}"
    where = f" in {network}" if network else ""
    return f"{replies} to {clients} client ports{where}, latest {latest}"


class WrongSourceRecord(Protocol):
    """What a wrong-source finding and explain's evidence record both say."""

    @property
    def service(self) -> str: ...
    @property
    def expected_source(self) -> str: ...
    @property
    def actual_source(self) -> str: ...
    @property
    def mismatch(self) -> Mismatch: ...
    @property
    def count(self) -> int: ...
    @property
    def clients(self) -> int: ...
    @property
    def client_network(self) -> str | None: ...
    @property
    def client(self) -> str: ...
    @property
    def replies_from_other_port(self) -> bool: ...


def wrong_source_text(
    record: WrongSourceRecord, *, tags: tuple[str, ...] = (), actual_source: str | None = None
) -> str:
    """One wrong-source finding in words, the same in watch and explain.

    `198.51.100.13:53 answered from 192.0.2.1:53 (address mismatch, local): 2 replies
    to 2 client ports in 192.0.2.0/24, latest 192.0.2.3:40000`; "instead of E" is added when
    the expected source is not the service (DNAT). `actual_source`: the record's, as
    the caller wants it shown (watch colours it). A program that answers from other
    ports by design (TFTP) says so: its actual source is an address alone.
    """
    if record.replies_from_other_port:
        tags = ("its port changes by design", *tags)
    service, expected = record.service, record.expected_source
    instead = f" instead of {expected}" if expected != service else ""
    what = " and ".join(record.mismatch.split("+")) + " mismatch"
    shown = actual_source or record.actual_source
    return (
        f"{service} answered from {shown}{instead} ({', '.join((what, *tags))}): "
        f"{replies_text(record.count, record.clients, record.client_network, record.client)}"
    )
