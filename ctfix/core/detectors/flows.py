"""Which conntrack entries are requests to this namespace: the one rule the detectors
share (wrong-source pairs replies with them, unanswered counts those that ended
without a reply). Pure.

Know before changing: it runs for every NEW event in watch's hot loop (through the
wrong-source detector): keep it a handful of comparisons.
"""

from __future__ import annotations

from ctfix.core.decode import CtEntry


def is_request(entry: CtEntry, local: frozenset[str]) -> bool:
    """A remote client's flow to this namespace or to a service DNAT'd behind it.

    Not a request: the namespace's own flows (its clients, its servers' replies, the
    snat-zone remedy's zoned replies), flows forwarded through it that nothing here
    NATs, directed broadcasts. Without local addresses every flow is taken for one
    (the pure rule, for tests and callers that cannot list them).
    """
    if not local:
        return True
    orig = entry.orig
    if orig.src in local:
        return False
    if orig.dst in local:
        return True
    reply = entry.reply
    return reply.src != orig.dst or reply.sport != orig.dport
