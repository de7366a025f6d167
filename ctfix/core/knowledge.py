"""The knowledge base of UDP services as values: an entry (`ServiceRule`) and what it
says about a listener, the base (`KnowledgeBase`) and how it recognises a listener,
and how layers of entries merge. Parsing and validating the YAML text is
ctfix.core.rules; reading the files is ctfix.platform.rules_files.

Know before changing: these dataclasses are consumed by `ctfix explain`, scan and
watch; add fields, do not rename them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ctfix.core.model import Family
from ctfix.core.pattern import search
from ctfix.errors import CtfixError

#: /proc/PID/comm holds at most TASK_COMM_LEN - 1 = 15 characters.
COMM_LEN = 15

Confidence = Literal["high", "medium", "low"]
MatchedBy = Literal["process", "cmdline", "port"]


class RuleError(CtfixError):
    """A knowledge-base file is malformed; the message is `file:line: what is wrong`."""

    def __init__(self, source: str, line: int | None, what: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {what}")
        self.source = source
        self.line = line
        self.what = what


@dataclass(frozen=True, slots=True)
class ServiceRule:
    """One UDP service the knowledge base knows.

    `affected_when_wildcard`: True = a wildcard bind answers from whatever source the
    routing picks (the bug); False = the service answers correctly on a wildcard bind
    in its default configuration (IP_PKTINFO, or it binds each address itself);
    None = it depends on its configuration, and `why` says on what.
    """

    id: str
    name: str
    processes: tuple[str, ...]
    cmdline_patterns: tuple[str, ...]
    ports: tuple[int, ...]
    affected_when_wildcard: bool | None
    why: str
    fix: str
    snippet: str
    reference: str
    replies_from_other_port: bool
    confidence: Confidence
    notes: str
    see_also: tuple[str, ...]
    source: str  # file the entry came from, as shown in error messages
    line: int  # 1-based line of the entry in `source`
    #: Overrides of `affected_when_wildcard` for one family: (("ipv6", True),).
    affected_by_family: tuple[tuple[str, bool | None], ...] = ()
    #: Regexes on the command line that show the service's own fix is on
    #: (OpenVPN's `--multihome`): when one matches, the listener is not affected.
    fixed_if_cmdline: tuple[str, ...] = ()
    #: (file glob, regex) pairs: a configuration file of the program (its path as the
    #: program sees it) in which a line matching the regex shows its fix is on.
    fixed_if_config: tuple[tuple[str, str], ...] = ()
    #: The service never answers a datagram (syslog, StatsD): its unanswered flows are
    #: normal, and no reply source can be wrong.
    one_way: bool = False
    #: The upstream release that fixed the wrong source ("2.5"), for the advice to upgrade.
    fixed_in: str = ""
    #: A documented caveat of a program that otherwise answers from the destination:
    #: the first request after it starts (one per socket) is answered from the address
    #: routing picks (Debian 12's in.tftpd). One wrong-source reply per family is that.
    wrong_first_reply: bool = False

    def fix_in_effect(
        self, cmdline: Sequence[str] = (), configs: Mapping[str, str] | None = None
    ) -> str | None:
        """What shows that the service's own fix is already on, in words (None: nothing
        does): a `fixed_if_cmdline` match, or a `fixed_if_config` line in a file read.

        `configs`: path -> text of the program's configuration files that were read.
        """
        if cmdline and self.fixed_if_cmdline:
            joined = " ".join(cmdline)
            for pattern in self.fixed_if_cmdline:
                if search(pattern, joined):
                    # Name the argument that shows it where one alone does.
                    words = [w for w in cmdline if search(pattern, w)]
                    shown = words[0] if words else pattern
                    return f"`{shown}` on its command line"
        for glob, pattern in self.fixed_if_config:
            for path, text in sorted((configs or {}).items()):
                if not fnmatch.fnmatchcase(path, glob):
                    continue
                # Line by line: `^` and `$` are a line's ends, as in the file's syntax.
                for line in text.splitlines():
                    if search(pattern, line):
                        return f"`{line.strip()}` in {path}"
        return None

    def affected(
        self,
        family: Family | None = None,
        cmdline: Sequence[str] = (),
        configs: Mapping[str, str] | None = None,
    ) -> bool | None:
        """The verdict for a wildcard listener of this service.

        `family` is "ipv4" or "ipv6" (as in `Listener.family`); `cmdline` is the
        process's argv; `configs` its configuration files read (path -> text).
        True = affected, False = answers correctly, None = depends on configuration
        that ctfix cannot see (see `why`).
        """
        if self.fix_in_effect(cmdline, configs) is not None:
            return False
        for name, verdict in self.affected_by_family:
            if name == family:
                return verdict
        return self.affected_when_wildcard

    def upgrade_advice(self) -> str:
        """" The lasting fix: ..." when the entry names the release that fixed it."""
        if not self.fixed_in:
            return ""
        return (
            f" The lasting fix: upgrade {self.name} to {self.fixed_in} or later, which "
            "answers from the address each request was sent to."
        )

    def matches_process(self, process: str) -> bool:
        """True if `process` (a comm, truncated to 15 characters) is one of ours."""
        return any(process == name[:COMM_LEN] for name in self.processes)

    def matches_cmdline(self, cmdline: Sequence[str]) -> bool:
        if not self.cmdline_patterns or not cmdline:
            return False
        joined = " ".join(cmdline)
        return any(search(pattern, joined) for pattern in self.cmdline_patterns)


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """Which entry matched a listener, and how strong the match is.

    `matched_by == "port"` means only the default port agreed: a weak hint (any program
    may use port 53), to be worded as "probably" by whoever shows it.
    """

    rule: ServiceRule
    matched_by: MatchedBy

    @property
    def port_only(self) -> bool:
        return self.matched_by == "port"


@dataclass(frozen=True, slots=True)
class KnowledgeBase:
    """Validated entries, user entries first (they win matching and override ids)."""

    entries: tuple[ServiceRule, ...]

    def get(self, rule_id: str) -> ServiceRule | None:
        for rule in self.entries:
            if rule.id == rule_id:
                return rule
        return None

    def by_port(self, port: int) -> tuple[ServiceRule, ...]:
        return tuple(rule for rule in self.entries if port in rule.ports)

    def match(
        self,
        process: str | None,
        cmdline: Sequence[str] = (),
        port: int | None = None,
        exe: str | None = None,
    ) -> RuleMatch | None:
        """Recognise a listener by its process first, the default port last.

        The process is known by its comm (`process`), the basename of its executable
        (`exe`, /proc/PID/exe: `nc` is nc.openbsd or nc.traditional, `nsd: main` is
        nsd) and argv[0]'s basename. An entry whose process name *and* command-line
        pattern both match beats one that only has the name (openntpd's "ntpd: ntp
        engine" against the other ntpd); a name beats a pattern alone. The port alone
        is used only when exactly one entry claims it, and the result says so
        (`port_only`): port 53 belongs to many DNS servers, and guessing one of them
        would mislead.
        """
        names = [name for name in _names(process, cmdline, exe) if name]
        best: tuple[int, ServiceRule] | None = None
        for rule in self.entries:
            by_name = any(rule.matches_process(name) for name in names)
            by_cmdline = rule.matches_cmdline(cmdline)
            rank = 2 * by_name + by_cmdline
            if rank and (best is None or rank > best[0]):
                best = (rank, rule)
        if best is not None:
            return RuleMatch(best[1], "process" if best[0] >= 2 else "cmdline")
        if port is not None:
            candidates = self.by_port(port)
            if len(candidates) == 1:
                return RuleMatch(candidates[0], "port")
        return None


def _names(process: str | None, cmdline: Sequence[str], exe: str | None) -> tuple[str, ...]:
    """The names a process goes by: comm, the executable's basename, argv[0]'s basename.

    A script run by an interpreter has comm "node"/"python3"; argv[0] still helps
    when comm was not read, and the executable settles what comm cannot (`nc`).
    """
    names = (process or "", Path(exe).name if exe else "", Path(cmdline[0]).name if cmdline else "")
    return tuple(name[:COMM_LEN] for name in names)


def merge(layers: Sequence[Sequence[ServiceRule]]) -> KnowledgeBase:
    """One knowledge base from layers of entries (built-in first, then each `--rules`
    directory in order).

    A later layer's entry replaces an earlier one with the same id. Two entries with
    one id inside the same layer are an error naming both places (RuleError).
    """
    merged: dict[str, ServiceRule] = {}
    order: list[str] = []
    for layer in layers:
        seen: dict[str, ServiceRule] = {}
        for rule in layer:
            if rule.id in seen:
                first = seen[rule.id]
                raise RuleError(
                    rule.source,
                    rule.line,
                    f"duplicate id {rule.id!r} (first defined at {first.source}:{first.line})",
                )
            seen[rule.id] = rule
        for rule in layer:
            if rule.id not in merged:
                order.append(rule.id)
            merged[rule.id] = rule
    # Matching walks entries in order: the last layer (the user's) first.
    layer_of = {rule.id: index for index, layer in enumerate(layers) for rule in layer}
    ranked = sorted(order, key=lambda rule_id: -layer_of[rule_id])
    return KnowledgeBase(tuple(merged[rule_id] for rule_id in ranked))
