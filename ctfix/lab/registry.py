"""The lab's scenarios by name: `ctfix lab --scenario NAME`.

Light on purpose (`ctfix --help` and `ctfix lab --help` read it): each entry names
the module that tells the story, imported only when that scenario runs. Each such
module has `run_story(topology, port, report, *, timeout) -> Story`: it builds what
the scenario adds to the lab's topology (rules, servers), reports each section and
check as it goes (data: ctfix.lab.checks), and returns the story, whose verdict
(failure reproduced AND fix confirmed) is the lab's exit status; ctfix.render.lab
puts it in words. Add a scenario: one module under ctfix/lab/, one line here, and
its words in ctfix/render/lab.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctfix.lab.checks import Check, Section, Story
    from ctfix.lab.topology import Topology

    Report = Callable[[Section | Check], None]
    RunStory = Callable[..., Story]

#: name -> (module with run_story, one line for --help)
SCENARIOS: dict[str, tuple[str, str]] = {
    "wrong-source": (
        "ctfix.lab.scenario",
        "a wildcard server answers a container from the bridge address, then the "
        "IP_PKTINFO fix",
    ),
    "clusterip": (
        "ctfix.lab.clusterip",
        "Kubernetes: a ClusterIP DNAT'd to a hostNetwork server on the node; the pods get "
        "nothing until ctfix fix --method snat-zone, then the revert",
    ),
    "stale-nat": (
        "ctfix.lab.stale_nat",
        "a one-way sender pinned by conntrack to a DNAT backend that moved: the black "
        "hole, ctfix's finding, the exact flush (flush-stale), the recovery (IPv4 only)",
    ),
}
DEFAULT = "wrong-source"
#: scenarios told over IPv4 only: `--ipv6` is refused before anything is built
IPV4_ONLY = frozenset({"stale-nat"})


def run(name: str, topo: Topology, port: int, report: Report, timeout: float) -> Story:
    """Tell the scenario's story on the built topology."""
    module_name, _summary = SCENARIOS[name]
    run_story: RunStory = importlib.import_module(module_name).run_story
    return run_story(topo, port, report, timeout=timeout)
