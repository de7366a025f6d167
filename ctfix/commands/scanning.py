"""What scan and check share: the services of the current namespace judged as `ctfix
scan` judges them, or every namespace of the host's in turn (`--all-netns`). Not a
command: scan and check compose it.

Know before changing: each namespace is entered on this thread and left before the
next (ctfix.platform.namespaces.entered); one that vanishes meanwhile is a note, not an
error, and its neighbours are still scanned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctfix.errors import CtfixError

if TYPE_CHECKING:
    from ctfix.core.netns_scan import NamespaceScan
    from ctfix.core.rules import KnowledgeBase
    from ctfix.platform.namespaces import NamespaceRef


def scan_namespaces(
    kb: KnowledgeBase, *, health: bool = False, unbound: bool = False
) -> list[NamespaceScan]:
    """Every namespace of the host, each entered in turn on this thread and scanned as
    `ctfix scan` scans one (and its conntrack health read, for check; its requests to
    ports with nothing bound counted, for scan); in ctfix.platform.namespaces.ordered()
    order."""
    from ctfix.platform import namespaces

    return [
        scan_namespace(ref, kb, health=health, unbound=unbound)
        for ref in namespaces.ordered(namespaces.snapshot())
    ]


def scan_namespace(
    ref: NamespaceRef, kb: KnowledgeBase, *, health: bool, unbound: bool = False
) -> NamespaceScan:
    """One namespace, entered on this thread: its services judged, worst first; gone
    or unreadable, a note."""
    import dataclasses

    from ctfix.core.netns_scan import NamespaceScan
    from ctfix.platform import namespaces

    found = NamespaceScan(ref.label, ref.spec, ref.kind, ref.id, ref.container)
    try:
        with namespaces.entered(ref):
            return scan_here(found, kb, health=health, unbound=unbound)
    except namespaces.NamespaceGone:
        return dataclasses.replace(found, skipped="gone during the scan", gone=True)
    except CtfixError as err:
        if namespaces.gone(ref):  # it went while we read it: gone, not unknown
            return dataclasses.replace(found, skipped="gone during the scan", gone=True)
        return dataclasses.replace(found, skipped=err.one_line())


def scan_here(
    found: NamespaceScan, kb: KnowledgeBase, *, health: bool, unbound: bool = False
) -> NamespaceScan:
    """`found` with the current namespace's services judged (and its conntrack health
    read: a failure there is a note, the services still count; and its requests to
    ports with nothing bound counted, ctfix.core.unbound)."""
    import dataclasses

    from ctfix.core.diagnosis import diagnose
    from ctfix.core.health import Health, assess
    from ctfix.core.scan import worst_first
    from ctfix.core.unbound import UnboundTally
    from ctfix.platform import ctstats, snapshot

    tally = UnboundTally() if unbound else None
    snapshots = snapshot.collect_services(found.netns, unbound=tally)
    reading: Health | None = None
    health_error: str | None = None
    if health:
        try:
            reading = assess(ctstats.sample())
        except CtfixError as err:
            health_error = err.one_line()
    diagnoses = [
        dataclasses.replace(diagnose(snap, kb), netns_container=found.container)
        for snap in snapshots
    ]
    return dataclasses.replace(
        found,
        diagnoses=tuple(worst_first(diagnoses)),
        health=reading,
        health_error=health_error,
        unbound=tally.summary(kb) if tally is not None else None,
    )
