"""`ctfix check`'s pure parts and its contract: the worst problem first, unknown only
when something could not be read, one line of at most 79 bytes, exit 0/1/2 (every
error is unknown, with its line on stdout)."""

from __future__ import annotations

import argparse
import json

import pytest

from ctfix.commands import check as command
from ctfix.core.check import PROBLEM_KINDS, judge
from ctfix.core.ctstats import CpuStats
from ctfix.core.health import Sample, assess
from ctfix.core.model import ClientNetwork, Diagnosis, Evidence, Reason, WrongSourceReply
from ctfix.core.netns_scan import NamespaceScan
from ctfix.errors import CtfixError
from ctfix.render.check import MAX_LINE, error_line, fit, line

LONG = "kube-system/coredns-5d78c9869d-abcde-with-a-very-long-generated-suffix-0123456789"


def scan(
    netns: str,
    *diagnoses: Diagnosis,
    fill: int | None = None,
    skipped: str | None = None,
    gone: bool = False,
    health_error: str | None = None,
) -> NamespaceScan:
    health = None
    if fill is not None:
        health = assess(Sample(0.0, (CpuStats(0, {"drop": 0}),), fill, 100))
    return NamespaceScan(
        netns, netns, "ip-netns", hash(netns), None, diagnoses, health, skipped, gone, health_error
    )


def broken(port: int, netns: str) -> Diagnosis:
    wrong = WrongSourceReply(
        client="192.0.2.3:40000",
        service=f"198.51.100.13:{port}",
        expected_source=f"198.51.100.13:{port}",
        actual_source=f"192.0.2.1:{port}",
        mismatch="address",
    )
    reasons = (Reason("wrong-source-seen", "seen"),)
    return Diagnosis(port, netns, "broken", reasons, evidence=Evidence(wrong_source=(wrong,)))


def at_risk(port: int, netns: str) -> Diagnosis:
    exposed = ClientNetwork("192.0.2.0/24", ("192.0.2.1", "198.51.100.13"), "192.0.2.1", ok=False)
    reasons = (Reason("client-network-exposed", "exposed"),)
    return Diagnosis(port, netns, "at-risk", reasons, clients=(exposed,))


def ok(port: int, netns: str) -> Diagnosis:
    return Diagnosis(port, netns, "ok", (Reason("specific-bind", "bound"),))


def test_nothing_wrong_is_ok_and_says_what_was_checked() -> None:
    result = judge([scan("host", ok(53, "host"), fill=10), scan("web", fill=20)])
    assert (result.status, result.services, result.namespaces) == ("ok", 1, 2)
    assert result.fill == 20
    assert line(result).startswith("OK:")


def test_the_worst_comes_first_a_full_table_before_a_wrong_source() -> None:
    scans = [
        scan("a", at_risk(53, "a"), fill=10),
        scan("b", broken(5353, "b"), fill=10),
        scan("c", fill=100),
        scan("d", fill=90),
    ]
    result = judge(scans)
    assert result.status == "problem"
    kinds = [(p.kind, p.netns) for p in result.problems]
    assert kinds == [
        ("conntrack-table-full", "c"),
        ("wrong-source", "b"),
        ("conntrack-table-nearly-full", "d"),
        ("at-risk", "a"),
    ]
    assert [k for k, _ns in kinds] == sorted((k for k, _ns in kinds), key=PROBLEM_KINDS.index)
    # The line names the worst: where, how full; and how many more there are.
    worst = line(result)
    assert " c " in worst and "100%" in worst and worst.endswith("(+3 more)")
    wrong = line(judge(scans[:2]))
    assert wrong.startswith("UDP 5353 in b:") and "198.51.100.13 -> 192.0.2.1" in wrong
    risk = line(judge(scans[:1]))
    assert risk.startswith("UDP 53 in a:") and "192.0.2.0/24" in risk
    # Only what was observed, when asked: the prediction is no problem then.
    assert judge(scans[:1], at_risk=False).status == "ok"
    assert [p.kind for p in judge(scans[:2], at_risk=False).problems] == ["wrong-source"]


def test_unknown_only_when_something_could_not_be_read_and_nothing_is_wrong() -> None:
    gone = scan("gone", skipped="gone during the scan", gone=True)
    unreadable = scan("locked", skipped="entering network namespace locked needs CAP_SYS_ADMIN")
    blind = scan("blind", health_error="ctnetlink is not available")
    assert judge([scan("host", fill=1), gone]).status == "ok"
    assert judge([scan("host", fill=1), gone]).namespaces == 1
    result = judge([scan("host", fill=1), unreadable, blind])
    assert result.status == "unknown"
    assert line(result).startswith("unknown: locked ")
    assert judge([unreadable, scan("b", broken(53, "b"))]).status == "problem"


def test_a_service_ctfix_cannot_see_is_unknown_never_ok() -> None:
    """Blindness (conntrack tracks nothing there) is not a clean bill: unknown, unless a
    problem was seen elsewhere."""
    blind = Diagnosis(53, "web", "unknown", (Reason("not-tracked", "not tracked"),))
    result = judge([scan("host", ok(53, "host"), fill=1), scan("web", blind, fill=1)])
    assert result.status == "unknown"
    assert "web" in line(result)
    assert judge([scan("web", blind), scan("b", broken(53, "b"))]).status == "problem"


