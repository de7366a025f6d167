"""watch's stale-nat part: re-read the DNAT rules when they change, and check the live
entries of every forwarded UDP port against them.

Not a command: `ctfix watch` builds one `StaleNatWatch` and calls it from its loop
(`readable` when nftables said something changed, `tick` every turn, `wait` to know
how long it may sleep). A change is checked `SETTLE` seconds after the first
notification, so that a batch of rule changes (Docker, kube-proxy, `nft -f`) is read
once, whole; iptables-legacy has no notifications and is polled (`LEGACY_POLL`) by a
cheap fingerprint of its nat tables (ctfix.platform.nat_rules).

While something is stale, its ports' entries are judged again every RECHECK seconds
against the same rules, so that what was flushed (`ctfix fix --method flush-stale`)
or expired stops being stale now (the `ctfix_watch_stale_nat_entries` gauge goes back
to 0); a namespace with nothing stale pays nothing for it.

Know before changing: a check dumps (filtered in the kernel) the ports the rules
forward now *and* those they forwarded before the change: entries to a port that is
no longer forwarded are stale too. Findings from a check after a change seen live are
not `existing`; those of watch's start-up and resync dumps are. Every dump walks the
whole host's table in the kernel, hence a re-check only while something is stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctfix.core.decode import CtEntry, CtUsage
    from ctfix.core.detectors import Change
    from ctfix.core.detectors.stale_nat import StaleNatDetector, StaleNatFinding

#: seconds between the first change notification and the check (a batch settles)
SETTLE = 0.3
#: seconds between two looks at iptables-legacy's nat tables
LEGACY_POLL = 1.0
#: seconds between two re-checks of the entries still stale
RECHECK = 15.0


class StaleNatWatch:
    def __init__(
        self,
        detector: StaleNatDetector,
        report: Callable[[tuple[StaleNatFinding, Change]], None],
        local_addresses: frozenset[str],
        warn: Callable[[str], None],
    ) -> None:
        from ctfix.platform import nat_rules

        self.detector = detector
        self.report = report
        self.local = local_addresses
        self.warn = warn
        self._warned: tuple[str, ...] = ()
        self._routes: dict[str, str | None] = {}
        detector.interface_of = self._route_interface
        self.changes = nat_rules.RulesetChanges()
        if self.changes.unsubscribed:
            warn(
                f"nftables changes cannot be followed ({self.changes.unsubscribed}): stale "
                "NAT entries are checked at start-up and after iptables-legacy changes only"
            )
        self.sock = self.changes.sock
        self.due: float | None = None
        self.next_poll = time.monotonic() + LEGACY_POLL
        self.next_recheck = time.monotonic() + RECHECK
        self.ports: frozenset[int] | None = frozenset()
        self.checks = 0
        self._load()

    def _load(self) -> None:
        from ctfix.platform import nat_rules

        ruleset = nat_rules.read()
        if ruleset.errors and ruleset.errors != self._warned:
            self.warn(
                f"the NAT rules cannot all be read ({'; '.join(ruleset.errors)}): no entry "
                "is called stale until they can"
            )
        self._warned = ruleset.errors
        self.detector.set_rules(ruleset, self.local)
        assert self.detector.evaluator is not None
        self.ports = self.detector.evaluator.forwarded_ports()

    # -- the loop's hooks -------------------------------------------------------------------

    def readable(self, mono: float) -> None:
        if self.changes.drain():
            self._schedule(mono)

    def addresses(self, local: frozenset[str], mono: float) -> None:
        """The namespace's addresses changed (they decide `fib daddr type local`)."""
        self.local = local
        self._schedule(mono)

    def wait(self, mono: float) -> float:
        """Seconds the loop may sleep before `tick` has something to do."""
        due = self.next_poll if self.due is None else min(self.due, self.next_poll)
        if self.detector.active_ports:
            due = min(due, self.next_recheck)
        return max(0.0, due - mono)

    def tick(self, mono: float) -> None:
        if mono >= self.next_poll:
            self.next_poll = mono + LEGACY_POLL
            if self.changes.poll():
                self._schedule(mono)
        if self.due is not None and mono >= self.due:
            self.due = None
            self.check()
        elif mono >= self.next_recheck and self.detector.active_ports:
            self.recheck()

    def _schedule(self, mono: float) -> None:
        if self.due is None:
            self.due = mono + SETTLE

    # -- the check ----------------------------------------------------------------------------

    def check(self) -> None:
        """Re-read the rules; judge the entries of every port forwarded before or now."""
        before = self.ports
        self._load()
        self._judge(None if before is None or self.ports is None else before | self.ports)

    def recheck(self) -> None:
        """Judge again, against the same rules, the entries of the ports still stale."""
        self._judge(self.detector.active_ports)

    def _judge(self, ports: frozenset[int] | None) -> None:
        """Dump the entries of `ports` (None: all) and judge them."""
        from ctfix.platform import conntrack

        self.next_recheck = time.monotonic() + RECHECK
        usage: dict[int, CtUsage] = {}
        entries: list[CtEntry] = []
        if ports is None:
            entries = list(conntrack.dump(proto=17, usage=usage))
        else:
            for port in sorted(ports):
                entries.extend(conntrack.dump(proto=17, port=port, usage=usage))
        self.checks += 1
        self._routes.clear()
        for found in self.detector.check(entries, time.time(), usage=usage, ports=ports):
            self.report(found)

    def _route_interface(self, client: str) -> str | None:
        """The interface the route to a client leaves by (it stands in for the one its
        datagrams came in by; see ctfix.core.detectors.stale_nat.judge), asked once
        per client and check."""
        if client not in self._routes:
            from ctfix.platform import routing

            self._routes[client] = routing.reply_source(client, 0).interface
        return self._routes[client]

    def close(self) -> None:
        self.changes.close()
