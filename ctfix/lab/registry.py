"""The lab's scenarios by name: `ctfix lab --scenario NAME`.

Light on purpose (`ctfix --help` and `ctfix lab --help` read it): each entry names
the module that defines `SCENARIO` (a `ctfix.lab.scenario.Scenario`), imported only
when that scenario runs. Add a scenario: one module under ctfix/lab/, one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctfix.lab.scenario import Scenario

#: name -> (module that defines SCENARIO, one line for --help)
SCENARIOS: dict[str, tuple[str, str]] = {
    "wrong-source": (
        "ctfix.lab.wrong_source",
        "a wildcard server answers a container from the bridge address, then the "
        "IP_PKTINFO fix",
    ),
    "clusterip": (
        "ctfix.lab.clusterip",
        "Kubernetes: a ClusterIP DNAT'd to a hostNetwork server on the node; the pods get "
        "nothing until ctfix fix --method snat-zone, then the revert",
    ),
}
DEFAULT = "wrong-source"


def load(name: str) -> Scenario:
    module_name, _summary = SCENARIOS[name]
    scenario: Scenario = importlib.import_module(module_name).SCENARIO
    return scenario
