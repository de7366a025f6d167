"""The conntrack zones that are ctfix's own: where the snat-zone remedy puts the replies
it rewrites. Pure.

Know before changing: an entry in one of these zones is the remedy's work, never the
server's: a reply rewritten there left from the right source because of ctfix, so it
proves nothing about the server (it may linger up to nf_conntrack_udp_timeout after a
revert), and the request it answered was answered (through the fix). The snat-zone
plan numbers its zones from CT_ZONE, one per target address (ctfix.core.plan.snat_zone).
"""

from __future__ import annotations

#: the first zone of the snat-zone remedy; the n-th target address uses CT_ZONE + n
CT_ZONE = 51185
#: how many zones from CT_ZONE on are taken for ctfix's (far more targets than a plan has)
FIX_ZONES = 256


def is_fix_zone(zone: int) -> bool:
    """Whether a conntrack zone is one the snat-zone remedy uses."""
    return CT_ZONE <= zone < CT_ZONE + FIX_ZONES
