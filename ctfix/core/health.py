"""Conntrack health: readings of the kernel's statistics -> rates, meanings, verdict.

Pure: `Sample` values in (made by `ctfix.platform.ctstats.sample()`, or by tests from
recorded messages), a frozen `Health` out, with reasons as `Reason(code, text)`
(codes listed in docs/json.md, section "health").

The verdict is `problem` when the table is at least 85% full, or when, between two
readings, insert_failed, drop, early_drop or chain_toolong rose at all: on a healthy
host they stay still, and each rise is a lost packet. clash_resolve, error,
search_restart and invalid rising are told, not judged. One reading cannot say what
is rising (the counters are totals since conntrack started in the namespace), so its
verdict rests on the fill alone and the totals are told.

Know before changing: per-CPU counters are u32 and wrap, so an increase is taken per
CPU modulo 2**32 and then summed; a counter the kernel does not send stays None
(never 0). The reason codes are a contract: add codes, never change a code's meaning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ctfix.core.ctstats import CPU_ATTRIBUTES, CpuStats
from ctfix.core.model import Reason

Verdict = Literal["healthy", "problem"]

#: Attributes of enum ctattr_stats_cpu that current kernels no longer send.
OBSOLETE: tuple[str, ...] = ("searched", "new", "ignore", "delete", "delete_list")
#: The counters current kernels send, in `conntrack -S` order: JSON keys and metrics.
COUNTERS: tuple[str, ...] = tuple(n for n in CPU_ATTRIBUTES if n not in OBSOLETE)
#: A rise of any of these is a lost packet: verdict `problem`.
PROBLEM_COUNTERS: tuple[str, ...] = ("insert_failed", "drop", "early_drop", "chain_toolong")
#: Percent of nf_conntrack_max at which the table counts as nearly full.
FILL_PROBLEM = 85.0

DNS_RACE = (
    "the insert race of kubernetes 56903: two packets of one new UDP flow (a resolver's "
    "parallel A and AAAA queries from one socket, through a DNAT such as a DNS Service) "
    "handled on two CPUs at once, and the loser dropped: 5-second DNS timeouts"
)
DNS_RACE_FIXES = (
    "NodeLocal DNSCache (no DNAT on the pods' DNS path), `options single-request-reopen` "
    "in resolv.conf, DNS over TCP (`options use-vc`), or a kernel that resolves UDP "
    "clashes (clash_resolve rises instead)"
)

#: What each counter usually means, in one sentence (text output and the runbook).
MEANINGS: dict[str, str] = {
    "found": (
        "NAT wanted a tuple that another entry already held and searched on: rises with "
        "SNAT/MASQUERADE source-port selection; a fast climb means a crowded port range"
    ),
    "invalid": (
        "packets conntrack could not track (bad headers, a protocol tracker's verdict such "
        "as TCP out of window); a `ct state invalid drop` rule drops them"
    ),
    "insert": (
        "entries added through ctnetlink (conntrack -I, conntrackd); on current kernels "
        "packets' own new flows are not counted here"
    ),
    "insert_failed": (
        "a new flow's entry could not be added when its first packet was confirmed, so "
        "that packet was dropped: usually " + DNS_RACE + "; also a NAT rewrite into a "
        "tuple another entry holds, or a hash chain too long"
    ),
    "drop": (
        "packets conntrack dropped: no entry could be made (a full table with nothing to "
        "evict, or no memory), an insert race lost (with insert_failed), or a protocol "
        "tracker's verdict"
    ),
    "early_drop": (
        "the table was full and conntrack evicted entries that never saw two-way "
        "traffic (not ASSURED; all such entries of a hash bucket at once) to make room "
        "for a new flow"
    ),
    "error": (
        "ICMP errors conntrack could not relate to a tracked flow (its entry expired or "
        "never existed) or that were malformed; harmless in small numbers"
    ),
    "search_restart": (
        "lookups that raced with entries moving between hash chains (or a resize) and "
        "started again; harmless unless it climbs with load"
    ),
    "clash_resolve": (
        "the insert race happened and the kernel merged the racing packets instead of "
        "dropping one: survived, but rising with DNS traffic it is the early sign of "
        "kubernetes 56903"
    ),
    "chain_toolong": (
        "a new entry was refused because its hash bucket already held 50-80 entries: far "
        "more entries than buckets (the hash table is shared by every namespace), or "
        "flows crafted to collide; each also counts in insert_failed"
    ),
}


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of a namespace's conntrack statistics.

    `taken`: monotonic seconds; `entries`: this namespace's entries; `max_entries`:
    nf_conntrack_max (host-wide, 0 = no limit); `buckets`: nf_conntrack_buckets
    (host-wide); None where the kernel did not say.
    """

    taken: float
    cpus: tuple[CpuStats, ...]
    entries: int | None
    max_entries: int | None
    buckets: int | None = None

    def total(self, name: str) -> int | None:
        """The counter summed over CPUs; None when no CPU reported it."""
        values = [v for v in (cpu.get(name) for cpu in self.cpus) if v is not None]
        return sum(values) if values else None


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter: its total (summed over CPUs), and its rise between two readings."""

    name: str
    total: int | None
    increase: int | None = None  # None: one reading, or not reported
    rate: float | None = None  # per second over the interval
    meaning: str = ""

    @property
    def rising(self) -> bool:
        return bool(self.increase)


@dataclass(frozen=True, slots=True)
class Health:
    """The assessment of one reading, or of the interval between two."""

    entries: int | None
    max_entries: int | None
    buckets: int | None
    fill: float | None  # percent of max_entries; None without a limit
    interval: float | None  # seconds between the readings; None: one reading
    counters: tuple[Counter, ...]
    cpus: tuple[CpuStats, ...]
    verdict: Verdict
    reasons: tuple[Reason, ...]

    def counter(self, name: str) -> Counter:
        for counter in self.counters:
            if counter.name == name:
                return counter
        raise KeyError(name)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(reason.code for reason in self.reasons)


def increase(name: str, before: Sample, after: Sample) -> int | None:
    """How much a counter rose, per CPU modulo 2**32 (u32 counters wrap), summed."""
    previous = {cpu.cpu: cpu.get(name) for cpu in before.cpus}
    total: int | None = None
    for cpu in after.cpus:
        now, then = cpu.get(name), previous.get(cpu.cpu)
        if now is None or then is None:
            continue
        total = (total or 0) + (now - then) % (1 << 32)
    return total


def fill_percent(entries: int | None, max_entries: int | None) -> float | None:
    if entries is None or not max_entries:
        return None
    return 100.0 * entries / max_entries


def _names(names: Iterable[str]) -> str:
    items = list(names)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _rose(counter: Counter) -> str:
    rate = counter.rate or 0.0
    return f"{counter.name} rose by {counter.increase} ({rate:.3g}/s)"


def assess(after: Sample, before: Sample | None = None) -> Health:
    """Assess the latest reading, and the interval since `before` when given."""
    interval = None if before is None else max(after.taken - before.taken, 1e-9)
    counters = []
    for name in COUNTERS:
        rise = None if before is None else increase(name, before, after)
        counters.append(
            Counter(
                name=name,
                total=after.total(name),
                increase=rise,
                rate=None if rise is None or interval is None else rise / interval,
                meaning=MEANINGS[name],
            )
        )
    by_name = {c.name: c for c in counters}
    fill = fill_percent(after.entries, after.max_entries)
    reasons = _table_reasons(after, fill)
    if before is None:
        reasons += _one_reading_reasons(by_name)
    else:
        reasons += _rising_reasons(by_name, after, fill)
    missing = [name for name in COUNTERS if by_name[name].total is None]
    problem = any(r.code in PROBLEM_CODES for r in reasons)
    if not problem:
        reasons.insert(0, _no_problem(fill, interval))
    if missing and after.cpus:
        reasons.append(
            Reason("counters-not-reported", f"this kernel does not report {_names(missing)}")
        )
    return Health(
        entries=after.entries,
        max_entries=after.max_entries,
        buckets=after.buckets,
        fill=fill,
        interval=interval,
        counters=tuple(counters),
        cpus=after.cpus,
        verdict="problem" if problem else "healthy",
        reasons=tuple(reasons),
    )


#: counter -> the reason code that tells its rise (and says what it means).
RISING_CODES: dict[str, str] = {
    "insert_failed": "insert-failed-rising",
    "drop": "drops-rising",
    "early_drop": "early-drops-rising",
    "chain_toolong": "chain-too-long-rising",
    "clash_resolve": "clash-resolve-rising",
    "error": "error-rising",
    "search_restart": "search-restart-rising",
    "invalid": "invalid-rising",
}

#: Reason codes that make the verdict `problem`.
PROBLEM_CODES = frozenset(
    {
        "table-full",
        "table-nearly-full",
        "insert-failed-rising",
        "drops-rising",
        "early-drops-rising",
        "chain-too-long-rising",
    }
)

_TABLE_FIXES = (
    "Raise nf_conntrack_max (host-wide: in a container's namespace it is the host's, and "
    "each namespace's own entries count against it), shorten the timeouts that keep idle "
    "entries (nf_conntrack_udp_timeout, nf_conntrack_tcp_timeout_established), find who "
    "fills it (`conntrack -L` grouped by source), or NOTRACK heavy stateless traffic"
)


def _table_reasons(after: Sample, fill: float | None) -> list[Reason]:
    if fill is None:
        return []
    size = f"{after.entries} of {after.max_entries} entries"
    if after.entries is not None and after.max_entries and after.entries >= after.max_entries:
        return [
            Reason(
                "table-full",
                f"the conntrack table is full ({size}): new flows evict unreplied entries "
                f"(early_drop) or are dropped (drop). {_TABLE_FIXES}",
            )
        ]
    if fill >= FILL_PROBLEM:
        return [
            Reason(
                "table-nearly-full",
                f"the conntrack table is {fill:.1f}% full ({size}); at 100% new flows evict "
                f"entries or are dropped. {_TABLE_FIXES}",
            )
        ]
    return []


def _one_reading_reasons(by_name: dict[str, Counter]) -> list[Reason]:
    seen = [by_name[n] for n in PROBLEM_COUNTERS if by_name[n].total]
    totals = (
        ", ".join(f"{c.name}={c.total}" for c in seen)
        if seen
        else f"{_names(PROBLEM_COUNTERS)} are all 0"
    )
    return [
        Reason(
            "totals-only",
            f"one reading: counters are totals since conntrack started in this namespace "
            f"({totals}); whether they are rising needs two: ctfix health --interval 5",
        )
    ]


def _rising_reasons(by_name: dict[str, Counter], after: Sample, fill: float | None) -> list[Reason]:
    reasons: list[Reason] = []
    failed, drop = by_name["insert_failed"], by_name["drop"]
    early, chain = by_name["early_drop"], by_name["chain_toolong"]
    if failed.rising:
        if chain.rising:
            cause = (
                f"{chain.increase} of them because a hash chain was too long "
                "(see chain_toolong); the rest are usually " + DNS_RACE
            )
        else:
            cause = "usually " + DNS_RACE
        reasons.append(
            Reason(
                "insert-failed-rising",
                f"{_rose(failed)}: new flows' first packets were dropped because their "
                f"entry could not be added, {cause}. Mitigations: {DNS_RACE_FIXES}. A NAT rule "
                "that rewrites a reply into the tuple of the request's entry (a plain SNAT of "
                "a wrong-source reply) fails the same way on every reply: `ctfix explain PORT`",
            )
        )
    if drop.rising:
        causes = []
        if early.rising or (fill is not None and fill >= FILL_PROBLEM):
            causes.append("a full table: no entry could be made for new flows")
        if failed.rising:
            causes.append(f"lost insert races ({failed.increase} insert_failed)")
        if by_name["invalid"].rising:
            causes.append(f"a protocol tracker's verdict ({by_name['invalid'].increase} invalid)")
        if not causes:
            causes.append("no entry could be allocated (memory) or a tracker said drop")
        reasons.append(
            Reason(
                "drops-rising",
                f"{_rose(drop)}: conntrack dropped packets; the counters point at "
                + "; ".join(causes),
            )
        )
    if early.rising:
        reasons.append(
            Reason(
                "early-drops-rising",
                f"{_rose(early)}: the table was full and conntrack evicted unreplied "
                "entries to make room; flows that had not been answered yet lose their state. "
                f"{_TABLE_FIXES}",
            )
        )
    if chain.rising:
        reasons.append(
            Reason(
                "chain-too-long-rising",
                f"{_rose(chain)}: new entries were refused because their hash bucket "
                f"already held 50-80 entries ({after.entries} entries here, "
                f"{after.buckets if after.buckets is not None else 'unknown'} buckets shared "
                "by every namespace): raise nf_conntrack_buckets (the hashsize), or look for "
                "flows crafted to collide",
            )
        )
    for name in ("clash_resolve", "error", "search_restart", "invalid"):
        if by_name[name].rising:
            reasons.append(Reason(RISING_CODES[name], f"{_rose(by_name[name])}: {MEANINGS[name]}"))
    return reasons


def _no_problem(fill: float | None, interval: float | None) -> Reason:
    table = "no table limit" if fill is None else f"the table is {fill:.1f}% full"
    if interval is None:
        return Reason("no-problem-seen", f"{table} (below {FILL_PROBLEM:.0f}%)")
    return Reason(
        "no-problem-seen",
        f"{table} (below {FILL_PROBLEM:.0f}%), and {_names(PROBLEM_COUNTERS)} did not rise "
        f"over {interval:.1f} s",
    )
