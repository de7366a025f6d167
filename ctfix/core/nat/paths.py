"""Each DNAT a UDP request may meet, with what the whole path to it matches: the NAT
model read as a list of forwarded services (explain's `forwarded_from`, snat-zone's
clients behind a DNAT, issue 15). Pure.

The model's chains are walked from each nat base chain at prerouting and output,
through `jump`, `goto` and verdict maps: kube-proxy matches the ClusterIP and port in
KUBE-SERVICES and DNATs in KUBE-SEP-*, two jumps further down (its nftables mode: a
verdict map keyed by address and port); a DNAT map's entries are DNATs of their own.

Know before changing: only what is understood narrows a path. A destination match
that is negated, a range that is no network, or a set whose contents are unknown
leaves the destination unknown (the DNAT is still listed: its clients can be
remembered once conntrack shows them); a path whose protocol match excludes UDP, or
whose matches contradict each other, is not a UDP path and is left out; a DNAT to
more than one address or port (a range, `redirect`) names no one target and is left
out. Where a request *may* go is the evaluator's question (ctfix.core.nat.evaluate),
not this module's.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ctfix.core.nat.model import (
    Elem,
    Field,
    Key,
    Match,
    Nat,
    NatChain,
    NatMap,
    NatRuleset,
    Target,
    Verdict,
    VerdictMap,
    int_address,
)

UDP = 17
#: kube-proxy's deepest path is hook -> KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP; real
#: rulesets rarely nest deeper, and a bound keeps a cyclic or huge one cheap.
MAX_DEPTH = 12
#: a destination port range is expanded up to this size (else: any port)
MAX_PORTS = 256
#: alternatives one path may carry (a match on a concatenated set makes one per key);
#: past this the path's destination and port are taken as unknown
MAX_ALTERNATIVES = 1024


@dataclass(frozen=True, slots=True)
class DnatPath:
    """A DNAT that sends UDP requests to a port here, with the path that leads to it.

    The matches are those of the whole path from a nat hook to the DNAT (the rule's
    own and those of the rules that jump to its chain). Only what is understood: a
    negated or unreadable destination match reads as no known destination.
    """

    backend: str  # "nftables" | "iptables-legacy"
    family: str  # "ip", "ip6", "inet" (legacy tables: "ip", "ip6")
    hook: str  # "prerouting" | "output": the built-in chain the path starts at
    destinations: tuple[str, ...]  # addresses or networks matched; (): none known
    dports: tuple[int, ...]  # destination ports matched; (): any
    to_address: str
    to_port: int | None  # None: the destination port is kept
    rule: str  # the DNAT rule as its tool prints it
    via: tuple[str, ...] = ()  # the rules that jump to it, from the hook inward

    def sends_to(self, port: int) -> bool:
        """Does this DNAT send requests to `port`? (to that port, or keeping it)"""
        if self.to_port is not None:
            return self.to_port == port
        return not self.dports or port in self.dports


@dataclass(frozen=True, slots=True)
class _Terms:
    """What a path's matches say about the request, as far as understood."""

    destinations: tuple[str, ...] | None = None  # None: no (understood) constraint
    dports: tuple[int, ...] | None = None


_ANY = _Terms()


def dnat_paths(ruleset: NatRuleset, port: int | None = None) -> list[DnatPath]:
    """The DNAT paths of the ruleset (those that send requests to `port`, if given), in
    the order of the DNAT rules in the ruleset, each once."""
    walk = _Walk(ruleset)
    for chain in ruleset.chains:
        if chain.nat and chain.hook in ("prerouting", "output"):
            walk.chain(chain, chain.hook, [_ANY], (), 0, frozenset({chain.name}))
    found = sorted(walk.found, key=lambda item: item[0])  # stable: path order within
    paths = [path for _at, path in found if port is None or path.sends_to(port)]
    return list(dict.fromkeys(paths))


class _Walk:
    def __init__(self, ruleset: NatRuleset) -> None:
        self.chains = {(c.backend, c.family, c.table, c.name): c for c in ruleset.chains}
        self.position = {
            id(rule): (c_index, r_index)
            for c_index, c in enumerate(ruleset.chains)
            for r_index, rule in enumerate(c.rules)
        }
        self.found: list[tuple[tuple[int, int], DnatPath]] = []

    def chain(
        self,
        chain: NatChain,
        hook: str,
        outer: list[_Terms],
        via: tuple[str, ...],
        depth: int,
        active: frozenset[str],
    ) -> None:
        for rule in chain.rules:
            terms = _narrowed(outer, _rule_terms(rule.matches))
            if not terms:
                continue
            action = rule.action
            at = self.position[id(rule)]
            if isinstance(action, Nat):
                self._dnat(chain, hook, terms, action.target, rule.text, via, at)
            elif isinstance(action, NatMap) and action.entries is not None:
                for key, target in action.entries:
                    keyed = _narrowed(terms, _listed(_key_terms(action.fields, key)))
                    self._dnat(chain, hook, keyed, target, rule.text, via, at)
            elif isinstance(action, Verdict):
                self._jump(chain, hook, terms, action, (*via, rule.text), depth, active)
            elif isinstance(action, VerdictMap) and action.entries is not None:
                for key, verdict in action.entries:
                    keyed = _narrowed(terms, _listed(_key_terms(action.fields, key)))
                    self._jump(chain, hook, keyed, verdict, (*via, rule.text), depth, active)

    def _jump(
        self,
        chain: NatChain,
        hook: str,
        terms: list[_Terms],
        verdict: Verdict,
        via: tuple[str, ...],
        depth: int,
        active: frozenset[str],
    ) -> None:
        if verdict.kind not in ("jump", "goto") or not terms or depth >= MAX_DEPTH:
            return
        name = verdict.chain or ""
        target = self.chains.get((chain.backend, chain.family, chain.table, name))
        if target is not None and name not in active:
            self.chain(target, hook, terms, via, depth + 1, active | {name})

    def _dnat(
        self,
        chain: NatChain,
        hook: str,
        terms: list[_Terms],
        target: Target,
        rule: str,
        via: tuple[str, ...],
        at: tuple[int, int],
    ) -> None:
        address, port = target.address, target.port
        if address is None or address[0] != address[1]:
            return  # redirect, or a range: no one target
        if port is not None and port[0] != port[1]:
            return
        for one in terms:
            path = DnatPath(
                chain.backend, chain.family, hook, one.destinations or (), one.dports or (),
                int_address(address[0]), port[0] if port else None, rule, via,
            )
            self.found.append((at, path))


