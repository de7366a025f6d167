"""watch's unanswered part: the detector with what it asks of the system, and the
ICMP port unreachable messages the namespace sends, while they are worth reading.

Not a command: `ctfix watch` builds one `UnansweredWatch`, gives `detector` to its
composed feeds, and calls `found` for each of its findings, `readable` when the
ICMP tap has packets, `addresses` when the namespace's addresses change, and `tick`
about once a second.

Know before changing: the tap (`ctfix.platform.icmp.SentUnreachable`) makes the kernel
clone every packet the namespace transmits (measured: +13% CPU per datagram sent,
bench/unanswered_bench.py), so it opens only when a flow was found with nothing bound
(the case it confirms) and closes again after TAP_IDLE seconds without one; a host
where everything answers never pays for it.
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctfix.core.detectors.stale_nat import StaleNatDetector
    from ctfix.core.detectors.unanswered import UnansweredDetector, UnansweredFinding
    from ctfix.core.detectors.wrong_source import WrongSourceDetector
    from ctfix.core.rules import KnowledgeBase
    from ctfix.platform.icmp import SentUnreachable
    from ctfix.platform.netns import Inside

#: seconds without a no-socket flow after which the ICMP tap is closed
TAP_IDLE = 300.0


class UnansweredWatch:
    def __init__(
        self,
        wrong: WrongSourceDetector,
        stale: StaleNatDetector,
        kb: KnowledgeBase | Callable[[], KnowledgeBase] | None,
        selector: selectors.BaseSelector,
        warn: Callable[[str], None],
        caps: Mapping[str, int] | None = None,
        inside: Inside | None = None,
    ) -> None:
        """`caps`: the detector's limits (max_findings, max_clients, max_remembered)
        where not its defaults; `inside`: enters the namespace to read it, for a
        caller that lives elsewhere (ctfix.platform.netns.Inside)."""
        from ctfix.core.detectors.unanswered import StaleFindings, UnansweredDetector
        from ctfix.platform.udp_view import RulesView, SocketView

        self.inside = inside
        self.sockets = SocketView(inside=inside)
        self.detector: UnansweredDetector = UnansweredDetector(
            sockets=self.sockets,
            wrong=wrong,
            # What stale-nat judged (at start-up, after a resync, after a rule change):
            # a request whose entry was one of its stale (service, target) is stale-nat.
            stale=StaleFindings(stale.findings),
            firewall=RulesView(inside=inside),
            kb=kb,
            local_addresses=wrong.local_addresses,
            udp_timeout=wrong.udp_timeout,
            remember=True,
            **(caps or {}),
        )
        self.selector = selector
        self.warn = warn
        self.tap: SentUnreachable | None = None
        self._tap_refused = False  # no CAP_NET_RAW: said once, not tried again
        self._last_no_socket = 0.0
        self._warned = False

    def found(self, finding: UnansweredFinding) -> None:
        """A finding was made or counted: keep the tap open for the no-socket kind."""
        if self.sockets.error and not self._warned:
            self._warned = True
            self.warn(
                f"cannot list UDP sockets ({self.sockets.error}): unanswered flows "
                "may be classified no-socket wrongly"
            )
        if finding.reason != "no-socket" or self._tap_refused:
            return
        self._last_no_socket = time.monotonic()
        if self.tap is None:
            from ctfix.platform.icmp import SentUnreachable
            from ctfix.platform.netns import within

            try:
                with within(self.inside):
                    self.tap = SentUnreachable()
            except OSError as err:  # `confirmed` stays false
                self._tap_refused = True
                self.warn(f"cannot read the ICMP this namespace sends: {err.strerror}")
                return
            self.selector.register(self.tap.sock, selectors.EVENT_READ, "sent")

    def readable(self, now: float) -> None:
        if self.tap is None:
            return
        for rejected in self.tap.read():
            self.detector.icmp_sent(rejected.src, rejected.sport, rejected.dst, rejected.dport, now)

    def tick(self, mono: float) -> None:
        """Close the tap after TAP_IDLE seconds without a no-socket flow."""
        if self.tap is not None and mono - self._last_no_socket >= TAP_IDLE:
            self.selector.unregister(self.tap.sock)
            self.close()

    def addresses(self, local: frozenset[str]) -> None:
        self.detector.local_addresses = local

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()
            self.tap = None
