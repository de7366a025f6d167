"""The snat-zone fix in iptables-legacy (python-iptables) and ipset (the `ipset` tool).

Know before changing, three traps measured on this kernel:
- python-iptables creates any legacy table it opens, and probes (opens) every table
  when it resolves a target name; each operation therefore declares which tables
  exist first (`iptables_legacy.table_class`), like ctfix/platform/netfilter_read.py.
- libxtables keeps one protocol's extensions per process (after IPv4's SNAT is
  loaded, IPv6's cannot be): every libiptc operation runs in a forked child
  (`iptables_legacy.in_child`), which inherits the namespace the command entered.
  A child costs little (python-iptables is imported once, before forking), but a
  snat-zone fix has dozens of rules: reads (`rules_found`) and removals
  (`remove_rules`) take one child per family, not one per rule.
- The kernel cannot unload a legacy table from a live namespace: when the fix needs
  `raw` (for the CT zone) and `raw` was not loaded, an empty `raw` table (ACCEPT
  policies) remains after revert. `tables_created()` tells the caller, who says so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from ctfix.core.model import Family
from ctfix.core.plan import IpsetSpec, IptRuleSpec, Spec, comment
from ctfix.errors import CtfixError, MissingFeatureError, PrivilegeError
from ctfix.platform import iptables_legacy
from ctfix.platform.remedy.marks import AlreadyThere, Marked

# -- ipset ---------------------------------------------------------------------------


def _ipset(*argv: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("ipset") is None:
        raise MissingFeatureError(
            "the `ipset` tool is not installed", "apt-get install ipset (or run scripts/setup)"
        )
    return subprocess.run(["ipset", *argv], capture_output=True, text=True, check=False)


def ipset_names() -> list[str]:
    proc = _ipset("list", "-n")
    if proc.returncode != 0:
        _ipset_error(proc, "listing ipsets")
    return proc.stdout.split()


def _ipset_error(proc: subprocess.CompletedProcess[str], what: str) -> None:
    message = (proc.stderr or proc.stdout).strip().splitlines()
    detail = message[-1] if message else f"status {proc.returncode}"
    if "not permitted" in detail:
        raise PrivilegeError(what)
    if "Kernel error received" in detail or "not supported" in detail:
        raise MissingFeatureError(f"{what}: {detail} (the kernel lacks ip_set support)")
    raise CtfixError(f"{what} failed: {detail}")


def ipset_present(spec: IpsetSpec) -> bool:
    return spec.name in ipset_names()


def create_ipset(spec: IpsetSpec) -> None:
    what = f"creating ipset {spec.name}"
    if ipset_present(spec):
        raise AlreadyThere(f"{what}: it exists already", "see `ipset list -n`")
    family = "inet6" if spec.family == "ipv6" else "inet"
    proc = _ipset(
        "create", spec.name, spec.set_type, "family", family, "timeout", str(spec.timeout)
    )
    if proc.returncode != 0:
        if "already exists" in (proc.stderr or ""):  # made by somebody else meanwhile
            raise AlreadyThere(f"{what}: it exists already", "see `ipset list -n`")
        _ipset_error(proc, what)


def remove_ipset(spec: IpsetSpec) -> bool:
    if not ipset_present(spec):
        return False
    proc = _ipset("destroy", spec.name)
    if proc.returncode != 0:
        _ipset_error(proc, f"destroying ipset {spec.name}")
    return True


# -- iptables-legacy (a child per operation; python-iptables imported once) ---------------


def _iptc(family: Family, creating: str | None = None) -> tuple[Any, Any, Any]:
    """(module, Table class, Rule class) with the table list declared to python-iptables."""
    iptc = iptables_legacy.import_iptc()
    loaded = set(iptables_legacy.loaded_tables(family))
    if creating:
        loaded.add(creating)
    table_class = iptables_legacy.table_class(iptc, family, loaded)
    rule_class: Any = iptc.Rule6 if family == "ipv6" else iptc.Rule
    return iptc, table_class, rule_class


def _build(spec: IptRuleSpec, rule_class: Any) -> Any:
    rule = rule_class()
    rule.protocol = spec.protocol
    if spec.source:
        rule.src = spec.source
    if spec.destination:
        rule.dst = spec.destination
    for ext in spec.matches:
        match = rule.create_match(ext.name)
        for option, value in ext.options:
            match.set_parameter(option, value.split() if " " in value else value)
    target = rule.create_target(spec.target.name)
    for option, value in spec.target.options:
        target.set_parameter(option, value.split() if " " in value else value)
    return rule


def _signature(rule: Any) -> tuple[Any, ...]:
    """What iptables-save would print for the rule, as a comparable value.

    python-iptables' own `==` compares raw target buffers, which differ between a
    freshly parsed SNAT and the kernel's copy; the extensions' save output does not.
    """
    ip = rule.get_ip()

    def saved(part: Any) -> str:
        return iptables_legacy.saved_options(part, ip).strip()

    target = rule.target
    return (
        rule.src,
        rule.dst,
        rule.protocol,
        tuple((m.name, saved(m)) for m in rule.matches),
        target.name if target is not None else "",
        saved(target) if target is not None and target.name else "",
    )


def _located(spec: IptRuleSpec) -> tuple[Any, Any, Any] | None:
    """(table, chain, rule) holding the kernel's copy of the rule, or None."""
    if spec.table not in iptables_legacy.loaded_tables(spec.family):
        return None
    _module, table_class, rule_class = _iptc(spec.family)
    table = table_class(spec.table, autocommit=False)
    table.refresh()
    wanted = _signature(_build(spec, rule_class))
    for chain in table.chains:
        if chain.name != spec.chain:
            continue
        for rule in chain.rules:
            if _signature(rule) == wanted:
                return table, chain, rule
    return None


