"""Issue 13: text fits an 80-column terminal everywhere (QA F3, F7): every command's
--help, scan's rows and write-ups, watch's headings, summary and stderr notes, fix's
dry run and bind advice. Words are never lost: only the lines differ."""

from __future__ import annotations

import argparse
import io

import pytest

from ctfix.cli import COMMANDS, build_parser
from ctfix.core.detectors.wrong_source import WrongSourceFinding
from ctfix.core.model import ClientNetwork, Diagnosis, Evidence, Listener, Reason, WrongSourceReply
from ctfix.core.netns_scan import NamespaceScan
from ctfix.core.plan import make_plan
from ctfix.render import fix as render_fix
from ctfix.render import scan, scan_all
from ctfix.render.status import Console
from ctfix.render.watch import WatchRenderer, summary_record
from ctfix.render.width import fit_lines, reflow

COLUMNS = 80
PORT = 5353
SOCAT = Listener("0.0.0.0", PORT, "ipv4", "listening", pid=22402, process="socat")
LONG_NETNS = "ctfix-0e3038d4-host-with-a-rather-long-name-as-kubernetes-makes-them"
# Reason texts as long as explain's real ones (the QA report's socat on the lab host).
BROKEN = Diagnosis(
    port=PORT,
    netns=LONG_NETNS,
    verdict="broken",
    reasons=(
        Reason(
            "wildcard-socket",
            "socat (pid 22402) listens on 0.0.0.0:5353 (every IPv4 address): it does not "
            "choose the source of its replies, so the kernel picks it by routing toward "
            "the client, whatever address the client sent to.",
        ),
        Reason(
            "wrong-source-seen",
            "Conntrack shows wrong-source replies: 198.51.100.13:5353 answered from "
            "192.0.2.1:5353 (address mismatch): 2 replies to 2 clients in 192.0.2.0/24. "
            "A connect()ed client drops such a reply.",
        ),
    ),
    listeners=(SOCAT,),
    clients=(
        ClientNetwork(
            "192.0.2.0/24",
            ("198.51.100.13", "192.0.2.1"),
            "192.0.2.1",
            False,
            "br0",
            True,
            wrong_for=("198.51.100.13",),
        ),
        # a client table too wide for 80 columns even without its status column
        ClientNetwork(
            "2001:db8:1::/64",
            ("2001:db8:1::1", "2001:db8:2::13", "2001:db8:3::10"),
            "2001:db8:1::1",
            False,
            "br0",
            False,
            wrong_for=("2001:db8:2::13", "2001:db8:3::10"),
        ),
    ),
    evidence=Evidence(
        (
            WrongSourceReply(
                "192.0.2.3:40000",
                "198.51.100.13:5353",
                "198.51.100.13:5353",
                "192.0.2.1:5353",
                "address",
            ),
        ),
        healthy=1,
    ),
    local_addresses=("192.0.2.1", "198.51.100.13"),
)
OK = Diagnosis(
    53,
    LONG_NETNS,
    "ok",
    (
        Reason(
            "observed-right-source",
            "dnsmasq (pid 7) answers requests from 192.0.2.0/24 to 198.51.100.13 from "
            "198.51.100.13, where routing would answer from 192.0.2.1, in conntrack.",
        ),
    ),
    listeners=(Listener("0.0.0.0", 53, "ipv4", "listening", pid=7, process="dnsmasq"),),
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _over(text: str, width: int = COLUMNS) -> list[str]:
    return [line for line in text.splitlines() if len(line) > width]


def _helps() -> dict[str, str]:
    parser = build_parser([], every_command=True)
    helps = {"ctfix": parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                helps[name] = sub.format_help()
    return helps


def test_every_help_fits_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(COLUMNS))
    helps = _helps()
    assert set(helps) == {"ctfix", *COMMANDS}
    for name, text in helps.items():
        assert not _over(text), (name, _over(text))


def test_help_on_a_narrow_terminal_is_reflowed_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    wide = _helps()
    monkeypatch.setenv("COLUMNS", "60")
    narrow = _helps()
    for name, text in narrow.items():
        # only what cannot be broken may stick out: a word, a usage group `[--x Y]`
        for line in _over(text, 60):
            word = line.strip()
            assert " " not in word or (word[0], word[-1]) == ("[", "]"), (name, line)
        # the same words (argparse orders a wrapped usage its own way: compared apart)
        body, wide_body = text.split("\n\n", 1)[1], wide[name].split("\n\n", 1)[1]
        assert body.split() == wide_body.split(), name


def test_reflow_keeps_two_columns_and_leaves_what_fits_alone() -> None:
    text = (
        "examples:\n"
        "  ctfix lab              the bug and its fix in throwaway namespaces, shown step "
        "by step\n"
        "  ctfix scan             short\n"
        "\n"
        "exit status:\n"
        "  0  ok        the port is fine and this comment is long enough to need a second\n"
        "               line of its own\n"
    )
    out = reflow(text, 60)
    assert not _over(out, 60) and out.split() == text.split()
    lines = out.splitlines()
    assert lines[2] == " " * 25 + "namespaces, shown step by step"  # under its column
    assert "  ctfix scan             short" in lines
    assert reflow(text, 200) == text.rstrip("\n")


def test_scan_rows_and_write_ups_fit_a_terminal_and_a_pipe_keeps_one_row_each() -> None:
    text = scan.render_text([BROKEN, OK], LONG_NETNS, stamp="2026-12-01T20:00:00Z (UTC) on vm, "
                            "ctfix 0.1.0", width=COLUMNS)
    assert not _over(text), _over(text)
    rows = [line for line in text.splitlines() if line.startswith(("  BROKEN", "  OK"))]
    assert len(rows) == 2 and rows[0].endswith("...")  # cut on purpose: the write-up says all
    piped = scan.render_text([BROKEN, OK], LONG_NETNS)
    assert _over(piped)  # no width: one line per port, for grep
    scans = [NamespaceScan(LONG_NETNS, LONG_NETNS, "ip-netns", 3, None, (BROKEN, OK))]
    everywhere = scan_all.render_text(scans, stamp="stamp", width=COLUMNS)
    assert not _over(everywhere), _over(everywhere)


def test_watch_heading_summary_and_notes_fit_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(COLUMNS))
    monkeypatch.setenv("NO_COLOR", "1")
    stream = _Terminal()
    renderer = WatchRenderer(stream, json_lines=False, netns="ctfix-0e3038d4-host", tagged=True)
    renderer.started = 1_790_000_000.0
    finding = WrongSourceFinding(
        family="ipv4",
        proto="udp",
        client="192.0.2.3:40000",
        service="198.51.100.13:5353",
        expected_source="198.51.100.13:5353",
        actual_source="192.0.2.1:5353",
        mismatch="address",
        local=True,
        confirmed=False,
        count=1,
        first_seen=1_789_999_000.0,
        last_seen=1_789_999_001.0,
        client_network="192.0.2.0/24",
        existing=True,
    )
    renderer.existing([finding])
    renderer.summary(
        summary_record(
            events=12345, new_flows=678, lost=0, resyncs=1, findings=3, existing=2,
            tracking={"ipv4": True, "ipv6": False}, unanswered=6, hidden=1,
        )
    )
    assert not _over(stream.getvalue()), stream.getvalue()
    assert "summary:" in stream.getvalue()
    errors = _Terminal()
    Console(errors, status=False).note(
        f"watching namespace {LONG_NETNS} for wrong-source UDP replies, stale NAT and "
        "unanswered requests"
    )
    assert not _over(errors.getvalue()) and len(errors.getvalue().splitlines()) > 1
    piped = io.StringIO()
    monkeypatch.delenv("COLUMNS")
    Console(piped, status=False).note("x " * 60)
    assert len(piped.getvalue().splitlines()) == 1  # a pipe: one line, for grep


