"""`ctfix fix PORT --method flush-stale --apply`: delete the stale entries, report.

Not a command of its own: `ctfix fix` hands over a plan that is not reversible
(`Plan.reversible` False) here, because such a plan is applied without the state file
(nothing to record, nothing to revert) and reports what it deleted and where the
clients' next entries went (ctfix.platform.remedy.conntrack).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ctfix.errors import ExitStatus


def apply_unrecorded(args: argparse.Namespace, plan: Any, label: str) -> int:
    from ctfix.core.plan import plan_to_dict
    from ctfix.platform.remedy import conntrack as flush

    done = flush.flush(plan)
    notes = [n for n in plan.notes if n.startswith("Nothing to revert")]
    status = ExitStatus.PROBLEM if done.problems else ExitStatus.OK
    if args.json:
        print(json.dumps({
            "netns": label,
            "applied": True,
            "recorded": False,
            "deleted": done.deleted,
            "already_gone": done.gone,
            "checks": list(done.checks),
            "problems": list(done.problems),
            "notes": notes,
            "plan": plan_to_dict(plan),
        }, indent=2))
        return status
    entries = f"{done.deleted} stale conntrack entr{'ies' if done.deleted != 1 else 'y'}"
    gone = f" ({done.gone} already gone: expired, or taken by a newer flow)" if done.gone else ""
    print(f"ctfix fix {plan.port}: deleted {entries} in netns {label}{gone}")
    for line in done.checks:
        print(f"  checked: {line}")
    for line in done.problems:
        print(f"  PROBLEM: {line}")
    for note in notes:
        print(f"  note: {note}")
    return status
