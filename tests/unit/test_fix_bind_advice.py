"""`ctfix fix --method bind` advice, from listeners as sock_diag reports them."""

from __future__ import annotations

from ctfix.commands.fix import _bind_advice
from ctfix.core.model import Diagnosis, Listener
from ctfix.core.snippet import SnippetValues
from ctfix.platform import rules_files as rules

PORT = 1194
#: this host's addresses (not the knowledge base's lab examples)
HERE = SnippetValues(PORT, ("203.0.113.40", "2001:db8:77::40"), ("203.0.113.0/24",), ("eth7",))


def _advice(*listeners: Listener, values: SnippetValues = HERE) -> str:
    diagnosis = Diagnosis(PORT, "current", "at-risk", (), listeners=listeners)
    return "\n".join(_bind_advice(diagnosis, rules.load(), values))


def test_a_known_program_gets_its_own_configuration_fix() -> None:
    unbound = Listener(
        "0.0.0.0", PORT, "ipv4", "listening", pid=7, process="unbound", cmdline=("unbound",)
    )
    text = _advice(unbound)
    assert text.startswith("Unbound")  # not "unbound is Unbound"
    assert f"ctfix serve --port {PORT}" in text


def test_a_snippet_is_filled_in_with_this_port_and_addresses_not_the_labs() -> None:
    """QA F20: the knowledge base's socat lines said port 5353 and the lab's addresses;
    and "socat is socat (...)" named the program twice."""
    socat = Listener(
        "::", PORT, "ipv6", "listening", pid=8, process="socat",
        cmdline=("socat", f"UDP6-RECVFROM:{PORT},fork", "EXEC:cat"),
    )
    text = _advice(socat)
    assert "socat is socat" not in text
    assert f"socat UDP4-RECVFROM:{PORT},bind=203.0.113.40,fork EXEC:cat" in text
    assert f"socat UDP6-RECVFROM:{PORT},bind=[2001:db8:77::40],fork EXEC:cat" in text
    for lab in ("5353", "198.51.100.13", "192.0.2.1"):
        assert lab not in text
    # Nothing known of the host: the placeholders stay, for the reader to fill.
    bare = _advice(socat, values=SnippetValues(PORT))
    assert f"socat UDP4-RECVFROM:{PORT},bind=ADDRESS4,fork EXEC:cat" in bare


def test_a_socket_whose_owner_is_hidden_says_why_it_was_not_matched() -> None:
    hidden = Listener("0.0.0.0", PORT, "ipv4", "listening")  # no pid: not ours to see
    text = _advice(hidden)
    assert "not visible to this user" in text and "run as root" in text


def test_no_socket_says_the_advice_is_generic() -> None:
    assert f"no UDP socket on port {PORT} now" in _advice()
