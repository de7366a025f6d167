"""Where ctfix cannot see: families conntrack does not track here. Pure.

The kernel tracks a family in a namespace only once a loaded rule needs conntrack
(NAT, `ct state`): until then no request and no reply of the port can show in the
table, and a clean table proves nothing. The collector probes each family
(`Snapshot.tracking`); `--listen` switches tracking on for its duration
(`Snapshot.tracking_switched_on`).

Know before changing: blindness is a finding, never a verdict of `ok`. A family the
port serves through a wildcard socket, blind (and reachable: the namespace has a
global address of it), makes the verdict `unknown` unless the
prediction already says `at-risk` (or the evidence of the other family says
`broken`): only a socket bound to one address is right without evidence.
"""

from __future__ import annotations

from ctfix.core.diagnosis.codes import reason
from ctfix.core.diagnosis.listeners import Listening, wild_for
from ctfix.core.diagnosis.requests import usable_addresses
from ctfix.core.model import Family, Reason
from ctfix.core.snapshot import Snapshot

_FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
_WORDS = {"ipv4": "IPv4", "ipv6": "IPv6"}


def tracking_of(snapshot: Snapshot) -> dict[str, bool | None]:
    """Both families, as the collector found them (None: could not tell)."""
    return {family: snapshot.tracking.get(family) for family in _FAMILIES}


def blind_families(snapshot: Snapshot, listening: Listening) -> list[Family]:
    """The families that matter here that conntrack does not track: those the port
    serves (both when nothing is bound, since clients could use either) and that
    remote clients can reach at all (the namespace has a global address of the family:
    without one, no evidence is missing)."""
    wanted = [f for f in _FAMILIES if f in listening.serving] or list(_FAMILIES)
    return [
        f
        for f in wanted
        if snapshot.tracking.get(f) is False and usable_addresses(snapshot.addresses, f)
    ]


def judged_blind(snapshot: Snapshot, listening: Listening, blind: list[Family]) -> bool:
    """Whether the verdict would rest on evidence that cannot exist: a blind family
    (or an unreadable table) that a wildcard socket serves."""
    unseen = set(blind)
    if snapshot.conntrack_error:
        unseen.update(listening.serving)
    return any(
        wild_for(listener, family)
        for family in unseen
        for listener in listening.serving.get(family, ())
    )


#: Shell commands that switch conntrack on for both families in a namespace, whatever
#: its ruleset (even none: a table of their own, not an `inet filter` that may not
#: exist), and undo it. tests/netns/test_evidence_qa.py runs them in an empty one.
TRACKING_ON = (
    "nft add table inet conntrack_on; nft add chain inet conntrack_on pre "
    "'{ type filter hook prerouting priority 0; }'; nft add rule inet conntrack_on pre "
    "ct state new accept"
)
TRACKING_OFF = "nft delete table inet conntrack_on"


def blindness_reasons(snapshot: Snapshot, blind: list[Family]) -> list[Reason]:
    reasons: list[Reason] = []
    if blind:
        names = " and ".join(_WORDS[f] for f in blind)
        reasons.append(
            reason(
                "not-tracked",
                f"Conntrack does not track {names} in this namespace (no loaded rule needs "
                "it): no request and no reply can show in the table, so there is no "
                f"evidence either way, and a clean table proves nothing. To see: `ctfix "
                f"explain {snapshot.port} --listen 30` (switches tracking on while it "
                "listens) or `ctfix watch --track`; or, to keep it on, load a rule that "
                f"needs conntrack, which works on an empty ruleset too: `{TRACKING_ON}` "
                f"(and `{TRACKING_OFF}` to undo it).",
            )
        )
    if snapshot.tracking_switched_on:
        names = " and ".join(_WORDS.get(f, f) for f in snapshot.tracking_switched_on)
        reasons.append(
            reason(
                "tracking-switched-on",
                f"{names} {'were' if len(snapshot.tracking_switched_on) > 1 else 'was'} not "
                "tracked in this namespace: --listen switched tracking on for its "
                f"{snapshot.listened_seconds:g} s (a temporary nftables table, removed "
                "again), so the evidence covers those seconds only.",
            )
        )
    return reasons