def _find(spec: IptRuleSpec) -> bool:
    return _located(spec) is not None


def _insert(spec: IptRuleSpec, look: bool) -> None:
    """In a child: refuse when the rule is there already (`look`: it can be, as no
    set it names is missing), else add it. Read, look, change and commit the whole
    table under one hold of the lock `iptables -w` takes, in one child (a child for
    the look and another for the change doubled an apply's cost)."""
    with iptables_legacy.xtables_lock():
        if look and _located(spec) is not None:
            raise AlreadyThere(
                f"the iptables-legacy rule `{spec.table} {spec.chain} ... "
                f"{spec.target.name}` exists already",
                "see `ctfix fix --status`",
            )
        _insert_locked(spec)


def _insert_locked(spec: IptRuleSpec) -> None:
    iptc, table_class, rule_class = _iptc(spec.family, creating=spec.table)
    rule = _build(spec, rule_class)
    table = table_class(spec.table, autocommit=False)
    table.refresh()
    chain = iptc.Chain(table, spec.chain)
    try:
        chain.insert_rule(rule)
        table.commit()
    except iptc.IPTCError as err:
        text = str(err)
        if "Permission" in text or "not permitted" in text:
            raise PrivilegeError("changing iptables-legacy rules") from None
        if "No chain/target/match" in text or "Protocol not available" in text:
            raise MissingFeatureError(
                f"iptables-legacy refused `-j {spec.target.name}` or `-m set`: {text} "
                "(the kernel lacks xt_CT, xt_set or NAT support)"
            ) from None
        raise CtfixError(
            f"adding an iptables-legacy rule to {spec.table} {spec.chain}: {text}"
        ) from None


def _delete_each(specs: list[IptRuleSpec]) -> list[bool | CtfixError]:
    """In a child: remove each rule in turn (False: it was not there), each in its
    own commit, under one hold of the lock `iptables -w` takes. A rule that cannot be
    removed is reported as its error and the others are still removed."""
    outcomes: list[bool | CtfixError] = []
    with iptables_legacy.xtables_lock():
        for spec in specs:
            try:
                outcomes.append(_delete_locked(spec))
            except Exception as err:
                outcomes.append(iptables_legacy.as_ctfix_error(err))
    return outcomes


def _delete_locked(spec: IptRuleSpec) -> bool:
    found = _located(spec)
    if found is None:
        return False
    table, chain, rule = found
    chain.delete_rule(rule)
    table.commit()
    return True


def _sets_named(spec: IptRuleSpec) -> set[str]:
    """The ipsets the rule refers to (`-m set --match-set`, `-j SET --add-set`)."""
    return {
        value.split()[0]
        for ext in (*spec.matches, spec.target)
        for option, value in ext.options
        if option.endswith("-set") and value.split()
    }


def _names_a_missing_set(spec: IptRuleSpec) -> bool:
    """libxtables rejects a rule naming a missing set (ValueError) even to look for
    it; such a rule cannot be in the kernel either (a set in use cannot be destroyed):
    the apply's check before the sets exist, a status or revert after somebody
    destroyed one."""
    named = _sets_named(spec)
    return bool(named) and not named <= set(ipset_names())


def rule_present(spec: IptRuleSpec) -> bool:
    if _names_a_missing_set(spec):
        return False
    return iptables_legacy.in_child(_find, spec)


def _by_family(specs: Sequence[IptRuleSpec], sets: set[str]) -> list[list[int]]:
    """The indexes of the rules that can be in the kernel (every set they name is in
    `sets`), one list per family: what one child does."""
    groups = [
        [i for i, spec in enumerate(specs) if spec.family == family and _sets_named(spec) <= sets]
        for family in ("ipv4", "ipv6")
    ]
    return [group for group in groups if group]


