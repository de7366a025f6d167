"""Where would a NEW flow be sent now: the NAT model evaluated. Pure.

`Evaluator.outcome(flow)` walks the nat base chains of the flow's hook (prerouting
for a flow from elsewhere, output for one this namespace sends) in priority order, as
the kernel does for the first packet of a connection, and answers with every DNAT
target the flow may get, and whether it may get none.

Know before changing: be conservative. A match ctfix cannot evaluate (an interface
when the flow's is unknown, a mark, an xt match, a dynamic set) is taken *both*
ways, so every target the flow might get is in the answer: a flow is only ever
called stale when no reading of the rules sends it where it goes. What cannot be
followed at all (an opaque statement that may NAT, an unknown map, a loop, too many
steps) makes the answer `undetermined`, and the caller says it could not judge.
Evaluation is memoised per (chain, rule) for one flow: marks are not modelled, so
nothing a rule does changes how a later rule matches.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

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
    Target,
    Verdict,
    VerdictMap,
    address_int,
)

# -- evaluation -------------------------------------------------------------------------


class Tri(enum.IntEnum):
    NO = 0
    YES = 1
    MAYBE = 2


#: bounds that keep a huge or cyclic ruleset cheap; reaching one is "undetermined"
MAX_DEPTH = 32
MAX_STEPS = 50_000


class _End(NamedTuple):
    """How one path through a chain ends."""

    kind: Literal["nat", "accept", "drop", "return", "continue", "unknown"]
    target: Target | None = None
    why: str = ""
    rule: str = ""  # the rule that made the NAT, for explain


@dataclass(frozen=True, slots=True)
class Outcome:
    """Every way the rules may treat a new flow."""

    targets: tuple[Target, ...] = ()  # every DNAT it may get
    unnatted: bool = False  # it may go through with no DNAT
    dropped: bool = False
    undetermined: tuple[str, ...] = ()  # why part of the answer is unknown
    rules: tuple[str, ...] = ()  # the rules that make the DNATs

    def sends_to(self, address: str, port: int, flow: Flow, local: frozenset[str]) -> bool:
        return any(t.covers(address, port, flow, local) for t in self.targets)

    def describe(self, flow: Flow) -> tuple[str, ...]:
        """The targets as endpoints, in rule order, each once."""
        return tuple(dict.fromkeys(t.describe(flow) for t in self.targets))


class Evaluator:
    """Answers `outcome(flow)` for one ruleset and the namespace's local addresses.

    Answers are cached per flow key (bounded); build a new Evaluator when the rules
    or the addresses change.
    """

    def __init__(
        self, ruleset: NatRuleset, local_addresses: Iterable[str] = (), cache: int = 65536
    ) -> None:
        self.ruleset = ruleset
        self.local = frozenset(local_addresses)
        self._chains = {(c.backend, c.family, c.table, c.name): c for c in ruleset.chains}
        self._cache: dict[Flow, Outcome] = {}
        self._cache_max = cache
        self._uses_sport = any(
            "sport" in m.fields for c in ruleset.chains for r in c.rules for m in r.matches
        )
        self._ports: frozenset[int] | None = None
        self._ports_known = False

    def base_chains(self, family: int, hook: str) -> list[NatChain]:
        """The nat base chains a flow of `family` meets at `hook`, by priority."""
        wanted = ("ip6", "inet") if family == socket.AF_INET6 else ("ip", "inet")
        chains = [c for c in self.ruleset.chains if c.nat and c.hook == hook and c.family in wanted]
        return sorted(chains, key=lambda c: c.priority)

    def outcome(self, flow: Flow) -> Outcome:
        key = flow if self._uses_sport else flow._replace(sport=0)
        cached = self._cache.get(key)
        if cached is None:
            cached = _Walk(self, flow).run()
            if len(self._cache) >= self._cache_max:
                self._cache.clear()
            self._cache[key] = cached
        return cached

    # -- which ports are forwarded at all (watch dumps only those) -----------------------

    def forwarded_ports(self) -> frozenset[int] | None:
        """The destination ports some DNAT path of the rules requires (the union over
        paths); None when some path may DNAT any port (then every entry is a candidate).
        A superset: it only decides which entries are worth judging."""
        if not self._ports_known:
            self._ports = _forwarded_ports(self)
            self._ports_known = True
        return self._ports

    def chain(self, owner: NatChain, name: str) -> NatChain | None:
        return self._chains.get((owner.backend, owner.family, owner.table, name))


class _Walk:
    """One flow's walk through the rules (module docstring: memoised, bounded)."""

    def __init__(self, evaluator: Evaluator, flow: Flow) -> None:
        self.ev = evaluator
        self.flow = flow
        self.memo: dict[tuple[int, int], frozenset[_End]] = {}
        self.active: set[tuple[int, int]] = set()
        self.steps = 0

    def run(self) -> Outcome:
        if self.ev.ruleset.errors:
            return Outcome(undetermined=tuple(self.ev.ruleset.errors))
        hook = "output" if self.flow.local else "prerouting"
        ends: set[_End] = set()
        passing = True  # the flow reaches the next base chain without NAT
        for chain in self.ev.base_chains(self.flow.family, hook):
            if not passing:
                break
            passing = False
            for end in self._chain(chain, 0):
                if end.kind == "accept":
                    passing = True
                elif end.kind == "return":  # fell off the base chain: its policy
                    if chain.policy == "drop":
                        ends.add(_End("drop"))
                    else:
                        passing = True
                else:  # nat, drop, unknown
                    ends.add(end)
        targets = tuple(dict.fromkeys(e.target for e in ends if e.kind == "nat" and e.target))
        return Outcome(
            targets=targets,
            unnatted=passing,
            dropped=any(e.kind == "drop" for e in ends),
            undetermined=tuple(dict.fromkeys(e.why for e in ends if e.kind == "unknown")),
            rules=tuple(dict.fromkeys(e.rule for e in ends if e.kind == "nat")),
        )

    # -- chains and rules ----------------------------------------------------------------

    def _chain(self, chain: NatChain, depth: int) -> frozenset[_End]:
        return self._rules(chain, 0, depth)

    def _rules(self, chain: NatChain, index: int, depth: int) -> frozenset[_End]:
        """The ends of the paths that start at rule `index` of `chain`."""
        key = (id(chain), index)
        known = self.memo.get(key)
        if known is not None:
            return known
        if key in self.active or depth > MAX_DEPTH:
            return frozenset({_End("unknown", why=f"a loop or a deep jump at {chain.where}")})
        self.active.add(key)
        try:
            ends = self._rules_uncached(chain, index, depth)
        finally:
            self.active.discard(key)
        self.memo[key] = ends
        return ends

    def _rules_uncached(self, chain: NatChain, index: int, depth: int) -> frozenset[_End]:
        rules = chain.rules
        while index < len(rules):
            self.steps += 1
            if self.steps > MAX_STEPS:
                return frozenset({_End("unknown", why="too many rules to follow")})
            rule = rules[index]
            matched = self._matches(rule.matches)
            if matched == Tri.NO:
                index += 1
                continue
            applied = self._apply(chain, rule, depth)
            goes_on = any(e.kind == "continue" for e in applied)
            done = frozenset(e for e in applied if e.kind != "continue")
            if matched == Tri.MAYBE or goes_on:
                # The rule may not match (or its action may let the flow go on):
                # the rest of the chain is a path too.
                return done | self._rules(chain, index + 1, depth)
            return done
        return frozenset({_End("return")})

    def _apply(self, chain: NatChain, rule: NatRule, depth: int) -> frozenset[_End]:
        action = rule.action
        if isinstance(action, Nat):
            return frozenset({_End("nat", target=action.target, rule=rule.text)})
        if isinstance(action, NatMap):
            if action.entries is None:
                return frozenset({_End("unknown", why=f"a NAT map ctfix cannot read: {rule.text}")})
            ends: set[_End] = set()
            hit = self._lookup(action.fields, [k for k, _t in action.entries])
            for index in hit.indices:
                ends.add(_End("nat", target=action.entries[index][1], rule=rule.text))
            if hit.miss:
                ends.add(_End("continue"))
            return frozenset(ends)
        if isinstance(action, Verdict):
            return self._verdict(chain, action, depth)
        if isinstance(action, VerdictMap):
            if action.entries is None:
                return frozenset(
                    {_End("unknown", why=f"a verdict map ctfix cannot read: {rule.text}")}
                )
            hit = self._lookup(action.fields, [k for k, _v in action.entries])
            found: set[_End] = set()
            for index in hit.indices:
                found |= self._verdict(chain, action.entries[index][1], depth)
            if hit.miss:
                found.add(_End("continue"))
            return frozenset(found)
        return frozenset({_End("unknown", why=f"{action.what}: {rule.text}")})

    def _verdict(self, chain: NatChain, verdict: Verdict, depth: int) -> frozenset[_End]:
        if verdict.kind in ("jump", "goto"):
            target = self.ev.chain(chain, verdict.chain or "")
            if target is None:
                missing = f"no chain {verdict.chain} in {chain.table}"
                return frozenset({_End("unknown", why=missing)})
            ends = self._chain(target, depth + 1)
            if verdict.kind == "jump":
                # Falling off (or `return` from) the jumped-to chain goes on here.
                return frozenset(_End("continue") if e.kind == "return" else e for e in ends)
            return ends
        kind = verdict.kind
        assert kind != "jump" and kind != "goto"  # narrowed for mypy: handled above
        return frozenset({_End(kind)})

    # -- matches -------------------------------------------------------------------------

    def _matches(self, matches: Sequence[Match]) -> Tri:
        result = Tri.YES
        for match in matches:
            one = self._match(match)
            if one == Tri.NO:
                return Tri.NO
            if one == Tri.MAYBE:
                result = Tri.MAYBE
        return result

    def _match(self, match: Match) -> Tri:
        if match.proto is not None and self.flow.proto != match.proto:
            return Tri.NO  # `udp dport != P` needs UDP too
        if match.keys is None:
            return Tri.MAYBE
        hit = self._lookup(match.fields, list(match.keys))
        if hit.indices and not hit.miss and not hit.maybe:
            found = Tri.YES
        elif not hit.indices and not hit.maybe:
            found = Tri.NO
        else:
            found = Tri.MAYBE
        if match.negated and found != Tri.MAYBE:
            return Tri.NO if found == Tri.YES else Tri.YES
        return found

    def _lookup(self, fields: tuple[Field, ...], keys: Sequence[Key]) -> _Hit:
        """Which keys the flow's value of `fields` may equal."""
        values = [self._value(f) for f in fields]
        indices: list[int] = []
        maybe = False
        for index, key in enumerate(keys):
            if len(key) != len(values):
                continue
            verdict = Tri.YES
            for value, elem in zip(values, key, strict=True):
                one = _elem_matches(value, elem)
                if one == Tri.NO:
                    verdict = Tri.NO
                    break
                if one == Tri.MAYBE:
                    verdict = Tri.MAYBE
            if verdict == Tri.YES:
                indices.append(index)
            elif verdict == Tri.MAYBE:
                indices.append(index)
                maybe = True
        # A certain hit excludes a miss only when no field is unknown.
        certain = indices and not maybe
        return _Hit(tuple(indices), miss=not certain, maybe=maybe)

    def _value(self, name: Field) -> int | str | None:
        """The flow's value of a field (None: unknown, matches both ways)."""
        flow = self.flow
        if name == "dport":
            return flow.dport
        if name == "daddr":
            return address_int(flow.daddr)
        if name == "saddr":
            return address_int(flow.saddr)
        if name == "sport":
            return flow.sport
        if name == "l4proto":
            return flow.proto
        if name == "ct-state":
            return "new"
        if name == "iifname":
            return flow.iif
        if name == "fib-daddr-type":
            return _address_type(flow.daddr, self.ev.local)
        return None  # random, opaque


