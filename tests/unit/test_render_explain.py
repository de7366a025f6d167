"""explain's output: JSON keeps its contract; text and markdown say the key facts."""

from __future__ import annotations

import io
import json
from typing import Any

from ctfix.core.model import (
    ClientNetwork,
    Diagnosis,
    Evidence,
    Fix,
    Listener,
    Reason,
    RuleHit,
    WrongSourceReply,
)
from ctfix.render.explain import explain_document, render_markdown, render_text
from ctfix.render.jsonout import document
from ctfix.render.style import Style


def as_json(d: Diagnosis) -> dict[str, Any]:
    """explain --json as a script reads it from a pipe."""
    parsed: dict[str, Any] = json.loads(document(explain_document(d), io.StringIO()))
    return parsed


BROKEN = Diagnosis(
    port=56789,
    netns="lab-host",
    verdict="broken",
    reasons=(
        Reason(
            "wildcard-socket", "nc (pid 42) listens on 0.0.0.0:56789 (every IPv4 address): ..."
        ),
    ),
    listeners=(Listener("0.0.0.0", 56789, "ipv4", "listening", pid=42, process="nc"),),
    clients=(
        ClientNetwork(
            "192.0.2.0/24",
            ("198.51.100.13",),
            "192.0.2.1",
            False,
            "br0",
            True,
            wrong_for=("198.51.100.13",),
        ),
    ),
    evidence=Evidence(
        (
            WrongSourceReply(
                "192.0.2.3:40000",
                "198.51.100.13:56789",
                "198.51.100.13:56789",
                "192.0.2.1:56789",
                "address",
            ),
        ),
        healthy=3,
    ),
    rules=(
        RuleHit(
            "iptables-legacy",
            "nat",
            "POSTROUTING",
            "-A POSTROUTING -p udp -m udp --sport 56789 -j SNAT --to-source 198.51.100.13:56789",
            "SNAT/MASQUERADE of the reply cannot work alone",
        ),
    ),
    fixes=(
        Fix("pktinfo", "Answer from the request's address.", "ctfix serve ..."),
        Fix("snat-zone", "Rewrite in netfilter.", "ctfix fix 56789 --method snat-zone", True),
    ),
)


def test_json_has_the_stable_keys_of_the_issue() -> None:
    data = as_json(BROKEN)
    assert list(data)[:5] == ["schema", "generated", "host", "ctfix", "netns"]
    assert data["schema"] == 2 and data["generated"].endswith("Z")
    assert {
        "port",
        "netns",
        "verdict",
        "reasons",
        "listeners",
        "clients",
        "evidence",
        "rules",
        "fixes",
    } <= set(data)
    assert {"pid", "process", "address", "port", "family", "state"} <= set(data["listeners"][0])
    assert data["clients"][0] == {
        "network": "192.0.2.0/24",
        "addressed": ["198.51.100.13"],
        "predicted_source": "192.0.2.1",
        "ok": False,
        "interface": "br0",
        "seen": True,
        "onlink": [],
        "answered": [],
        "wrong_for": ["198.51.100.13"],
        "probe": None,
        "egress": None,
        "egress_gateway": None,
        "uplinks": [],
        "services": [],
    }
    assert data["evidence"]["healthy"] == 3
    assert data["evidence"]["wrong_source"][0]["actual_source"] == "192.0.2.1:56789"
    assert set(data["rules"][0]) == {"backend", "table", "chain", "rule", "problem"}
    assert {f["method"] for f in data["fixes"]} == {"pktinfo", "snat-zone"}
    assert data["verdict"] == "broken"
    assert data["reasons"] == [
        {"code": "wildcard-socket", "text": BROKEN.reasons[0].text}
    ]


def test_text_reads_as_a_write_up() -> None:
    text = render_text(BROKEN)
    assert text.startswith("UDP port 56789 in namespace lab-host: BROKEN")
    order = [
        text.index(h)
        for h in (
            "What happens",
            "Why",
            "Sockets on the port",
            "Client networks",
            "Evidence",
            "Netfilter rules",
            "How to fix it",
        )
    ]
    assert order == sorted(order)
    assert "nc (pid 42) listening on 0.0.0.0:56789" in text
    assert (
        "wrong source: 198.51.100.13:56789 answered from 192.0.2.1:56789 (address mismatch): "
        "1 reply to 192.0.2.3:40000" in text
    )
    assert "wrong for 198.51.100.13" in text
    assert "cannot help: SNAT/MASQUERADE" in text
    # The recommended fix comes first.
    assert text.index("[snat-zone]") < text.index("[pktinfo]")
    assert "\033[" not in text  # no colour unless asked


def test_text_colour_only_when_enabled() -> None:
    assert "\033[" in render_text(BROKEN, Style(True))


def test_ok_text_has_no_fix_section() -> None:
    ok = Diagnosis(53, "current", "ok", (Reason("specific-bind", "fine"),))
    text = render_text(ok)
    assert ": OK" in text and "How to fix it" not in text and "Why" not in text


