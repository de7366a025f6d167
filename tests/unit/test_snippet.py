"""Knowledge-base snippets filled in for this host (QA F20): the port and the
addresses clients use, never the lab's examples printed as this host's commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ctfix.core.diagnosis.advice import fixes_for
from ctfix.core.model import ClientNetwork, Uplink
from ctfix.core.snippet import SnippetValues, check, render, values
from ctfix.platform import rules_files
from tests.unit.test_rules import GOOD_ENTRY, error_for

HERE = SnippetValues(
    1194, ("203.0.113.40", "2001:db8:77::40"), ("203.0.113.0/24",), ("eth7",)
)
#: the lab's addresses and ports the built-in snippets used to hard-code
LAB = re.compile(r"\b(192\.0\.2\.\d+|198\.51\.100\.13|2001:db8:[12]::\w+|5353|br0|eth0)\b")


def test_each_placeholder_is_filled_per_value_or_once() -> None:
    text = render(
        "port {port}\nbind={address4}\nbind=[{address6}]\nlisten {endpoint}\n"
        "all {addresses}\nallow {network}\nallow-from={networks}\nvia {interface}\n",
        HERE,
    )
    assert text == (
        "port 1194\nbind=203.0.113.40\nbind=[2001:db8:77::40]\n"
        "listen 203.0.113.40:1194\nlisten [2001:db8:77::40]:1194\n"
        "all 203.0.113.40 2001:db8:77::40\nallow 203.0.113.0/24\n"
        "allow-from=203.0.113.0/24\nvia eth7\n"
    )


def test_a_block_is_written_once_per_address_and_the_configs_braces_stay() -> None:
    text = render(
        "{for address}\nlisten {\n  ipaddr = {address}\n  port = {port}\n}\n{end}\n"
        'bind = "{{ GetInterfaceIP \\"x\\" }}"\n',
        replace_addresses(HERE, ("203.0.113.40", "203.0.113.41")),
    )
    assert text.count("listen {") == 2
    assert "ipaddr = 203.0.113.40\n  port = 1194" in text
    assert "ipaddr = 203.0.113.41" in text
    assert '{{ GetInterfaceIP \\"x\\" }}' in text


def replace_addresses(filled: SnippetValues, addresses: tuple[str, ...]) -> SnippetValues:
    return SnippetValues(filled.port, addresses, filled.networks, filled.interfaces)


def test_a_family_without_clients_gets_no_line_and_nothing_known_stays_a_placeholder() -> None:
    only4 = replace_addresses(HERE, ("203.0.113.40",))
    assert render("a {address4}\nb [{address6}]\n", only4) == "a 203.0.113.40\n"
    assert render("a {address4}\nb {address}\n", SnippetValues(53)) == "a ADDRESS4\nb ADDRESS\n"


def test_values_drop_loopback_link_local_and_duplicates() -> None:
    found = values(53, ["127.0.0.1", "fe80::1", "192.0.2.9", "192.0.2.9", "::1", "x"])
    assert found.addresses == ("192.0.2.9",)


@pytest.mark.parametrize(
    ("snippet", "words"),
    [
        ("bind={adress}", "unknown placeholder {adress}"),
        ("{for address}\nx", "without '{end}'"),
        ("{end}", "without '{for address}'"),
        ("{address4} {address6}", "one line repeats for one placeholder"),
    ],
)
def test_a_placeholder_ctfix_cannot_fill_is_refused(snippet: str, words: str) -> None:
    wrong = check(snippet)
    assert wrong is not None and words in wrong[1]


def test_a_rules_file_with_a_typo_in_a_placeholder_names_its_line(tmp_path: Path) -> None:
    bad = GOOD_ENTRY.replace("listen = 192.0.2.1", "listen = 192.0.2.1\n      bind {adress}")
    message = error_for(tmp_path, bad)
    assert message.startswith(f"{tmp_path / 'user' / 'bad.yaml'}:13:"), message
    assert "{adress}" in message


def test_no_builtin_snippet_prints_the_labs_addresses_or_an_unfilled_placeholder() -> None:
    for rule in rules_files.load().entries:
        assert check(rule.snippet) is None, rule.id
        text = render(rule.snippet, HERE)
        assert not LAB.search(text), f"{rule.id}: {LAB.search(text)}"
        assert not re.search(r"\{(port|address\w*|endpoint|networks?|interface)\}", text)


def test_explain_fills_the_snippet_says_the_fix_once_and_two_uplinks_need_a_source_rule() -> None:
    """QA F20: explain's [bind] printed the knowledge base's fix sentence twice, the
    lab's port and addresses, and on a two-uplink host not the source-routing note."""
    socat = rules_files.load().get("socat")
    assert socat is not None
    wan2 = Uplink("192.0.2.13", "wan2", "192.0.2.0/24", "192.0.2.1",
                  "default via 192.0.2.1 dev wan2", True, ok=False, source_routed=False)
    client = ClientNetwork(
        "203.0.113.0/24", ("192.0.2.13",), "198.51.100.13", False, "wan1", True,
        egress="wan1", egress_gateway="198.51.100.1", uplinks=(wan2,),
    )
    [bind] = [f for f in fixes_for(1194, "broken", [client], socat, []) if f.method == "bind"]
    first = socat.fix.strip().split(". ")[0]
    assert (bind.summary + bind.detail).count(first) == 1
    assert "socat UDP4-RECVFROM:1194,bind=192.0.2.13,fork EXEC:cat" in bind.detail
    assert "5353" not in bind.detail and "198.51.100.13," not in bind.detail
    assert "source rule per uplink" in bind.detail