def test_fix_dry_run_and_bind_advice_fit_except_the_commands_themselves() -> None:
    plan = make_plan(BROKEN, "snat-zone", "nftables")
    apply_with = f"ctfix fix {PORT} --method snat-zone --netns {LONG_NETNS} --apply"
    text = render_fix.plan_text(plan, LONG_NETNS, apply_with, COLUMNS)
    commands = {
        line.strip() for step in plan.steps for c in step.commands for line in c.splitlines()
    } | {apply_with}
    assert [line for line in _over(text) if line.strip() not in commands] == []
    assert any(len(line) > COLUMNS for line in plan.steps[0].summary.splitlines())
    assert apply_with in text.splitlines()[-1]  # a command is never broken
    advice = (
        "socat is socat (UDP-RECVFROM / UDP-LISTEN): Bind the address clients use with "
        "`bind=ADDRESS` (one socat per address when clients use several), or replace it.",
        "    socat UDP4-RECVFROM:5353,bind=198.51.100.13,fork EXEC:cat",
    )
    bind = render_fix.plan_text(make_plan(BROKEN, "bind", advice=advice), LONG_NETNS, None, 80)
    assert not _over(bind) and "      socat UDP4-RECVFROM:5353,bind=198.51.100.13" in bind


def test_a_report_reflowed_for_a_terminal_keeps_its_shape_and_words() -> None:
    """fix's reports (--apply, --status, --revert) go through fit_lines: a line each."""
    report = (
        f"ctfix fix --status (netns {LONG_NETNS}, /run/ctfix/fix/netns-cookie-119388.json):\n"
        "  port 5353: snat-zone via nftables, applied\n"
        "    [done   ] present table inet ctfix_5353\n"
        "    effect: no wrong-source reply since the fix was applied 6 s ago (conntrack time "
        "left: a wrong-source reply stays in the table 30 s after its last packet)\n"
    )
    shown = fit_lines(report, COLUMNS)
    assert not _over(shown) and shown.split() == report.split()
    lines = shown.splitlines()
    assert lines[1].startswith("    ") and not lines[1].startswith("     ")  # under it
    assert "    [done   ] present table inet ctfix_5353" in lines
