"""deploy/node-problem-detector/ as node-problem-detector reads it: its custom plugin
monitor's validation rules (a permanent rule's condition among the defaults, a rule's
timeout not above the global one, the plugin's path present in the image), the
message room ctfix check's line fits in, and the DaemonSet that runs it."""

from __future__ import annotations

import json
import pathlib
import re

import yaml

from ctfix.cli import build_parser
from ctfix.render.check import MAX_LINE
from tests.unit.test_deploy_watch import assert_sees_every_namespace

ROOT = pathlib.Path(__file__).parents[2]
DEPLOY = ROOT / "deploy" / "node-problem-detector"
CONFIG = DEPLOY / "ctfix-plugin-monitor.json"


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_the_plugin_config_passes_node_problem_detectors_validation() -> None:
    config = json.loads(CONFIG.read_text())
    assert config["plugin"] == "custom"
    plugin = config["pluginConfig"]
    conditions = {c["type"] for c in config["conditions"]}
    for rule in config["rules"]:
        if rule["type"] == "permanent":
            assert rule["condition"] in conditions
        assert seconds(rule["timeout"]) <= seconds(plugin["timeout"])
    assert seconds(plugin["timeout"]) < seconds(plugin["invoke_interval"])
    # ctfix check's line is never cut: node-problem-detector keeps max_output_length bytes.
    assert plugin["max_output_length"] > MAX_LINE


def test_the_rule_runs_check_on_every_namespace_from_where_the_image_installs_ctfix() -> None:
    [rule] = json.loads(CONFIG.read_text())["rules"]
    assert rule["args"][:2] == ["check", "--all-netns"]
    # Every argument is one ctfix's parser takes (argparse exits on any other).
    parsed = build_parser(rule["args"]).parse_args(rule["args"])
    assert parsed.command == "check" and parsed.all_netns
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    venv = re.search(r"python3 -m venv (\S+);", dockerfile)
    assert venv and rule["path"] == f"{venv.group(1)}/bin/ctfix"
    layered = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{CTFIX_IMAGE\}$", layered, re.MULTILINE)


def test_the_daemonset_mounts_the_config_it_names_and_sees_the_hosts_namespaces() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    [generated] = kustomization["configMapGenerator"]
    assert generated["files"] == [CONFIG.name]
    [daemonset] = [
        doc
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((DEPLOY / name).read_text())
        if doc["kind"] == "DaemonSet"
    ]
    pod = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert_sees_every_namespace(pod, container)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == generated["name"]
    [flag] = [a for a in container["command"] if a.startswith("--config.custom-plugin-monitor=")]
    path = flag.split("=", 1)[1]
    assert path == f"{mounts[config_volume]['mountPath']}/{CONFIG.name}"
