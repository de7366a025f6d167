"""watch's unanswered part: the detector with what it asks of the system, and the
ICMP port unreachable messages the namespace sends, once they are worth reading.

Not a command: `ctfix watch` builds one `UnansweredWatch`, gives `detector` to its
composed feeds, and calls `found` for each of its findings, `readable` when the
ICMP tap has packets, `addresses` when the namespace's addresses change.

Know before changing: the tap (`ctfix.platform.icmp.SentUnreachable`) makes the kernel
clone every packet the namespace transmits, so it opens only when a flow was found
with nothing bound (the case it confirms), and stays open from then on; a host where
everything answers never pays for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ctfix.core.detectors.unanswered import UnansweredDetector, UnansweredFinding
    from ctfix.core.detectors.wrong_source import WrongSourceDetector
    from ctfix.core.rules import KnowledgeBase
    from ctfix.platform.icmp import SentUnreachable


class UnansweredWatch:
    def __init__(
        self,
        wrong: WrongSourceDetector,
        kb: KnowledgeBase | None,
        register: Callable[[Any, str], object],
        warn: Callable[[str], None],
    ) -> None:
        from ctfix.core.detectors.unanswered import UnansweredDetector
        from ctfix.platform.udp_view import RulesView, SocketView

        self.sockets = SocketView()
        self.detector: UnansweredDetector = UnansweredDetector(
            sockets=self.sockets,
            wrong=wrong,
            firewall=RulesView(),
            kb=kb,
            local_addresses=wrong.local_addresses,
            udp_timeout=wrong.udp_timeout,
            remember=True,
        )
        self.register = register
        self.warn = warn
        self.tap: SentUnreachable | None = None
        self._tap_tried = False
        self._warned = False

    def found(self, finding: UnansweredFinding) -> None:
        """A finding was made or counted: open the tap for the no-socket kind."""
        if self.sockets.error and not self._warned:
            self._warned = True
            self.warn(
                f"cannot list UDP sockets ({self.sockets.error}): unanswered flows "
                "may be classified no-socket wrongly"
            )
        if not self._tap_tried and finding.reason == "no-socket":
            from ctfix.platform.icmp import SentUnreachable

            self._tap_tried = True
            try:
                self.tap = SentUnreachable()
            except OSError as err:  # no CAP_NET_RAW: `confirmed` stays false
                self.warn(f"cannot read the ICMP this namespace sends: {err.strerror}")
                return
            self.register(self.tap, "sent")

    def readable(self, now: float) -> None:
        if self.tap is None:
            return
        for rejected in self.tap.read():
            self.detector.icmp_sent(rejected.src, rejected.sport, rejected.dst, rejected.dport, now)

    def addresses(self, local: frozenset[str]) -> None:
        self.detector.local_addresses = local

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()