def rules_found(specs: list[IptRuleSpec]) -> list[bool]:
    """`rule_present` for many rules at once: one `ipset list`, one child per family
    that reads each table once (a snat-zone fix for a few ClusterIPs has dozens of
    rules; one child each made --status take a minute on a busy host)."""
    found = [False] * len(specs)
    for wanted in _by_family(specs, set(ipset_names())):
        answers = iptables_legacy.in_child(_find_all, [specs[i] for i in wanted])
        for index, answer in zip(wanted, answers, strict=True):
            found[index] = answer
    return found


def remove_rules(specs: Sequence[IptRuleSpec]) -> list[bool | CtfixError]:
    """`remove_rule` of each rule (False: it was not there; an error: it could not be
    removed, the others still were), with one `ipset list` and one child per family
    (a child per rule made reverting a snat-zone fix take a minute on a busy host).
    The rules of one family are removed in the order given."""
    outcomes: list[bool | CtfixError] = [False] * len(specs)
    sets: set[str] = set()
    if any(_sets_named(spec) for spec in specs):
        try:
            sets = set(ipset_names())
        except CtfixError as err:  # no rule naming a set can be looked for
            for index, spec in enumerate(specs):
                if _sets_named(spec):
                    outcomes[index] = err
    for wanted in _by_family(specs, sets):
        try:
            answers = iptables_legacy.in_child(_delete_each, [specs[i] for i in wanted])
        except CtfixError as err:  # the lock was not had, the child died: none removed
            answers = [err] * len(wanted)
        for index, answer in zip(wanted, answers, strict=True):
            outcomes[index] = answer
    return outcomes


def _find_all(specs: list[IptRuleSpec]) -> list[bool]:
    """In a child: each rule's presence, reading each (table, chain) once."""
    family = specs[0].family
    loaded = set(iptables_legacy.loaded_tables(family))
    _module, table_class, rule_class = _iptc(family)
    chains: dict[tuple[str, str], set[tuple[Any, ...]]] = {}
    found: list[bool] = []
    for spec in specs:
        if spec.table not in loaded:
            found.append(False)
            continue
        key = (spec.table, spec.chain)
        if key not in chains:
            table = table_class(spec.table, autocommit=False)
            table.refresh()
            chains[key] = {
                _signature(rule)
                for chain in table.chains
                if chain.name == spec.chain
                for rule in chain.rules
            }
        found.append(_signature(_build(spec, rule_class)) in chains[key])
    return found


def create_rule(spec: IptRuleSpec) -> None:
    iptables_legacy.in_child(_insert, spec, not _names_a_missing_set(spec))


def remove_rule(spec: IptRuleSpec) -> bool:
    [outcome] = remove_rules([spec])
    if isinstance(outcome, CtfixError):
        raise outcome
    return outcome


def rules_present() -> bool:
    """True when a loaded legacy table (v4 or v6) holds any rule or user chain."""
    return any(
        iptables_legacy.in_child(_holds_rules, family)
        for family in ("ipv4", "ipv6")
        if iptables_legacy.loaded_tables(family)
    )


def nat_rules_present() -> bool:
    return any(
        iptables_legacy.in_child(_holds_rules, family, "nat")
        for family in ("ipv4", "ipv6")
        if "nat" in iptables_legacy.loaded_tables(family)
    )


def _holds_rules(family: Family, only: str | None = None) -> bool:
    _iptc_module, table_class, _rule = _iptc(family)
    for name in iptables_legacy.loaded_tables(family):
        if (only and name != only) or name not in table_class.ALL:
            continue
        table = table_class(name, autocommit=False)
        table.refresh()
        for chain in table.chains:
            if not table.builtin_chain(chain.name) or chain.rules:
                return True
    return False


# -- ctfix's marks (see ctfix/platform/remedy/marks.py) ----------------------------------
# Ours: rules commented `ctfix:<port>`, ipsets named `ctfix-<port>-v4|v6-<n>` (of the
# type and family recorded when made).

_OWN_SET = re.compile(r"ctfix-(\d{1,5})-v[46]-\d+")
_COMMENT = re.compile(r'--comment "?ctfix:(\d{1,5})"?')