def test_markdown_is_pasteable() -> None:
    md = render_markdown(BROKEN)
    assert md.startswith("## UDP port 56789 (namespace `lab-host`): **BROKEN**")
    assert (
        "| 192.0.2.0/24 | br0 | 198.51.100.13 (seen) | 192.0.2.1 | wrong for 198.51.100.13 |" in md
    )
    assert "**cannot help**" in md and "**snat-zone** *(recommended)*" in md


def test_table_shows_the_gateway_address_clients_may_use() -> None:
    """After a forced policy-route: conntrack shows only the uplink, but the bridge's
    clients may use their gateway, and the table says they get the wrong source."""
    routed = ClientNetwork(
        "192.0.2.0/24",
        ("198.51.100.13",),
        "198.51.100.13",
        False,
        "br0",
        True,
        onlink=("192.0.2.1",),
        wrong_for=("192.0.2.1",),
    )
    d = Diagnosis(56789, "lab-host", "at-risk", (), clients=(routed,))
    [row] = [line for line in render_text(d).splitlines() if line.startswith("  192.0.2.0/24")]
    assert "198.51.100.13 (seen), 192.0.2.1 (on-link)" in row
    assert row.endswith("wrong for 192.0.2.1")
    assert as_json(d)["clients"][0]["onlink"] == ["192.0.2.1"]


def test_every_format_lists_the_fixes_in_the_same_order() -> None:
    """QA2 P8: the JSON listed pktinfo first, the text snat-zone (recommended) first."""
    methods = [f["method"] for f in as_json(BROKEN)["fixes"]]
    text, md = render_text(BROKEN), render_markdown(BROKEN)
    assert methods == ["snat-zone", "pktinfo"]
    assert text.index("[snat-zone]") < text.index("[pktinfo]")
    assert md.index("**snat-zone**") < md.index("**pktinfo**")


def test_markdown_points_to_the_live_view_like_the_text() -> None:
    """QA2 P8: markdown dropped 'live view: ctfix watch'."""
    assert "live view: ctfix watch" in render_text(BROKEN)
    assert "live view: `ctfix watch`" in render_markdown(BROKEN)


def test_an_outage_is_in_the_headline_of_every_format() -> None:
    """QA2 P4: nothing bound, clients unanswered: `jq .verdict` says ok, so the
    headline and the JSON must say what is wrong."""
    down = Diagnosis(
        5302,
        "lab-host",
        "ok",
        (Reason("nothing-answers", "NOTHING ANSWERS: nothing is bound to UDP port 5302 ..."),),
        evidence=Evidence(unanswered=2),
        service_down=True,
    )
    assert render_text(down).splitlines()[0] == (
        "UDP port 5302 in namespace lab-host: OK (no wrong-source replies), but NOTHING "
        "ANSWERS: no socket on the port, 2 requests without a reply"
    )
    assert "NOTHING ANSWERS" in render_markdown(down).splitlines()[0]
    data = as_json(down)
    assert data["service_down"] is True and data["reasons"][0]["code"] == "nothing-answers"

def test_text_fits_the_terminal_width_never_mid_word() -> None:
    """With a width (a terminal's), every line fits, and wrapping only moves whole
    words: the words are those of the unwrapped text (but the client table's, which
    becomes a block per network where its columns do not fit)."""
    import dataclasses

    from ctfix.core.model import ContainerRef

    ctr = ContainerRef(id="a" * 64, name="a-container-with-a-rather-long-name", engine="docker")
    d = dataclasses.replace(
        BROKEN,
        clients=tuple(dataclasses.replace(cn, onlink=("192.0.2.1",)) for cn in BROKEN.clients),
        listeners=(*BROKEN.listeners, Listener("0.0.0.0", 56789, "ipv4", "listening", 7, "socat",
                                               container=ctr)),
        evidence=dataclasses.replace(
            BROKEN.evidence,
            wrong_source=tuple(
                dataclasses.replace(w, container=ctr) for w in BROKEN.evidence.wrong_source
            ),
        ),
    )  # fmt: skip
    wide = render_text(d, width=1000)
    assert "a-container-with-a-rather-long-name" in wide
    def outside_the_table(text: str) -> list[str]:
        before, _, rest = text.partition("Client networks")
        return before.split() + rest.partition("Evidence")[2].split()

    for width in (80, 60):
        text = render_text(d, width=width)
        assert [line for line in text.splitlines() if len(line) > width] == []
        assert outside_the_table(text) == outside_the_table(wide)
        if width == 80:
            assert text.split() == wide.split()
    narrow = render_text(d, width=60)
    assert "192.0.2.0/24: leaves by br0, reply from 192.0.2.1" in narrow
    assert as_json(BROKEN)["service_down"] is False


def test_json_is_compact_on_a_pipe_and_indented_on_a_terminal() -> None:
    """`ip -j -p` habits: a script's pipe gets one line, a person's terminal reads it."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    obj = explain_document(BROKEN)
    piped, shown = document(obj, io.StringIO()), document(obj, Terminal())
    assert piped.count("\n") == 1 and shown.count("\n") > 20
    assert json.loads(piped) == json.loads(shown) == obj
