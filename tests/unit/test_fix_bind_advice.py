"""`ctfix fix --method bind` advice, from listeners as sock_diag reports them."""

from __future__ import annotations

from ctfix.commands.fix import _bind_advice
from ctfix.core.model import Diagnosis, Listener
from ctfix.platform import rules_files as rules

PORT = 5353


def _advice(*listeners: Listener) -> str:
    diagnosis = Diagnosis(PORT, "current", "at-risk", (), listeners=listeners)
    return "\n".join(_bind_advice(diagnosis, rules.load()))


def test_a_known_program_gets_its_own_configuration_fix() -> None:
    unbound = Listener(
        "0.0.0.0", PORT, "ipv4", "listening", pid=7, process="unbound", cmdline=("unbound",)
    )
    text = _advice(unbound)
    assert text.startswith("unbound is Unbound")
    assert f"ctfix serve --port {PORT}" in text


def test_a_socket_whose_owner_is_hidden_says_why_it_was_not_matched() -> None:
    hidden = Listener("0.0.0.0", PORT, "ipv4", "listening")  # no pid: not ours to see
    text = _advice(hidden)
    assert "not visible to this user" in text and "run as root" in text


def test_no_socket_says_the_advice_is_generic() -> None:
    assert f"no UDP socket on port {PORT} now" in _advice()
