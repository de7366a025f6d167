"""The knowledge base: every built-in file loads, matching finds the right service, and
each kind of mistake in a rules file is reported as `file:line: what is wrong`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ctfix.core import rules
from ctfix.core.rules import RuleError, parse
from ctfix.platform import rules_files
from ctfix.platform.rules_files import load

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
    files = sorted(rules_files.builtin_dir().glob("*.yaml"))
    assert files, "rules/ has no YAML files"
    sources = {rule.source for rule in kb.entries}
    assert sources == {f"rules/{path.name}" for path in files}
    for rule in kb.entries:
        assert rule.reference.startswith(("https://", "http://"))
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


REQUIRED_SERVICES = {
    # id: verdict for a wildcard listener (None = depends on its configuration)
    "dnsmasq": False,
    "unbound": None,
    "bind9": False,
    "coredns": False,
    "pdns-recursor": False,
    "chrony": False,
    "ntpd": False,
    "snmpd": None,
    "openvpn": None,
    "freeradius": False,
    "coturn": True,
    "kamailio": True,
    "asterisk": True,
    "tftpd-hpa": False,
    "atftpd": False,
    "socat": True,
    "netcat-openbsd": True,
    "netcat-traditional": True,
    "knot": False,
    "knot-resolver": True,
    "nsd": True,
    "pdns-server": False,
    "dnsdist": False,
    "avahi-daemon": True,
    "openntpd": False,
    "memcached": True,
    "isc-dhcp-server": True,
    "kea-dhcp4": False,
    "strongswan": False,
    "rsyslog": False,
    "syslog-ng": False,
    "statsd": False,
    "wireguard": False,
    "consul": True,
    "krb5kdc": False,
}


def test_every_required_service_is_known_with_its_verdict() -> None:
    kb = load()
    verdicts = {rule_id: kb.get(rule_id) for rule_id in REQUIRED_SERVICES}
    missing = [rule_id for rule_id, rule in verdicts.items() if rule is None]
    assert not missing
    for rule_id, expected in REQUIRED_SERVICES.items():
        rule = kb.get(rule_id)
        assert rule is not None
        assert rule.affected_when_wildcard is expected, rule_id


def test_process_names_fit_in_comm() -> None:
    # /proc/PID/comm shows 15 characters: a longer built-in name could never match.
    for rule in load().entries:
        for name in rule.processes:
            assert len(name) <= 15, f"{rule.id}: {name!r} is longer than comm can show"


@pytest.mark.parametrize(
    ("comm", "cmdline", "port", "expected"),
    [
        ("chronyd", ("/usr/sbin/chronyd", "-F", "1"), 123, "chrony"),
        ("ntpd", ("/usr/sbin/ntpd", "-p", "/run/ntpd.pid"), 123, "ntpd"),
        ("pdns_recursor", ("/usr/sbin/pdns_recursor",), 53, "pdns-recursor"),
        ("in.tftpd", ("/usr/sbin/in.tftpd", "--listen"), 69, "tftpd-hpa"),
        ("turnserver", ("/usr/bin/turnserver", "-c", "/etc/turnserver.conf"), 3478, "coturn"),
        ("krb5kdc", ("/usr/sbin/krb5kdc", "-P", "/run/krb5kdc.pid"), 88, "krb5kdc"),
        ("openvpn", ("/usr/sbin/openvpn", "--config", "server.conf"), 1194, "openvpn"),
        ("node", ("node", "/opt/statsd/stats.js", "/etc/statsd/config.js"), 8125, "statsd"),
    ],
)
def test_builtin_services_are_recognised(
    comm: str, cmdline: tuple[str, ...], port: int, expected: str
) -> None:
    match = load().match(comm, cmdline, port)
    assert match is not None and match.rule.id == expected
    assert not match.port_only


def test_kernel_wireguard_socket_is_recognised_by_port_only() -> None:
    # The kernel's WireGuard socket has no process: only the port can hint at it.
    match = load().match(None, (), 51820)
    assert match is not None and match.rule.id == "wireguard" and match.port_only


def test_tftp_servers_are_marked_as_replying_from_another_port() -> None:
    kb = load()
    marked = {rule.id for rule in kb.entries if rule.replies_from_other_port}
    assert marked == {"tftpd-hpa", "atftpd"}


def test_one_way_services_are_marked_and_never_affected() -> None:
    kb = load()
    one_way = {rule.id for rule in kb.entries if rule.one_way}
    assert one_way == {"rsyslog", "syslog-ng", "statsd"}
    for rule in kb.entries:
        assert not rule.one_way or rule.affected() is False, rule.id


def test_at_least_thirty_services() -> None:
    assert len(load().entries) >= 30


@pytest.mark.parametrize(
    ("comm", "exe", "cmdline", "expected"),
    [
        # Debian's `nc` is an alternatives link: comm says nc, the executable says which.
        ("nc", "/usr/bin/nc.openbsd", ("nc", "-u", "-l", "5353"), "netcat-openbsd"),
        ("nc", "/usr/bin/nc.traditional", ("nc", "-u", "-l", "-p", "5353"), "netcat-traditional"),
        # NSD renames its processes; its executable and argv[0] still say nsd.
        ("nsd: main", "/usr/sbin/nsd", ("nsd: main",), "nsd"),
        # openntpd and NTPsec are both comm "ntpd": the command line tells them apart.
        ("ntpd", "/usr/sbin/ntpd", ("ntpd: ntp engine",), "openntpd"),
        ("ntpd", "/usr/sbin/ntpd", ("/usr/sbin/ntpd", "-p", "/run/ntpd.pid", "-g"), "ntpd"),
        ("atftpd", "/usr/sbin/atftpd", ("/usr/sbin/atftpd", "--daemon"), "atftpd"),
    ],
)
def test_process_identity_beats_the_port(
    comm: str, exe: str, cmdline: tuple[str, ...], expected: str
) -> None:
    match = load().match(comm, cmdline, 123, exe=exe)
    assert match is not None and match.rule.id == expected and match.matched_by == "process"


def test_comm_nc_alone_is_not_a_netcat_match() -> None:
    # Without the executable (another user's process) "nc" could be either netcat.
    assert load().match("nc", ("nc", "-ul", "40000"), 40000) is None


def test_port_69_alone_names_no_tftp_server() -> None:
    # atftpd and tftpd-hpa share the port: an unknown program there is neither.
    assert load().match("mytftpd", ("mytftpd",), 69) is None


def test_openvpn_multihome_on_the_command_line_settles_the_verdict() -> None:
    openvpn = load().get("openvpn")
    assert openvpn is not None
    assert openvpn.affected("ipv4", ("openvpn", "--config", "s.conf")) is None
    assert openvpn.affected("ipv4", ("openvpn", "--config", "s.conf", "--multihome")) is False
    # A longer option that merely starts with the word does not count.
    assert openvpn.affected("ipv4", ("openvpn", "--multihomed-thing")) is None


def test_snmpd_verdict_depends_on_the_family() -> None:
    snmpd = load().get("snmpd")
    assert snmpd is not None
    assert snmpd.affected("ipv4") is False
    assert snmpd.affected("ipv6") is True
    assert snmpd.affected() is None


def test_unbound_fix_names_its_options() -> None:
    unbound = load().get("unbound")
    assert unbound is not None
    assert "interface-automatic: yes" in unbound.snippet
    assert "interface:" in unbound.snippet


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


def test_unknown_family_in_affected_by_family(tmp_path: Path) -> None:
    text = GOOD_ENTRY + "    affected_by_family:\n      ipv5: true\n"
    message = error_for(tmp_path, text)
    assert "bad.yaml:16: unknown key 'ipv5' in 'affected_by_family'" in message
    assert message.endswith("allowed: ipv4, ipv6")


def test_bad_fixed_if_cmdline_regex(tmp_path: Path) -> None:
    text = GOOD_ENTRY + "    fixed_if_cmdline: ['ok', '[']\n"
    message = error_for(tmp_path, text)
    assert "bad.yaml:15: 'fixed_if_cmdline' item is not a valid regular expression" in message


def test_reference_must_be_a_url(tmp_path: Path) -> None:
    text = GOOD_ENTRY.replace("https://example.org/myservice", "see the man page")
    message = error_for(tmp_path, text)
    assert message.endswith(
        "bad.yaml:13: 'reference' must be an http(s) URL, got 'see the man page'"
    )


def test_rule_error_is_a_ctfix_error() -> None:
    from ctfix.errors import CtfixError

    assert issubclass(RuleError, CtfixError)


def test_a_rules_directory_without_rules_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a rule\n")
    with pytest.raises(rules.RuleError) as err:
        rules_files.load([tmp_path])
    assert "no rules (*.yaml or *.yml files)" in str(err.value)


def test_new_optional_fields_are_validated() -> None:
    base = (
        "version: 1\nservices:\n  - id: x\n    name: X\n    ports: [40000]\n"
        "    why: w\n    fix: f\n    reference: https://example.org/x\n    confidence: low\n"
    )
    rule = parse(base + '    affected_when_wildcard: false\n    one_way: true\n'
                 '    fixed_in: "2.10"\n', "x.yaml")[0]
    assert rule.one_way and rule.fixed_in == "2.10"
    assert "2.10 or later" in rule.upgrade_advice()
    with pytest.raises(RuleError, match=r"x\.yaml:11: 'fixed_in' must be a quoted version"):
        parse(base + "    affected_when_wildcard: true\n    fixed_in: 2.10\n", "x.yaml")
    with pytest.raises(RuleError, match="one_way service never replies"):
        parse(base + "    affected_when_wildcard: true\n    one_way: true\n", "x.yaml")
    # A first-reply caveat belongs to a program that otherwise answers right.
    first = "    wrong_first_reply: true\n"
    caveat = parse(base + "    affected_when_wildcard: false\n" + first, "x.yaml")
    assert caveat[0].wrong_first_reply
    with pytest.raises(RuleError, match="'wrong_first_reply' is a caveat"):
        parse(base + "    affected_when_wildcard: true\n    wrong_first_reply: true\n", "x.yaml")
