"""Conntrack health as Prometheus metrics, and the alert rules that query them.

The exposition is parsed back with prometheus-client's own parser; the rules are
checked by `promtool check rules` and exercised by `promtool test rules`
(tests/unit/fixtures/prometheus/conntrack-health.test.yaml: each alert fires on what
it names, none on a healthy table), with promtool from scripts/setup.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ctfix.core.ctstats import CpuStats
from ctfix.core.health import COUNTERS, Sample
from ctfix.platform.health_metrics import REFRESH_SECONDS, ConntrackHealthCollector
from ctfix.platform.metrics import WatchMetrics

ROOT = pathlib.Path(__file__).parents[2]
RULES = ROOT / "deploy" / "prometheus" / "ctfix-watch-rules.yaml"
RULE_TESTS = ROOT / "tests" / "unit" / "fixtures" / "prometheus" / "conntrack-health.test.yaml"
RUNBOOK = ROOT / "docs" / "runbooks" / "conntrack-health.md"
RUNBOOK_BASE = "https://github.com/ctfix/ctfix/blob/main/"

READING = Sample(
    taken=0.0,
    cpus=(
        CpuStats(0, {name: 1 for name in COUNTERS} | {"insert_failed": 3}),
        CpuStats(1, {name: 2 for name in COUNTERS if name != "chain_toolong"}),
    ),
    entries=203,
    max_entries=262144,
)


def _scrape(collector: ConntrackHealthCollector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels == {"netns": "ns1"}
            values[sample.name] = sample.value
    return values


def test_exposition_names_follow_prometheus_conventions_and_sum_over_cpus() -> None:
    readings = iter([READING])
    collector = ConntrackHealthCollector("ns1", read=lambda: next(readings))
    collector.refresh(now=100.0)
    values = _scrape(collector)
    assert values["ctfix_conntrack_entries"] == 203
    assert values["ctfix_conntrack_max"] == 262144
    assert values["ctfix_conntrack_insert_failed_total"] == 3 + 2
    assert values["ctfix_conntrack_drop_total"] == 1 + 2
    # chain_toolong was reported by CPU 0 only: its sum is CPU 0's.
    assert values["ctfix_conntrack_chain_toolong_total"] == 1
    assert set(values) == {"ctfix_conntrack_entries", "ctfix_conntrack_max"} | {
        f"ctfix_conntrack_{name}_total" for name in COUNTERS
    }


def test_a_counter_the_kernel_does_not_report_is_not_exported() -> None:
    old = Sample(0.0, (CpuStats(0, {"drop": 4}),), 1, 10)
    collector = ConntrackHealthCollector("ns1", read=lambda: old)
    collector.refresh(now=1.0)
    values = _scrape(collector)
    assert values["ctfix_conntrack_drop_total"] == 4
    assert "ctfix_conntrack_clash_resolve_total" not in values


def test_readings_are_rate_limited_and_a_failed_one_keeps_the_last() -> None:
    calls: list[float] = []

    def read() -> Sample:
        calls.append(0.0)
        if len(calls) == 2:
            raise OSError("netlink went away")
        return READING

    collector = ConntrackHealthCollector("ns1", read=read)
    collector.refresh(now=10.0)
    collector.refresh(now=10.0 + REFRESH_SECONDS / 2)
    assert len(calls) == 1
    collector.refresh(now=10.0 + REFRESH_SECONDS)
    assert len(calls) == 2
    assert collector.latest is READING
    assert _scrape(collector)["ctfix_conntrack_entries"] == 203


def test_before_the_first_reading_a_scrape_has_no_conntrack_samples() -> None:
    collector = ConntrackHealthCollector("ns1", read=lambda: READING)
    assert _scrape(collector) == {}


def test_watch_metrics_register_the_conntrack_collector() -> None:
    # No HTTP server in a unit test (a fixed port on the machine collides with any
    # other run): only the registry matters here.
    from tests.unit.test_prometheus_rules import NoServer

    metrics = WatchMetrics(NoServer(), "ns1")
    metrics.conntrack._read = lambda: READING
    metrics.update({}, pending=0, findings=0)
    text = generate_latest(metrics.registry).decode()
    assert 'ctfix_conntrack_insert_failed_total{netns="ns1"} 5.0' in text
    assert 'ctfix_watch_pending_flows{netns="ns1"} 0.0' in text


# -- the alert rules ----------------------------------------------------------------------


def _health_group() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    [group] = [g for g in groups if g["name"] == "ctfix-conntrack-health"]
    rules: list[dict[str, object]] = group["rules"]
    return rules


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_health_alerts_cover_fill_insert_failed_and_drops_with_runbook_links() -> None:
    rules = _health_group()
    exprs = {str(rule["alert"]): str(rule["expr"]) for rule in rules}
    assert set(exprs) == {
        "CtfixConntrackTableNearlyFull",
        "CtfixConntrackInsertFailed",
        "CtfixConntrackDropping",
    }
    assert "0.85" in exprs["CtfixConntrackTableNearlyFull"]
    anchors = _anchors(RUNBOOK.read_text())
    for rule in rules:
        assert isinstance(rule["labels"], dict) and rule["labels"]["severity"] in ("warning",)
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["summary"] and annotations["description"]
        url = str(annotations["runbook_url"])
        assert url.startswith(RUNBOOK_BASE)
        path, _, anchor = url.removeprefix(RUNBOOK_BASE).partition("#")
        assert (ROOT / path) == RUNBOOK
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in {path}"


def test_health_alerts_query_only_metrics_watch_exports() -> None:
    exported = {"ctfix_conntrack_entries", "ctfix_conntrack_max"} | {
        f"ctfix_conntrack_{name}_total" for name in COUNTERS
    }
    for rule in _health_group():
        used = set(re.findall(r"ctfix_conntrack_\w+", str(rule["expr"])))
        assert used and used <= exported, rule["alert"]


def _promtool() -> str:
    local = pathlib.Path(sys.executable).parent / "promtool"
    found = str(local) if local.exists() else shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing: scripts/setup extracts it into .venv/bin")
    return found


@pytest.mark.parametrize(
    "argv",
    [["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]],
    ids=["check", "test"],
)
def test_promtool_accepts_and_exercises_the_rules(argv: list[str]) -> None:
    proc = subprocess.run([_promtool(), *argv], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
