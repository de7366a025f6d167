"""Metrics by Prometheus conventions: one alert-name prefix, a runbook for every alert
(which exists and starts with what to do first), `ctfix_build_info`, and a bounded
number of series for the per-finding metric; the watch alerts exercised by
`promtool test rules` (tests/unit/fixtures/prometheus/ctfix-watch.test.yaml)."""

from __future__ import annotations

import pathlib
import platform
import re
import subprocess

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ctfix import __version__
from ctfix.core.detectors.stale_nat import StaleNatFinding
from ctfix.core.detectors.unanswered import UnansweredFinding, UnansweredReason
from ctfix.core.detectors.wrong_source import WrongSourceFinding
from ctfix.platform.metric_conventions import OTHER, SERIES_LIMIT, LabelCap
from ctfix.platform.metrics import WatchMetrics
from tests.unit.no_server import NoServer
from tests.unit.test_conntrack_metrics import _anchors, _promtool

ROOT = pathlib.Path(__file__).parents[2]
RULES = ROOT / "deploy" / "prometheus" / "ctfix-watch-rules.yaml"
WATCH_TESTS = ROOT / "tests" / "unit" / "fixtures" / "prometheus" / "ctfix-watch.test.yaml"
RUNBOOK_BASE = "https://github.com/ctfix/ctfix/blob/main/"
PREFIX = "Ctfix"


def alerts() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_the_prefix_a_severity_and_a_runbook_that_exists() -> None:
    rules = alerts()
    assert len(rules) >= 6
    for rule in rules:
        name = str(rule["alert"])
        assert re.fullmatch(rf"{PREFIX}[A-Z][A-Za-z]+", name), name
        labels = rule["labels"]
        assert isinstance(labels, dict) and labels["severity"] in ("info", "warning", "critical")
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["summary"] and annotations["description"], name
        url = str(annotations["runbook_url"])
        assert url.startswith(RUNBOOK_BASE), name
        path, _, anchor = url.removeprefix(RUNBOOK_BASE).partition("#")
        runbook = ROOT / path
        assert runbook.parent == ROOT / "docs" / "runbooks" and runbook.exists(), name
        assert anchor in _anchors(runbook.read_text()), f"{name}: no #{anchor} in {path}"


def test_every_runbook_starts_with_what_to_do_first() -> None:
    for runbook in sorted((ROOT / "docs" / "runbooks").glob("*.md")):
        headings = re.findall(r"^## (.+)$", runbook.read_text(), re.MULTILINE)
        assert headings and headings[0] == "Do this first", runbook.name


def test_the_readme_names_every_alert() -> None:
    readme = (ROOT / "README.md").read_text()
    for rule in alerts():
        assert f"`{rule['alert']}`" in readme


def finding(index: int) -> WrongSourceFinding:
    return WrongSourceFinding(
        family="ipv4",
        proto="udp",
        client=f"192.0.2.{index % 250}:4000",
        service=f"198.51.100.13:{1000 + index}",
        expected_source=f"198.51.100.13:{1000 + index}",
        actual_source=f"192.0.2.1:{1000 + index}",
        mismatch="address",
        local=True,
        confirmed=False,
        count=1,
        first_seen=0.0,
        last_seen=0.0,
        client_network="192.0.2.0/24",
    )


def test_label_cap_keeps_the_first_sets_and_folds_the_rest_into_other() -> None:
    cap = LabelCap(limit=2)
    assert cap.admit(("a", "1")) == ("a", "1")
    assert cap.admit(("b", "2")) == ("b", "2")
    assert cap.admit(("c", "3")) == (OTHER, OTHER)
    assert cap.admit(("a", "1")) == ("a", "1")  # a kept set stays itself
    assert cap.folded == 1