class _Hit(NamedTuple):
    indices: tuple[int, ...]  # keys the flow may equal
    miss: bool  # the flow may equal none of them
    maybe: bool  # some of `indices` only perhaps


def _elem_matches(value: int | str | None, elem: Elem) -> Tri:
    if value is None:
        return Tri.MAYBE
    if isinstance(elem, tuple):
        if not isinstance(value, int):
            return Tri.NO
        return Tri.YES if elem[0] <= value <= elem[1] else Tri.NO
    if not isinstance(value, str):
        return Tri.NO
    if elem.endswith("*"):
        return Tri.YES if value.startswith(elem[:-1]) else Tri.NO
    return Tri.YES if value == elem else Tri.NO


def _address_type(address: str, local: frozenset[str]) -> str:
    if address in local:
        return "local"
    ip = ipaddress.ip_address(address)
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4 and address == "255.255.255.255":
        return "broadcast"
    return "unicast"


# -- forwarded ports ----------------------------------------------------------------------

def _forwarded_ports(evaluator: Evaluator) -> frozenset[int] | None:
    """See `Evaluator.forwarded_ports`: each NAT-making rule's port condition, or the
    one of the rule that jumped to its chain, up to the base chain."""
    ports: set[int] = set()
    seen: set[tuple[int, frozenset[int] | None]] = set()
    any_port = False

    def visit(chain: NatChain, inherited: frozenset[int] | None, depth: int) -> None:
        nonlocal any_port
        if any_port or depth > MAX_DEPTH or (id(chain), inherited) in seen:
            return
        seen.add((id(chain), inherited))
        for rule in chain.rules:
            own = _port_condition(rule.matches)
            cond = own if own is not None else inherited
            for part, jump_to, makes_nat in _effects(rule.action):
                scope = part if part is not None else cond
                if makes_nat:
                    if scope is None:
                        any_port = True
                        return
                    ports.update(scope)
                if jump_to is not None:
                    target = evaluator.chain(chain, jump_to)
                    if target is not None:
                        visit(target, scope, depth + 1)

    for chain in evaluator.ruleset.chains:
        if chain.nat and chain.hook in ("prerouting", "output"):
            visit(chain, None, 0)
    return None if any_port else frozenset(ports)


