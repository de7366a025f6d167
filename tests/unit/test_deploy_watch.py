"""deploy/kubernetes/ctfix-watch-daemonset.yaml as Kubernetes reads it: it runs
`ctfix watch --all-netns` (QA F6: the pods' own namespaces were never watched) with
what that needs, each for a reason the file states: the node's processes (hostPID),
setns (SYS_ADMIN), other users' /proc entries (SYS_PTRACE, and no AppArmor profile
that refuses them), and the namespaces only a bind mount holds (/run/netns, with
mounts made later propagated). tests/netns/test_image.py runs the image with the same
settings and sees a finding in another namespace."""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

from ctfix.cli import build_parser

ROOT = pathlib.Path(__file__).parents[2]
DAEMONSET = ROOT / "deploy" / "kubernetes" / "ctfix-watch-daemonset.yaml"
#: what --all-netns needs beyond conntrack's NET_ADMIN (the file's header says why)
ALL_NETNS_CAPABILITIES = {"NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}


def watch_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    """The DaemonSet's pod spec and its one container."""
    daemonset = yaml.safe_load(DAEMONSET.read_text())
    assert daemonset["kind"] == "DaemonSet"
    pod: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return pod, container


def assert_sees_every_namespace(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """The node's processes and its /run/netns, with mounts made later propagated."""
    assert pod["hostPID"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    [netns] = [m for m in container["volumeMounts"] if m["mountPath"] == "/run/netns"]
    assert netns["mountPropagation"] == "HostToContainer"
    assert volumes[netns["name"]]["hostPath"]["path"] == "/run/netns"


def test_the_daemonset_watches_every_namespace_of_the_node() -> None:
    pod, container = watch_pod()
    args = [a.replace("$(NODE_IP)", "192.0.2.1") for a in container["args"]]
    parsed = build_parser(["watch"]).parse_args(args)  # argparse exits on a bad one
    assert parsed.command == "watch" and parsed.all_netns and parsed.json
    assert parsed.metrics == "192.0.2.1:9464"
    assert "$(NODE_IP)" in "".join(container["args"])
    assert {e["name"] for e in container["env"]} >= {"NODE_IP"}
    assert pod["hostNetwork"] is True  # the node's own namespace, and metrics on its address
    assert_sees_every_namespace(pod, container)


def test_the_daemonset_grants_what_all_netns_needs_and_no_privileged_mode() -> None:
    _pod, container = watch_pod()
    security = container["securityContext"]
    assert security["privileged"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == ALL_NETNS_CAPABILITIES
    assert security["appArmorProfile"] == {"type": "Unconfined"}
