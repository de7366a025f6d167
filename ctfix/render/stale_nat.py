"""A stale-nat finding as JSON (the same keys in watch's lines and explain's document).

Know before changing: the keys are a contract (docs/json.md): kind, family, proto,
service, stale_target, current_targets, clients, entries, why, pinned[], rules[];
watch adds netns, first_seen, last_seen, existing. Add keys, never rename one.
"""

from __future__ import annotations

from typing import Any

from ctfix.core.detectors.stale_nat import StaleNatFinding

WHY_STALE = (
    "Conntrack decides where a UDP flow goes when its first datagram arrives, and keeps "
    "that decision for as long as datagrams keep coming (the entry's timeout restarts "
    "with each one). A client that sends from a fixed port (syslog, SNMP traps, statsd, "
    "SIP, NTP) keeps its entry for ever: when the DNAT rule moves to a new backend, "
    "its datagrams still go to the old one, or into a black hole."
)


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def stale_nat_record(finding: StaleNatFinding) -> dict[str, Any]:
    """The finding's own keys (no netns, no times)."""
    return {
        "kind": "stale-nat",
        "family": finding.family,
        "proto": finding.proto,
        "service": finding.service,
        "stale_target": finding.stale_target,
        "current_targets": list(finding.current_targets),
        "clients": finding.clients,
        "entries": finding.entries,
        "why": finding.why,
        "pinned": [
            {
                "client": p.client,
                "age": _seconds(p.age),
                "idle": _seconds(p.idle),
                "packets": p.packets,
            }
            for p in finding.pinned
        ],
        "rules": list(finding.rules),
        "arrival": finding.arrival,
    }