def ipset_foreign(spec: IpsetSpec, port: int, made: Mapping[str, Any]) -> str | None:
    del made
    match = _OWN_SET.fullmatch(spec.name)
    if match is None or int(match.group(1)) != port:
        return (
            f"ipset {spec.name} is not ctfix's (its sets for port {port} are "
            f"ctfix-{port}-v4|v6-N)"
        )
    header = _ipset_header(spec.name)
    if header is None:
        return None
    family = "inet6" if spec.family == "ipv6" else "inet"
    if header != (spec.set_type, family):
        return (
            f"ipset {spec.name} is a {header[0]} set of family {header[1]}, not the "
            f"{spec.set_type} {family} set ctfix made"
        )
    return None


def _ipset_header(name: str) -> tuple[str, str] | None:
    """(type, family) of the ipset, or None when there is no such set."""
    if name not in ipset_names():
        return None
    proc = _ipset("list", "-t", name)
    if proc.returncode != 0:
        return None
    fields = dict(line.partition(": ")[::2] for line in proc.stdout.splitlines())
    words = fields.get("Header", "").split()
    family = words[words.index("family") + 1] if "family" in words[:-1] else ""
    return fields.get("Type", ""), family


def rule_foreign(spec: IptRuleSpec, port: int, made: Mapping[str, Any]) -> str | None:
    del made
    if any(
        ext.name == "comment" and ("comment", comment(port)) in ext.options for ext in spec.matches
    ):
        return None
    return (
        f"the iptables rule `{spec.table} {spec.chain} ... -j {spec.target.name}` does not "
        f"carry ctfix's comment {comment(port)}"
    )


def _key(signature: tuple[Any, ...]) -> str:
    return json.dumps(signature)


def _comment_port(rule: Any) -> int | None:
    ip = rule.get_ip()
    for match in rule.matches:
        if match.name == "comment":
            found = _COMMENT.search(iptables_legacy.saved_options(match, ip))
            if found:
                return int(found.group(1))
    return None


def _marked_rules(
    family: Family, recorded: list[IptRuleSpec]
) -> list[tuple[int, str, str, str, str]]:
    """In a child: (port, table, chain, key, description) of every rule commented
    `ctfix:<port>` that none of the recorded specs is."""
    _module, table_class, rule_class = _iptc(family)
    explained = set()
    for spec in recorded:
        try:
            explained.add(_key(_signature(_build(spec, rule_class))))
        except Exception:  # names a set that is gone: such a rule cannot be loaded
            continue
    found = []
    for name in iptables_legacy.loaded_tables(family):
        if name not in table_class.ALL:
            continue
        table = table_class(name, autocommit=False)
        table.refresh()
        for chain in table.chains:
            for rule in chain.rules:
                port = _comment_port(rule)
                key = _key(_signature(rule))
                if port is None or key in explained:
                    continue
                target = rule.target
                action = target.name + iptables_legacy.saved_options(target, rule.get_ip())
                text = f"{family} {name} {chain.name} rule `{comment(port)}` -j {action}"
                found.append((port, name, chain.name, key, text))
    return found


def _delete_marked(family: Family, table_name: str, chain_name: str, key: str, port: int) -> bool:
    with iptables_legacy.xtables_lock():
        if table_name not in iptables_legacy.loaded_tables(family):
            return False
        _module, table_class, _rule = _iptc(family)
        table = table_class(table_name, autocommit=False)
        table.refresh()
        for chain in table.chains:
            if chain.name != chain_name:
                continue
            for rule in chain.rules:
                if _comment_port(rule) == port and _key(_signature(rule)) == key:
                    chain.delete_rule(rule)
                    table.commit()
                    return True
    return False


def unrecorded(recorded: Sequence[tuple[int, Spec]]) -> list[Marked]:
    found = []
    try:
        names = ipset_names()
    except MissingFeatureError:
        names = []
    sets = {spec.name for _port, spec in recorded if isinstance(spec, IpsetSpec)}
    for name in names:
        match = _OWN_SET.fullmatch(name)
        if match is not None and name not in sets:
            found.append(Marked(int(match.group(1)), "ipset", f"ipset {name}", (name,)))
    for family in ("ipv4", "ipv6"):
        if not iptables_legacy.loaded_tables(family):
            continue
        specs = [s for _p, s in recorded if isinstance(s, IptRuleSpec) and s.family == family]
        for port, table, chain, key, text in iptables_legacy.in_child(
            _marked_rules, family, specs
        ):
            found.append(Marked(port, "iptables-rule", text, (family, table, chain, key)))
    return found


def remove_marked(marked: Marked) -> bool:
    if marked.kind == "ipset":
        [name] = marked.key
        match = _OWN_SET.fullmatch(name)
        if match is None or int(match.group(1)) != marked.port:
            return False
        return remove_ipset(IpsetSpec(name, "ipv4"))
    family, table, chain, key = marked.key
    return iptables_legacy.in_child(_delete_marked, family, table, chain, key, marked.port)
