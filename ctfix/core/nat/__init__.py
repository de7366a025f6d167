"""A pure model of a namespace's DNAT rules: where a NEW flow would be sent now.

`model` holds the values (chains, rules, matches, targets), `evaluate` answers for
one flow, `paths` lists each DNAT with the path that leads to it; `nft_json` and
`legacy` build the chains from the rules as ctfix.platform.netfilter_read reads them.
"""

from ctfix.core.nat.evaluate import MAX_DEPTH, MAX_STEPS, Evaluator, Outcome, Tri
from ctfix.core.nat.model import (
    Action,
    Elem,
    Field,
    Flow,
    Key,
    Match,
    Nat,
    NatChain,
    NatMap,
    NatRule,
    NatRuleset,
    Opaque,
    Target,
    Verdict,
    VerdictKind,
    VerdictMap,
    address_int,
    address_interval,
    network_interval,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_STEPS",
    "Action",
    "Elem",
    "Evaluator",
    "Field",
    "Flow",
    "Key",
    "Match",
    "Nat",
    "NatChain",
    "NatMap",
    "NatRule",
    "NatRuleset",
    "Opaque",
    "Outcome",
    "Target",
    "Tri",
    "Verdict",
    "VerdictKind",
    "VerdictMap",
    "address_int",
    "address_interval",
    "network_interval",
]
