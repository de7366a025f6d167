"""`ctfix explain --json`: the diagnosis as a document with stable keys (also the
records render/fix.py, render/scan.py and render/scan_all.py reuse).

Know before changing: the JSON keys are a contract (issue: port, netns, verdict,
reasons[], listeners[], clients[], evidence, rules[], fixes[]; docs/json.md); add keys,
never rename or remove one. Text and markdown are in render/explain.py.
"""

from __future__ import annotations

from typing import Any

from ctfix.core.diagnosis import recommended_first
from ctfix.core.model import Diagnosis, FixEffect, ForwardedService, WrongSourceReply
from ctfix.render.container import container_json
from ctfix.render.jsonout import envelope
from ctfix.render.stale_nat import stale_nat_record


def to_json_obj(d: Diagnosis) -> dict[str, Any]:
    """The stable JSON shape of a diagnosis: explain's document after the envelope,
    and each of scan's `services[]`."""
    return {
        "port": d.port,
        "netns": d.netns,
        "netns_container": container_json(d.netns_container),
        "verdict": d.verdict,
        "reasons": [{"code": r.code, "text": r.text} for r in d.reasons],
        "service": d.service,
        "listeners": [
            {
                "pid": lst.pid,
                "process": lst.process,
                "address": lst.address,
                "port": lst.port,
                "family": lst.family,
                "state": lst.state,
                "wildcard": lst.wildcard,
                "v6only": lst.v6only,
                "peer": lst.peer,
                "cmdline": list(lst.cmdline),
                "unit": lst.unit,
                "exe": lst.exe,
                "processes": [{"pid": pid, "process": comm} for pid, comm in lst.processes],
                "container": container_json(lst.container),
            }
            for lst in d.listeners
        ],
        "clients": [
            {
                "network": cn.network,
                "addressed": list(cn.addressed),
                "predicted_source": cn.predicted_source,
                "ok": cn.ok,
                "interface": cn.interface,
                "seen": cn.seen,
                "onlink": list(cn.onlink),
                "answered": list(cn.answered),
                "wrong_for": list(cn.wrong_for),
                "probe": cn.probe,
                "egress": cn.egress,
                "egress_gateway": cn.egress_gateway,
                "uplinks": [
                    {
                        "address": u.address,
                        "interface": u.interface,
                        "network": u.network,
                        "gateway": u.gateway,
                        "route": u.route,
                        "routed": u.routed,
                        "rerouted": u.rerouted,
                        "source_routed": u.source_routed,
                        "ok": u.ok,
                    }
                    for u in cn.uplinks
                ],
                "services": list(cn.services),
            }
            for cn in d.clients
        ],
        "evidence": {
            "wrong_source": [wrong_json(w) for w in d.evidence.wrong_source],
            "healthy": d.evidence.healthy,
            "through_fix": d.evidence.through_fix,
            "unanswered": d.evidence.unanswered,
        },
        "rules": [
            {
                "backend": r.backend,
                "table": r.table,
                "chain": r.chain,
                "rule": r.rule,
                "problem": r.problem,
            }
            for r in d.rules
        ],
        "fixes": [
            {
                "method": f.method,
                "summary": f.summary,
                "detail": f.detail,
                "recommended": f.recommended,
            }
            for f in recommended_first(d.fixes)
        ],
        "local_addresses": list(d.local_addresses),
        "service_down": d.service_down,
        "forwarded_to": list(d.forwarded_to),
        "stale_nat": [stale_nat_record(f) for f in d.stale_nat],
        "tracking": {family: d.tracking.get(family) for family in ("ipv4", "ipv6")},
        "tracking_switched_on": list(d.tracking_switched_on),
        "blind": list(d.blind),
        "forwarded_from": [forwarded_json(f) for f in d.forwarded_from],
        "fix_effect": effect_json(d.fix_effect),
        "unanswered": [
            {
                "service": u.service,
                "reason": u.reason,
                "flows": u.flows,
                "clients": u.clients,
                "one_way": u.one_way,
                "target": u.target,
                "program": u.program,
                "rules": list(u.rules),
            }
            for u in d.unanswered
        ],
    }



def wrong_json(w: WrongSourceReply) -> dict[str, Any]:
    return {
        "client": w.client,
        "service": w.service,
        "expected_source": w.expected_source,
        "actual_source": w.actual_source,
        "mismatch": w.mismatch,
        "count": w.count,
        "clients": w.clients,
        "client_network": w.client_network,
        "replies_from_other_port": w.replies_from_other_port,
        "container": container_json(w.container),
        "first_seen": w.first_seen,
        "last_seen": w.last_seen,
    }



def forwarded_json(f: ForwardedService) -> dict[str, Any]:
    return {
        "service": f.service,
        "address": f.address,
        "port": f.port,
        "target": f.target,
        "hooks": list(f.hooks),
        "rules": list(f.rules),
        "seen": f.seen,
        "exact": f.exact,
    }



def effect_json(e: FixEffect | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {
        "method": e.method,
        "applied_at": e.applied_at,
        "covers": list(e.covers),
        "verdict": e.verdict,
        "since_fix": [wrong_json(w) for w in e.since_fix],
        "ineffective_for": list(e.ineffective_for),
        "uncovered": [forwarded_json(f) for f in e.uncovered],
        "evidence": list(e.evidence),
        "window": e.window,
        "whole_time": e.whole_time,
    }



def explain_document(d: Diagnosis) -> dict[str, Any]:
    """`ctfix explain --json`: the schema-2 envelope, then the diagnosis."""
    return {**envelope(d.netns), **to_json_obj(d)}

