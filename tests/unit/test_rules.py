"""The knowledge base: every built-in file loads, matching finds the right service, and
each kind of mistake in a rules file is reported as `file:line: what is wrong`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ctfix.core import rules
from ctfix.core.rules import RuleError, load

GOOD_ENTRY = """\
version: 1
services:
  - id: myservice
    name: My service
    processes: [myserviced]
    cmdline_patterns: ['myservice\\.jar']
    ports: [40000]
    affected_when_wildcard: true
    why: it replies with sendto from a wildcard socket
    fix: bind each address
    snippet: |
      listen = 192.0.2.1
    reference: https://example.org/myservice
    confidence: low
"""


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_for(tmp_path: Path, text: str, name: str = "bad.yaml") -> str:
    directory = tmp_path / "user"
    write(directory, name, text)
    with pytest.raises(RuleError) as exc:
        load([directory], builtin=False)
    return exc.value.message


# -- the built-in knowledge base ---------------------------------------------------------


def test_every_builtin_file_loads_and_names_its_source() -> None:
    kb = load()
    files = sorted(rules.builtin_dir().glob("*.yaml"))
    assert files, "rules/ has no YAML files"
    sources = {rule.source for rule in kb.entries}
    assert sources == {f"rules/{path.name}" for path in files}
    for rule in kb.entries:
        assert rule.reference.startswith("https://")
        assert rule.why and rule.fix
        # A "depends" verdict must say on what, and an affected one must show the fix.
        if rule.affected_when_wildcard is not False:
            assert rule.snippet.strip(), f"{rule.id} is (or may be) affected but has no snippet"


@pytest.mark.parametrize(
    ("comm", "expected"),
    [("dnsmasq", "dnsmasq"), ("unbound", "unbound"), ("named", "bind9")],
)
def test_builtin_services_are_recognised_by_process_name(comm: str, expected: str) -> None:
    match = load().match(comm, (), 53)
    assert match is not None
    assert match.rule.id == expected
    assert match.matched_by == "process"
    assert not match.port_only


def test_port_shared_by_several_servers_is_no_hint() -> None:
    # netcat on port 53 is not "probably unbound": five DNS servers claim that port.
    assert load().match("nc", ("nc", "-ul", "53"), 53) is None


def test_builtin_verdicts_for_dns() -> None:
    kb = load()
    dnsmasq, unbound, named = kb.get("dnsmasq"), kb.get("unbound"), kb.get("bind9")
    assert dnsmasq is not None and dnsmasq.affected_when_wildcard is False
    assert unbound is not None and unbound.affected_when_wildcard is None
    assert "interface-automatic: yes" in unbound.snippet
    assert named is not None and named.affected_when_wildcard is False


# -- matching -----------------------------------------------------------------------------


@pytest.fixture
def user_kb(tmp_path: Path) -> rules.KnowledgeBase:
    write(tmp_path / "user", "mine.yaml", GOOD_ENTRY)
    return load([tmp_path / "user"], builtin=False)


def test_match_by_process(user_kb: rules.KnowledgeBase) -> None:
    match = user_kb.match("myserviced", (), 1)
    assert match is not None and match.rule.id == "myservice" and match.matched_by == "process"


def test_match_by_comm_truncated_to_15_characters(tmp_path: Path) -> None:
    write(tmp_path / "u", "long.yaml", GOOD_ENTRY.replace("[myserviced]", "[averylongdaemonname]"))
    kb = load([tmp_path / "u"], builtin=False)
    # The kernel shows only the first 15 characters in /proc/PID/comm.
    match = kb.match("averylongdaemon", (), 1)
    assert match is not None and match.rule.id == "myservice"


def test_match_by_argv0_when_comm_is_unknown(user_kb: rules.KnowledgeBase) -> None:
    match = user_kb.match(None, ("/opt/my/bin/myserviced", "-f"), 1)
    assert match is not None and match.matched_by == "process"


def test_match_by_cmdline(user_kb: rules.KnowledgeBase) -> None:
    match = user_kb.match("java", ("java", "-jar", "/opt/myservice.jar"), 1)
    assert match is not None and match.rule.id == "myservice" and match.matched_by == "cmdline"


def test_match_by_port_is_flagged_as_weak(user_kb: rules.KnowledgeBase) -> None:
    match = user_kb.match("nc", ("nc", "-ul", "40000"), 40000)
    assert match is not None and match.rule.id == "myservice"
    assert match.port_only


def test_no_match(user_kb: rules.KnowledgeBase) -> None:
    assert user_kb.match("nc", ("nc", "-ul", "9"), 9) is None


# -- user directories ---------------------------------------------------------------------


def test_user_entry_overrides_builtin_with_the_same_id(tmp_path: Path) -> None:
    override = GOOD_ENTRY.replace("id: myservice", "id: unbound").replace(
        "[myserviced]", "[unbound]"
    )
    write(tmp_path / "user", "unbound.yaml", override)
    kb = load([tmp_path / "user"])
    unbound = kb.get("unbound")
    assert unbound is not None
    assert unbound.source == f"{tmp_path / 'user'}/unbound.yaml"
    assert unbound.affected_when_wildcard is True
    assert [rule.id for rule in kb.entries].count("unbound") == 1
    match = kb.match("unbound", (), 53)
    assert match is not None and match.rule is unbound
    assert kb.get("dnsmasq") is not None  # the other built-ins stay


def test_user_entry_wins_matching_over_builtin_with_the_same_process(tmp_path: Path) -> None:
    write(tmp_path / "user", "x.yaml", GOOD_ENTRY.replace("[myserviced]", "[dnsmasq]"))
    match = load([tmp_path / "user"]).match("dnsmasq", (), 53)
    assert match is not None and match.rule.id == "myservice"


def test_missing_rules_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match=r"/nope: no such rules directory"):
        load([tmp_path / "nope"])


def test_rules_argument_must_be_a_directory(tmp_path: Path) -> None:
    path = write(tmp_path, "file.yaml", GOOD_ENTRY)
    with pytest.raises(RuleError, match="expects a directory"):
        load([path])


# -- errors name file:line ----------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    message = error_for(tmp_path, GOOD_ENTRY.replace("fix: bind each address", "fix: [oops"))
    # The unclosed `[` on line 10 is noticed where the scanner meets the next key.
    assert message == f"{tmp_path / 'user'}/bad.yaml:11: YAML: expected ',' or ']', but got ':'"


def test_bad_port_names_its_line(tmp_path: Path) -> None:
    message = error_for(tmp_path, GOOD_ENTRY.replace("ports: [40000]", "ports: [40000, 70000]"))
    assert message == (
        f"{tmp_path / 'user'}/bad.yaml:7: 'ports' must be a list of integers 1-65535"
    )


def test_port_as_text_is_rejected(tmp_path: Path) -> None:
    message = error_for(tmp_path, GOOD_ENTRY.replace("ports: [40000]", "ports: ['53']"))
    assert message.endswith("bad.yaml:7: 'ports' must be a list of integers 1-65535")


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    message = error_for(tmp_path, GOOD_ENTRY.replace("    processes:", "    proceses:"))
    assert message.startswith(f"{tmp_path / 'user'}/bad.yaml:5: unknown key 'proceses'")
    assert "did you mean 'processes'" in message


def test_missing_required_key_names_the_entry_line(tmp_path: Path) -> None:
    text = GOOD_ENTRY.replace("    reference: https://example.org/myservice\n", "")
    message = error_for(tmp_path, text)
    assert message.endswith("bad.yaml:3: a service entry lacks required key(s) 'reference'")


def test_duplicate_ids_name_both_places(tmp_path: Path) -> None:
    directory = tmp_path / "user"
    write(directory, "a.yaml", GOOD_ENTRY)
    write(directory, "b.yaml", GOOD_ENTRY)
    with pytest.raises(RuleError) as exc:
        load([directory], builtin=False)
    assert exc.value.message == (
        f"{directory}/b.yaml:3: duplicate id 'myservice' (first defined at {directory}/a.yaml:3)"
    )


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    text = GOOD_ENTRY.replace("    fix: bind", "    why: again\n    fix: bind")
    message = error_for(tmp_path, text)
    assert message.endswith("bad.yaml:10: key 'why' given twice (first at line 9)")


def test_bad_verdict_value(tmp_path: Path) -> None:
    text = GOOD_ENTRY.replace("affected_when_wildcard: true", "affected_when_wildcard: maybe")
    message = error_for(tmp_path, text)
    assert message.endswith("bad.yaml:8: 'affected_when_wildcard' must be true, false or depends")


def test_depends_verdict_loads_as_none(tmp_path: Path) -> None:
    write(
        tmp_path / "u",
        "d.yaml",
        GOOD_ENTRY.replace("affected_when_wildcard: true", "affected_when_wildcard: depends"),
    )
    rule = load([tmp_path / "u"], builtin=False).get("myservice")
    assert rule is not None and rule.affected_when_wildcard is None


def test_bad_regex_names_its_line(tmp_path: Path) -> None:
    message = error_for(tmp_path, GOOD_ENTRY.replace("['myservice\\.jar']", "['(unclosed']"))
    assert "bad.yaml:6: 'cmdline_patterns' item is not a valid regular expression" in message


def test_wrong_version_and_empty_file(tmp_path: Path) -> None:
    assert error_for(tmp_path, GOOD_ENTRY.replace("version: 1", "version: 2")).endswith(
        "bad.yaml:1: 'version' must be 1, not 2"
    )
    assert "bad.yaml:1: empty file" in error_for(tmp_path, "# nothing here\n", name="bad.yaml")


def test_entry_must_be_a_mapping(tmp_path: Path) -> None:
    message = error_for(tmp_path, "version: 1\nservices:\n  - just a string\n")
    assert message.endswith("bad.yaml:3: a service entry must be a mapping of keys to values")


def test_replies_from_other_port_must_be_boolean(tmp_path: Path) -> None:
    text = GOOD_ENTRY + "    replies_from_other_port: sometimes\n"
    message = error_for(tmp_path, text)
    assert message.endswith("bad.yaml:15: 'replies_from_other_port' must be true or false")


def test_rule_error_is_a_ctfix_error() -> None:
    from ctfix.errors import CtfixError

    assert issubclass(RuleError, CtfixError)