#: a port interval wider than this is "any port" for the dump filter
_MAX_EXPANDED = 1024


def _ports_of_keys(fields: tuple[Field, ...], keys: Iterable[Key]) -> frozenset[int] | None:
    if "dport" not in fields:
        return None
    at = fields.index("dport")
    ports: set[int] = set()
    for key in keys:
        elem = key[at] if len(key) > at else None
        if not isinstance(elem, tuple) or elem[1] - elem[0] > _MAX_EXPANDED:
            return None
        ports.update(range(elem[0], elem[1] + 1))
    return frozenset(ports)


def _port_condition(matches: Sequence[Match]) -> frozenset[int] | None:
    """The destination ports a rule's matches allow (None: any)."""
    for match in matches:
        if match.negated or match.keys is None:
            continue
        found = _ports_of_keys(match.fields, match.keys)
        if found is not None:
            return found
    return None


def _effects(action: Action) -> list[tuple[frozenset[int] | None, str | None, bool]]:
    """(port condition of this branch, chain jumped to, makes NAT) per branch."""
    if isinstance(action, Nat):
        return [(None, None, True)]
    if isinstance(action, NatMap):
        if action.entries is None:
            return [(None, None, True)]
        return [(_ports_of_keys(action.fields, (k for k, _t in action.entries)), None, True)]
    if isinstance(action, Verdict):
        return [(None, action.chain, False)] if action.kind in ("jump", "goto") else []
    if isinstance(action, VerdictMap):
        if action.entries is None:
            return [(None, None, True)]
        return [
            (_ports_of_keys(action.fields, [key]), verdict.chain, False)
            for key, verdict in action.entries
            if verdict.kind in ("jump", "goto")
        ]
    return [(None, None, True)]  # opaque: may NAT anything