@pytest.mark.parametrize("label", [LONG, "ns", "名前空間-" * 20, "x" * 300])
def test_every_line_fits_what_node_problem_detector_keeps(label: str) -> None:
    for result in (
        judge([scan(label, broken(65535, label)), scan("b", broken(1, "b"))]),
        judge([scan(label, fill=99)]),
        judge([scan(label, skipped="x" * 200)]),
        judge([scan(label, ok(53, label), fill=3)]),
    ):
        text = line(result, single=label if result.status == "ok" else None)
        assert len(text.encode()) <= MAX_LINE < 80, text
        assert "\n" not in text
        text.encode().decode()  # never cut inside a character


def test_a_long_namespace_is_shortened_in_its_middle_before_the_addresses_go() -> None:
    text = line(judge([scan(LONG, broken(5353, LONG))]))
    assert text.startswith("UDP 5353 in kube-sys") and text.endswith("198.51.100.13 -> 192.0.2.1")
    assert "..." in text


def test_the_namespace_is_shortened_before_the_count_of_others_goes() -> None:
    """QA F8: an `ip netns` name of 19 characters lost "(+3 more)", and the Node
    condition read as if this were the only problem."""
    label = "ctfix-69723a62-host"
    problems = [scan(label, broken(56789, label))] + [
        scan(f"b{i}", broken(i, f"b{i}")) for i in range(1, 4)
    ]
    text = line(judge(problems))
    assert text.endswith(" (+3 more)") and len(text.encode()) <= MAX_LINE, text
    assert "198.51.100.13 -> 192.0.2.1" in text  # the addresses stay too
    assert "ctfix-" in text and "-host:" in text and "..." in text and label not in text

    def make(label: str) -> str:
        return f"UDP 1 in {label}: x"

    # a label too long to make room at MIN_LABEL: the count goes, the label shortened
    squeezed = fit(make, "n" * 60, " (+2 more)", limit=30)
    assert "..." in squeezed and "more" not in squeezed and len(squeezed) == 30
    shortened = fit(make, "n" * 60, " (+2 more)")
    assert shortened.endswith(": x (+2 more)") and "..." in shortened and len(shortened) == 79
    assert fit(make, "n", " (+2 more)") == make("n") + " (+2 more)"
    assert error_line("e" * 200).endswith("...") and len(error_line("e" * 200)) == MAX_LINE


def args(**kw: object) -> argparse.Namespace:
    defaults: dict[str, object] = {
        "netns": None,
        "all_netns": False,
        "json": False,
        "rules": [],
        "ignore_at_risk": False,
    }
    return argparse.Namespace(**{**defaults, **kw})


@pytest.mark.parametrize(
    ("failure", "start"),
    [
        (CtfixError("reading conntrack needs CAP_NET_ADMIN", "run as root"), "unknown: reading"),
        (ZeroDivisionError("boom"), "unknown: internal error: ZeroDivisionError"),
    ],
)
def test_every_error_is_unknown_with_its_line_on_stdout(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: Exception,
    start: str,
) -> None:
    def fails(_args: argparse.Namespace) -> None:
        raise failure

    monkeypatch.setattr(command, "_judge", fails)
    assert command.run(args()) == 2
    out = capsys.readouterr().out
    [only] = out.splitlines()
    assert only.startswith(start) and len(only.encode()) <= MAX_LINE
    assert command.run(args(json=True)) == 2
    document = json.loads(capsys.readouterr().out)
    assert document["status"] == "unknown" and document["schema"] == 2


@pytest.mark.parametrize(("scans", "status"), [([], 0), (["broken"], 1), (["locked"], 2)])
def test_the_status_is_the_plugin_contracts(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    scans: list[str],
    status: int,
) -> None:
    made = {
        "broken": scan("b", broken(53, "b"), fill=1),
        "locked": scan("locked", skipped="no"),
    }
    result = judge([scan("host", fill=1), *(made[name] for name in scans)])
    monkeypatch.setattr(command, "_judge", lambda _args: (result, None))
    assert command.run(args()) == status
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_contradicting_options_are_unknown_before_anything_is_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert command.run(args(all_netns=True, netns="blue")) == 2
    [only] = capsys.readouterr().out.splitlines()
    assert only.startswith("unknown: --all-netns")


def test_an_at_risk_line_leaves_out_its_client_network_before_the_count_of_others() -> None:
    """QA re-check of F8: an at-risk problem in a 19-character namespace filled the line
    with "for 192.0.2.0/24" and "(+1 more)" went; the client network goes first."""
    label = "ctfix-69723a62-host"
    problems = [scan(label, at_risk(5353, label)), scan("b1", at_risk(1, "b1"))]
    text = line(judge(problems))
    assert text.endswith(" (+1 more)") and len(text.encode()) <= MAX_LINE, text
    assert "at risk" in text and "5353" in text
    # with room for it, the network is said
    alone = line(judge([scan("h", at_risk(5353, "h"))]))
    assert " for " in alone and "more" not in alone
