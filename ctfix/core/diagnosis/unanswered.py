"""Requests to the port that got no reply, per service and reason: the unanswered
detector run over what explain observed. Pure.

Know before changing: the same detector as watch's (ctfix.core.detectors.unanswered),
so explain, scan and watch classify alike: over the port's unreplied entries in the
table (all of them, as the evidence's "requests without any reply" counts them: two
commands on one table agree, whenever they run) and the entries that ended without a
reply while `--listen` watched. Its sockets are the port's listeners; the
wrong-source detector it asks has paired the same table's requests and replies, and
the stale NAT findings it asks are the port's own (ctfix.core.diagnosis.stale). No
ICMP is read here. Requests a DNAT forwards to another port on this host are that
port's (`ctfix explain TARGET`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ctfix.core.addr import unmap
from ctfix.core.decode import DESTROY, CtEvent
from ctfix.core.detectors import UDP_TIMEOUT
from ctfix.core.detectors.stale_nat import StaleNatFinding
from ctfix.core.detectors.unanswered import (
    ListenerSockets,
    RulesFirewall,
    StaleFindings,
    UnansweredDetector,
    UnansweredFinding,
)
from ctfix.core.detectors.unanswered_words import unanswered_text
from ctfix.core.detectors.wrong_source import WrongSourceDetector
from ctfix.core.diagnosis.codes import ReasonCode, reason
from ctfix.core.diagnosis.requests import UDP, client_networks_of, newest_last
from ctfix.core.model import Reason, UnansweredService
from ctfix.core.snapshot import Snapshot

if TYPE_CHECKING:
    from ctfix.core.rules import KnowledgeBase

_CODES: dict[str, ReasonCode] = {
    "no-socket": "unanswered-no-socket",
    "no-reply": "unanswered-no-reply",
    "wrong-source": "unanswered-wrong-source",
    "stale-nat": "unanswered-stale-nat",
}


def findings(
    snapshot: Snapshot,
    kb: KnowledgeBase | None,
    local: set[str],
    stale: Sequence[StaleNatFinding] = (),
    other_port: Callable[[int], bool] | None = None,
) -> list[UnansweredFinding]:
    """The unanswered detector's findings for the port, most flows first; `stale`:
    the port's stale NAT findings (ctfix.core.diagnosis.stale); `other_port`: whether
    the program on a server port answers from other ports by design (TFTP), as the
    evidence and watch ask it: its request's own entry stays unreplied while a reply
    from the addressed address and a new port answered it.

    The wrong-source detector asked sees every entry: the table's, and every unreplied
    one that ended during --listen, the replies too (a reply the snat-zone remedy
    rewrote in ctfix's zone may end before the request it answered)."""
    port = snapshot.port
    addresses = frozenset(local)

    def ours(entry_port: int, target_port: int, target: str) -> bool:
        # Sent to the port, or DNAT'd to it; not DNAT'd on to another local port.
        if entry_port != port and target_port != port:
            return False
        return target_port == port or unmap(target) not in addresses

    ended = [
        e for e in snapshot.ended_unreplied
        if e.orig.proto == UDP and ours(e.orig.dport, e.reply.sport, e.reply.src)
    ]
    flows = [
        e for e in snapshot.flows
        if e.orig.proto == UDP and ours(e.orig.dport, e.reply.sport, e.reply.src)
    ]
    wrong = WrongSourceDetector(
        local_addresses=addresses,
        networks=client_networks_of(snapshot.addresses),
        other_port=other_port,
    )
    wrong.examine(newest_last([*snapshot.ended_unreplied, *snapshot.flows]), now=0.0)
    detector = UnansweredDetector(
        sockets=ListenerSockets(snapshot.listeners),
        wrong=wrong,
        firewall=RulesFirewall(snapshot.netfilter),
        stale=StaleFindings({finding.key: finding for finding in stale}),
        kb=kb,
        local_addresses=addresses,
        udp_timeout=snapshot.udp_timeout or UDP_TIMEOUT,
    )
    # One account per (service, reason): the table's requests and those that ended
    # during --listen alike (watch's history/news split means nothing here).
    detector.dumps_are_history = False
    for entry in ended:
        detector.feed(CtEvent(DESTROY, entry), 0.0)
    detector.examine(flows, 0.0)
    return sorted(detector.found, key=lambda f: (f.one_way, -f.flows, f.service, f.reason))


def service_record(finding: UnansweredFinding) -> UnansweredService:
    return UnansweredService(
        service=finding.service,
        reason=finding.reason,
        flows=finding.flows,
        clients=finding.clients,
        one_way=finding.one_way,
        target=finding.target,
        program=finding.program,
        rules=finding.rules,
    )


def unanswered_reasons(found: list[UnansweredFinding], listened: float) -> list[Reason]:
    """One reason per finding: `unanswered-<reason>`, or `unanswered-one-way`."""
    when = f" (in the table, or ended during {listened:g} s of --listen)" if listened else ""
    reasons = []
    for finding in found:
        code: ReasonCode = "unanswered-one-way" if finding.one_way else _CODES[finding.reason]
        reasons.append(reason(code, f"Unanswered{when}: {unanswered_text(finding)}."))
    return reasons