# -- what matches say -----------------------------------------------------------------


def _rule_terms(matches: tuple[Match, ...]) -> list[_Terms]:
    """A rule's matches as alternatives (one per key of a concatenated set); [] when
    they exclude UDP or contradict each other."""
    terms = [_ANY]
    for match in matches:
        terms = _narrowed(terms, _match_terms(match))
        if not terms:
            break
    return terms


def _match_terms(match: Match) -> list[_Terms]:
    if match.proto is not None and match.proto != UDP:
        return []  # `tcp dport ...`: a path for another protocol
    if match.keys is None or "opaque" in match.fields:
        return [_ANY]
    if match.fields == ("l4proto",):
        udp = any(isinstance(k[0], tuple) and k[0][0] <= UDP <= k[0][1] for k in match.keys)
        return [_ANY] if udp != match.negated else []
    if match.negated or not {"daddr", "dport"} & set(match.fields):
        return [_ANY]
    if len(match.fields) == 1:
        # One field: its keys are one set of allowed values.
        name = match.fields[0]
        values = [k[0] for k in match.keys]
        if name == "daddr":
            return [_Terms(destinations=_networks(values))]
        return [_Terms(dports=_ports(values))]
    return [t for key in match.keys if (t := _key_terms(match.fields, key)) is not None]


def _key_terms(fields: tuple[Field, ...], key: Key) -> _Terms | None:
    """What one key of a (concatenated) set says of the destination and its port;
    None when it names another protocol than UDP (`ip daddr . meta l4proto . th dport`)."""
    found = _ANY
    for name, elem in zip(fields, key, strict=False):
        if name == "daddr":
            found = _Terms(_networks([elem]), found.dports)
        elif name == "dport":
            found = _Terms(found.destinations, _ports([elem]))
        elif name == "l4proto" and isinstance(elem, tuple) and not elem[0] <= UDP <= elem[1]:
            return None
    return found


def _listed(terms: _Terms | None) -> list[_Terms]:
    return [] if terms is None else [terms]


def _networks(elems: list[Elem]) -> tuple[str, ...] | None:
    """Address intervals as networks (`203.0.113.10`, `203.0.113.0/24`); None when one
    is no network (a range), so the destination is unknown."""
    found: list[str] = []
    for elem in elems:
        if not isinstance(elem, tuple):
            return None
        low, high = int_address(elem[0]), int_address(elem[1])
        try:
            [net] = ipaddress.summarize_address_range(
                ipaddress.ip_address(low), ipaddress.ip_address(high)
            )
        except (ValueError, TypeError):
            return None
        found.append(low if net.num_addresses == 1 else str(net))
    return tuple(found)


def _ports(elems: list[Elem]) -> tuple[int, ...] | None:
    found: list[int] = []
    for elem in elems:
        if not isinstance(elem, tuple) or elem[1] < elem[0] or elem[1] - elem[0] >= MAX_PORTS:
            return None
        found.extend(range(elem[0], elem[1] + 1))
    return tuple(found)


def _narrowed(outer: list[_Terms], inner: list[_Terms]) -> list[_Terms]:
    """Every consistent combination of a path's alternatives with a rule's."""
    combined = [c for a in outer for b in inner if (c := _combine(a, b)) is not None]
    if len(combined) > MAX_ALTERNATIVES:
        return [_ANY]
    return list(dict.fromkeys(combined))


def _combine(outer: _Terms, inner: _Terms) -> _Terms | None:
    """Both constraints at once; None when they contradict."""
    dports = outer.dports
    if inner.dports is not None:
        dports = inner.dports if dports is None else tuple(p for p in dports if p in inner.dports)
        if not dports:
            return None
    destinations = outer.destinations
    if inner.destinations is not None:
        destinations = _narrower(destinations, inner.destinations)
        if destinations == ():
            return None
    return _Terms(destinations, dports)


def _narrower(outer: tuple[str, ...] | None, inner: tuple[str, ...]) -> tuple[str, ...]:
    """The destinations both constraints allow (the narrower of each overlapping pair)."""
    if outer is None:
        return inner
    kept: list[str] = []
    for a in inner:
        for b in outer:
            na, nb = ipaddress.ip_network(a, strict=False), ipaddress.ip_network(b, strict=False)
            if na.version != nb.version:
                continue
            low = max(int(na.network_address), int(nb.network_address))
            high = min(int(na.broadcast_address), int(nb.broadcast_address))
            if low <= high:  # aligned networks: one holds the other
                narrow = a if na.prefixlen >= nb.prefixlen else b
                if narrow not in kept:
                    kept.append(narrow)
    return tuple(kept)