def test_watch_metrics_have_build_info_and_a_bounded_number_of_finding_series() -> None:
    metrics = WatchMetrics(NoServer(), "ns1")
    extra = 37
    for index in range(SERIES_LIMIT + extra):
        metrics.finding(finding(index))
    metrics.finding(finding(0))  # a kept series goes on counting
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [build] = families["ctfix_build_info"].samples
    assert build.value == 1
    assert build.labels == {"version": __version__, "python": platform.python_version()}
    wrong = [
        s for s in families["ctfix_watch_wrong_source_replies"].samples if s.name.endswith("_total")
    ]
    assert len(wrong) == SERIES_LIMIT + 1
    other = [s for s in wrong if s.labels["service"] == OTHER]
    assert [s.value for s in other] == [extra]
    assert all(set(s.labels.values()) == {"ns1", OTHER} for s in other)
    assert sum(s.value for s in wrong) == SERIES_LIMIT + extra + 1


def test_promtool_exercises_the_watch_alerts() -> None:
    proc = subprocess.run(
        [_promtool(), "test", "rules", str(WATCH_TESTS)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def unanswered(index: int, reason: UnansweredReason = "no-socket", one_way: bool = False) -> (
    UnansweredFinding
):
    return UnansweredFinding(
        family="ipv4",
        proto="udp",
        service=f"198.51.100.13:{2000 + index}",
        reason=reason,
        flows=1,
        clients=1,
        first_seen=0.0,
        last_seen=0.0,
        client="192.0.2.3:4000",
        one_way=one_way,
    )


def _samples(metrics: WatchMetrics, name: str) -> list[Sample]:
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return [s for s in families[name].samples if not s.name.endswith("_created")]


def test_unanswered_requests_are_counted_per_service_and_reason_with_one_way_apart() -> None:
    """The counter an alert can read without one-way services: beyond the cap only the
    service becomes "other"; reason and one_way stay what they were (QA F24)."""
    metrics = WatchMetrics(NoServer(), "ns1")
    for index in range(SERIES_LIMIT):
        metrics.unanswered_request(unanswered(index))
    metrics.unanswered_request(unanswered(0))  # a kept series goes on counting
    metrics.unanswered_request(unanswered(SERIES_LIMIT, "no-reply", one_way=True))
    metrics.unanswered_request(unanswered(SERIES_LIMIT + 1, "no-reply", one_way=True))
    metrics.unanswered_request(unanswered(SERIES_LIMIT + 2, "stale-nat"))
    samples = _samples(metrics, "ctfix_watch_unanswered_requests")
    assert len(samples) == SERIES_LIMIT + 2
    other = {(s.labels["reason"], s.labels["one_way"]): s.value for s in samples
             if s.labels["service"] == OTHER}
    assert other == {("no-reply", "true"): 2, ("stale-nat", "false"): 1}
    [first] = [s for s in samples if s.labels["service"] == "198.51.100.13:2000"]
    assert (first.labels["reason"], first.labels["one_way"], first.value) == (
        "no-socket", "false", 2
    )


def stale(service: str, target: str, entries: int) -> StaleNatFinding:
    return StaleNatFinding(
        family="ipv4",
        proto="udp",
        service=service,
        stale_target=target,
        current_targets=("198.51.100.22:5140",),
        why="rule-changed",
        clients=entries,
        entries=entries,
        first_seen=0.0,
        last_seen=0.0,
        existing=False,
    )


def test_the_stale_nat_gauge_is_what_is_stale_now_and_goes_with_its_namespace() -> None:
    metrics = WatchMetrics(NoServer())
    ns1 = metrics.namespace("ns1")
    a = stale("198.51.100.13:5140", "198.51.100.21:5140", 3)
    ns1.update({}, pending=0, findings=0, stale=[a])
    ns1.unanswered_request(unanswered(1))
    assert [(s.labels["stale_target"], s.value) for s in _samples(
        metrics, "ctfix_watch_stale_nat_entries"
    )] == [("198.51.100.21:5140", 3)]
    ns1.update({}, pending=0, findings=0, stale=[])  # flushed, or expired
    assert [s.value for s in _samples(metrics, "ctfix_watch_stale_nat_entries")] == [0]
    metrics.forget("ns1")
    assert _samples(metrics, "ctfix_watch_stale_nat_entries") == []
    assert _samples(metrics, "ctfix_watch_unanswered_requests") == []
