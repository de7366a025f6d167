"""Which program serves a port, as the knowledge base knows it, asked by watch's hot
loop only when a reply came from another port than the one its client addressed.

`OtherPortPrograms(kb)(port)` says whether the program on `port` answers from other
ports by design (TFTP's transfer ids): it lists the sockets on the port (sock_diag and
/proc, as explain does) and lets `ctfix.core.diagnosis.listeners.replies_from_other_port`
judge them. The answer is kept for `ttl` seconds per port: a TFTP server answers every
transfer from a new port, and looking the sockets up each time would cost milliseconds
per transfer.

Know before changing: called from inside the detector, on the finding path only
(never for a reply from the right port); it reads the calling thread's namespace, or
the one `inside` enters (ctfix.platform.netns.Inside: `watch --all-netns`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctfix.core.rules import KnowledgeBase
    from ctfix.platform.netns import Inside

#: Bound on the cache (one entry per server port that replied from another port).
_MAX_PORTS = 4096


class OtherPortPrograms:
    """A cached `port -> bool` for WrongSourceDetector(other_port=...).

    `kb`: the knowledge base, or a function that loads it, called the first time it is
    needed (watch's start-up stays as fast as it was: most watches never see a reply
    from another port).
    """

    def __init__(
        self,
        kb: KnowledgeBase | Callable[[], KnowledgeBase] | None,
        ttl: float = 30.0,
        inside: Inside | None = None,
    ) -> None:
        self._kb = kb
        self.ttl = ttl
        self.inside = inside
        self._cache: dict[int, tuple[bool, float]] = {}

    @property
    def kb(self) -> KnowledgeBase | None:
        if callable(self._kb):
            self._kb = self._kb()
        return self._kb

    def __call__(self, port: int) -> bool:
        now = time.monotonic()
        cached = self._cache.get(port)
        if cached is not None and now - cached[1] < self.ttl:
            return cached[0]
        answer = self._ask(port)
        if len(self._cache) >= _MAX_PORTS:
            self._cache.clear()
        self._cache[port] = (answer, now)
        return answer

    def _ask(self, port: int) -> bool:
        from ctfix.core.diagnosis.listeners import replies_from_other_port
        from ctfix.platform import sockdiag
        from ctfix.platform.netns import within

        kb = self.kb
        if kb is None:
            return False
        try:
            with within(self.inside):
                listeners = [listener for listener, _uid in sockdiag.listeners(port)]
        except OSError:
            listeners = []  # sock_diag refused: the port's own claims still count
        return replies_from_other_port(listeners, kb, port)
