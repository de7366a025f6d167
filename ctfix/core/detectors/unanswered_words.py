"""An unanswered finding in words, the same in watch, explain and scan. Pure.

Know before changing: engineers compare watch's lines with explain's reasons, so both
come from `unanswered_text`. Tests branch on reasons and keys, never on these words.
"""

from __future__ import annotations

from ctfix.core.detectors.unanswered import UnansweredFinding, UnansweredReason

_WHY: dict[UnansweredReason, str] = {
    "no-socket": "nothing was bound to {where}",
    "no-reply": "{holder} receives them on {where} and no reply reached conntrack (the "
    "application did not answer, or a rule dropped or untracked its replies)",
    # Observed: the reply's source; not observed: what the client did with it (a
    # connect()ed client drops it, an unconnected one may take it).
    "wrong-source": "the server answered from another source address, which a "
    "connect()ed client drops (see the wrong-source findings)",
    # What ctfix knows is the rules, not whether the old backend (often on another
    # host) still serves, nor whether these clients expect a reply (syslog does not).
    "stale-nat": "a stale DNAT entry sent them to {where}, which the rules no longer name",
}


def unanswered_text(finding: UnansweredFinding) -> str:
    """One finding in words, the same in watch and explain.

    `12 requests from 3 client hosts to 198.51.100.13:5353 got no reply: nothing was bound
    to 198.51.100.13:5353 (the host's ICMP port unreachable was seen)`.
    """
    flows = f"{finding.flows} request{'s' if finding.flows != 1 else ''}"
    # Client hosts (addresses), where a wrong-source record counts client ports.
    clients = f"{finding.clients} client host{'s' if finding.clients != 1 else ''}"
    head = f"{flows} from {clients} to {finding.service}"
    where = finding.target or finding.service
    if finding.target:
        head += f" (DNAT to {finding.target})"
    if finding.one_way:
        who = finding.program or "its program"
        return (
            f"{head} got no reply, as expected: {who} is a one-way service (knowledge "
            "base) and never answers"
        )
    holder = f"a socket of {finding.program}" if finding.program else "a socket"
    why = _WHY[finding.reason].format(where=where, holder=holder)
    # Stale NAT: the requests went astray, answered or not (one-way traffic never is).
    got = {"stale-nat": "", "wrong-source": " got no reply from the address they sent to"}.get(
        finding.reason, " got no reply"
    )
    text = f"{head}{got}: {why}"
    if finding.reason == "no-reply" and finding.target and finding.program is None:
        text = f"{head} got no reply: {where} never answered"
    if finding.confirmed:
        text += " (the host's ICMP port unreachable was seen)"
    if finding.rules:
        text += "; rules that can drop or untrack the replies: " + "; ".join(finding.rules)
    return text
