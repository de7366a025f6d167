"""The knowledge base of UDP services: parse and validate `rules/*.yaml` text, merge
layers, match a listener. Pure: reading the files is ctfix.platform.rules_files.

Each YAML file holds `version: 1` and a list `services:` of entries; an entry says how
to recognise a service (process names as /proc/PID/comm shows them, command-line
regexes, default ports), whether it answers from the wrong source when bound to the
wildcard, and the fix in its own configuration. `docs/knowledge-base.md` is the
user-facing description of the schema.

Know before changing: every validation error must name `file:line` (1-based, from the
YAML node's start mark), so this module walks the composed node tree instead of
`yaml.safe_load`'s plain values, and rejects unknown keys so that a typo never passes
silently. The dataclasses below are consumed by `ctfix explain`; add fields, do not
rename them. yaml is imported inside functions only (start-up cost, see HACKING.md).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ctfix.core.model import Family
from ctfix.core.pattern import InvalidPattern, PatternError, compile_pattern, search
from ctfix.errors import CtfixError

if TYPE_CHECKING:
    import yaml

#: /proc/PID/comm holds at most TASK_COMM_LEN - 1 = 15 characters.
COMM_LEN = 15
SCHEMA_VERSION = 1
#: A rules file is a few kilobytes; one of a megabyte is a mistake (a log, a dump),
#: and parsing a huge one took minutes and gigabytes before its error.
MAX_FILE_BYTES = 1 << 20
#: The schema nests four levels; a hundred thousand brackets blew Python's stack.
MAX_DEPTH = 16

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


def parse(text: str, source: str) -> list[ServiceRule]:
    """Validate the text of one rules file (named `source` in errors)."""
    import yaml

    if len(text) > MAX_FILE_BYTES:
        raise RuleError(source, None, f"a rules file holds at most {MAX_FILE_BYTES // 1024} KiB")
    try:
        _check_depth(text, source)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "malformed YAML"
        raise RuleError(source, mark.line + 1 if mark else None, f"YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise RuleError(source, None, f"YAML: {exc}") from None
    if root is None:
        raise RuleError(source, 1, "empty file: expected 'version: 1' and 'services:'")
    top = _mapping(root, source, "the file", {"version", "services"}, {"version", "services"})
    version = _scalar(top["version"], source, "version", int)
    if version != SCHEMA_VERSION:
        raise RuleError(
            source, _line(top["version"]), f"'version' must be {SCHEMA_VERSION}, not {version}"
        )
    services = top["services"]
    if not isinstance(services, yaml.SequenceNode) or not services.value:
        raise RuleError(source, _line(services), "'services' must be a non-empty list of entries")
    return [_entry(node, source) for node in services.value]


def _check_depth(text: str, source: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before composing (which recurses): YAML's
    event stream is read without recursion."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise RuleError(
                    source, event.start_mark.line + 1 if event.start_mark else None,
                    f"nested deeper than {MAX_DEPTH} levels (a rules file needs four)",
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


# -- validation ------------------------------------------------------------------------

_REQUIRED = {"id", "name", "ports", "affected_when_wildcard", "why", "fix", "reference",
             "confidence"}
_OPTIONAL = {"processes", "cmdline_patterns", "snippet", "replies_from_other_port", "notes",
             "see_also", "affected_by_family", "fixed_if_cmdline", "one_way", "fixed_in",
             "fixed_if_config", "wrong_first_reply"}
_FAMILIES = ("ipv4", "ipv6")
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def _entry(node: yaml.Node, source: str) -> ServiceRule:
    fields = _mapping(node, source, "a service entry", _REQUIRED, _REQUIRED | _OPTIONAL)
    line = _line(node)

    rule_id = _text(fields["id"], source, "id")
    if not _ID.match(rule_id):
        raise RuleError(
            source, _line(fields["id"]),
            "'id' must be lower-case letters, digits, '.', '_' or '-' (e.g. 'pdns-recursor')",
        )

    processes = _text_list(fields.get("processes"), source, "processes")
    for index, name in enumerate(processes):
        if "/" in name or " " in name:
            item = _item_line(fields["processes"], index)
            raise RuleError(
                source, item,
                f"'processes' holds names as /proc/PID/comm shows them, not paths: {name!r}",
            )
    patterns = _regex_list(fields.get("cmdline_patterns"), source, "cmdline_patterns")
    ports = _ports(fields["ports"], source)
    if not (processes or patterns or ports):
        raise RuleError(
            source, line, "an entry needs at least one of 'processes', 'cmdline_patterns', 'ports'"
        )

    affected = _verdict(fields["affected_when_wildcard"], source, "affected_when_wildcard")
    by_family: list[tuple[str, bool | None]] = []
    family_node = fields.get("affected_by_family")
    if family_node is not None:
        family_fields = _mapping(
            family_node, source, "'affected_by_family'", set(), set(_FAMILIES)
        )
        for name, node_value in family_fields.items():
            by_family.append((name, _verdict(node_value, source, f"affected_by_family.{name}")))
    fixed_if = _regex_list(fields.get("fixed_if_cmdline"), source, "fixed_if_cmdline")
    fixed_if_config = _config_checks(fields.get("fixed_if_config"), source)

    confidence = _text(fields["confidence"], source, "confidence")
    if confidence not in ("high", "medium", "low"):
        raise RuleError(
            source, _line(fields["confidence"]), "'confidence' must be high, medium or low"
        )
    reference = _text(fields["reference"], source, "reference")
    _check_url(reference, source, _line(fields["reference"]), "reference")
    see_also = _text_list(fields.get("see_also"), source, "see_also")
    for index, url in enumerate(see_also):
        _check_url(url, source, _item_line(fields["see_also"], index), "see_also")

    other_port = _flag(fields, source, "replies_from_other_port")
    one_way = _flag(fields, source, "one_way")
    first_reply = _flag(fields, source, "wrong_first_reply")
    if first_reply and affected is not False:
        raise RuleError(
            source, _line(fields["wrong_first_reply"]),
            "'wrong_first_reply' is a caveat of a program that answers from the "
            "destination: 'affected_when_wildcard' must be false",
        )
    fixed_in_node = fields.get("fixed_in")
    if fixed_in_node is not None and not isinstance(_construct(fixed_in_node), str):
        # `fixed_in: 2.10` is the float 2.1: a version must be quoted.
        raise RuleError(
            source, _line(fixed_in_node), "'fixed_in' must be a quoted version, e.g. \"2.5\""
        )
    fixed_in = _optional_text(fixed_in_node, source, "fixed_in").strip()
    if one_way and affected is not False:
        raise RuleError(
            source, _line(fields["one_way"]),
            "a one_way service never replies: 'affected_when_wildcard' must be false",
        )

    return ServiceRule(
        id=rule_id,
        name=_text(fields["name"], source, "name"),
        processes=processes,
        cmdline_patterns=patterns,
        ports=ports,
        affected_when_wildcard=affected,
        why=_text(fields["why"], source, "why").strip(),
        fix=_text(fields["fix"], source, "fix").strip(),
        snippet=_optional_text(fields.get("snippet"), source, "snippet"),
        reference=reference,
        replies_from_other_port=other_port,
        confidence=confidence,  # type: ignore[arg-type]  # checked just above
        notes=_optional_text(fields.get("notes"), source, "notes").strip(),
        see_also=see_also,
        source=source,
        line=line,
        affected_by_family=tuple(by_family),
        fixed_if_cmdline=fixed_if,
        one_way=one_way,
        fixed_in=fixed_in,
        fixed_if_config=fixed_if_config,
        wrong_first_reply=first_reply,
    )


def _flag(fields: dict[str, yaml.Node], source: str, key: str) -> bool:
    node = fields.get(key)
    return False if node is None else bool(_scalar(node, source, key, bool))


def _config_checks(node: yaml.Node | None, source: str) -> tuple[tuple[str, str], ...]:
    """`fixed_if_config`: a list of {file: absolute glob, pattern: regex}."""
    import yaml

    if node is None:
        return ()
    if not isinstance(node, yaml.SequenceNode):
        raise RuleError(
            source, _line(node), "'fixed_if_config' must be a list of {file: GLOB, pattern: REGEX}"
        )
    checks = []
    for item in node.value:
        fields = _mapping(
            item, source, "a 'fixed_if_config' item", {"file", "pattern"}, {"file", "pattern"}
        )
        glob = _text(fields["file"], source, "file")
        if not glob.startswith("/"):
            raise RuleError(
                source, _line(fields["file"]), f"'file' must be an absolute path or glob: {glob!r}"
            )
        pattern = _text(fields["pattern"], source, "pattern")
        try:
            compile_pattern(pattern)  # a bounded matcher: see ctfix/core/pattern.py
        except PatternError as exc:
            what = "a valid" if isinstance(exc, InvalidPattern) else "a bounded-time"
            raise RuleError(
                source,
                _line(fields["pattern"]),
                f"'pattern' is not {what} regular expression: {exc}",
            ) from None
        checks.append((glob, pattern))
    return tuple(checks)


def _verdict(node: yaml.Node, source: str, key: str) -> bool | None:
    raw = _construct(node)
    if isinstance(raw, bool):
        return raw
    if raw == "depends":
        return None
    raise RuleError(source, _line(node), f"{key!r} must be true, false or depends")


def _regex_list(node: yaml.Node | None, source: str, key: str) -> tuple[str, ...]:
    patterns = _text_list(node, source, key)
    for index, pattern in enumerate(patterns):
        try:
            compile_pattern(pattern)  # a bounded matcher: see ctfix/core/pattern.py
        except PatternError as exc:
            what = "a valid" if isinstance(exc, InvalidPattern) else "a bounded-time"
            raise RuleError(
                source, _item_line(node, index),
                f"{key!r} item is not {what} regular expression: {exc}",
            ) from None
    return patterns


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _item_line(node: yaml.Node | None, index: int) -> int | None:
    if node is None:
        return None
    items = getattr(node, "value", None)
    if isinstance(items, list) and index < len(items):
        return _line(items[index])
    return _line(node)


def _construct(node: yaml.Node) -> Any:
    import yaml

    if not isinstance(node, yaml.ScalarNode):
        return node
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _mapping(
    node: yaml.Node, source: str, what: str, required: set[str], allowed: set[str]
) -> dict[str, yaml.Node]:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise RuleError(source, _line(node), f"{what} must be a mapping of keys to values")
    fields: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            raise RuleError(source, _line(key_node), "keys must be plain words")
        if key not in allowed:
            close = _closest(key, allowed)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise RuleError(
                source, _line(key_node),
                f"unknown key {key!r} in {what}{hint}; allowed: {', '.join(sorted(allowed))}",
            )
        if key in fields:
            raise RuleError(
                source, _line(key_node),
                f"key {key!r} given twice (first at line {_line(fields[key])})",
            )
        fields[key] = value_node
    missing = sorted(required - fields.keys())
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise RuleError(source, _line(node), f"{what} lacks required key(s) {names}")
    return fields


def _closest(key: str, allowed: Iterable[str]) -> str | None:
    import difflib

    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return close[0] if close else None


def _scalar(node: yaml.Node, source: str, key: str, kind: type[Any]) -> Any:
    value = _construct(node)
    # bool is an int subclass: a `true` must not pass as the integer 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = {int: "an integer", bool: "true or false", str: "text"}
        raise RuleError(source, _line(node), f"{key!r} must be {names.get(kind, kind.__name__)}")
    return value


def _text(node: yaml.Node, source: str, key: str) -> str:
    value = _construct(node)
    if not isinstance(value, str) or not value.strip():
        raise RuleError(source, _line(node), f"{key!r} must be non-empty text")
    return value


def _optional_text(node: yaml.Node | None, source: str, key: str) -> str:
    if node is None:
        return ""
    value = _construct(node)
    if value is None:  # `key:` with nothing after it
        return ""
    if not isinstance(value, str):
        raise RuleError(source, _line(node), f"{key!r} must be text")
    return value


def _text_list(node: yaml.Node | None, source: str, key: str) -> tuple[str, ...]:
    import yaml

    if node is None:
        return ()
    if not isinstance(node, yaml.SequenceNode):
        raise RuleError(source, _line(node), f"{key!r} must be a list of text items")
    items = []
    for item in node.value:
        value = _construct(item)
        if not isinstance(value, str) or not value:
            raise RuleError(source, _line(item), f"{key!r} must be a list of text items")
        items.append(value)
    return tuple(items)


def _ports(node: yaml.Node, source: str) -> tuple[int, ...]:
    import yaml

    message = "'ports' must be a list of integers 1-65535"
    if not isinstance(node, yaml.SequenceNode):
        raise RuleError(source, _line(node), message)
    ports = []
    for item in node.value:
        value = _construct(item)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise RuleError(source, _line(item), message)
        ports.append(value)
    return tuple(ports)


def _check_url(url: str, source: str, line: int | None, key: str) -> None:
    if not re.match(r"^https?://\S+$", url):
        raise RuleError(source, line, f"{key!r} must be an http(s) URL, got {url!r}")
