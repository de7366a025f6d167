"""deploy/Dockerfile, built offline with a real Docker engine in the lab's host
namespace, and the image's `ctfix watch` finding a wrong-source reply there; run as
deploy/kubernetes' DaemonSet runs it, in another namespace too.

The engine's namespace has no route out, so the build uses what scripts/setup made
on the host: a debootstrap'ed Debian base (docker import) and the dependencies'
wheels; ctfix's own wheel is built here from the working tree. One build per run
(the slow part: a few minutes on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctfix.lab.fleet import fleet_topology
from ctfix.lab.topology import (
    BRIDGE_V4,
    UPLINK_V4,
    Topology,
    lab_topology,
    udp_exchange,
    wait_udp_bound,
)
from tests.fresh_clone import BASE_TARBALL, WHEELS, clone_tree, missing_wheels
from tests.netns.docker_engine import DockerEngine, docker_engine
from tests.unit.test_deploy_watch import watch_pod

PORT = 56790
IMAGE = "ctfix:test"
BASE = "ctfix-base:bookworm"


@pytest.fixture(scope="module")
def built() -> Iterator[tuple[Topology, DockerEngine]]:
    """The lab with an engine in its host namespace, and the image built there."""
    reason = missing_wheels()
    if reason is None and not BASE_TARBALL.is_file():
        reason = f"no offline image base {BASE_TARBALL} (run scripts/setup)"
    if reason is not None:
        pytest.skip(reason)
    with (
        tempfile.TemporaryDirectory(prefix="ctfix-image-") as tmp,
        lab_topology(ipv6=False, netfilter="nft") as topo,
        docker_engine(topo.host) as engine,
    ):
        context = clone_tree(Path(tmp) / "context")
        wheels = context / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
             "--no-deps", "--no-index", "--find-links", str(WHEELS), "-w", str(wheels),
             str(context)],
            check=True,
            capture_output=True,
        )  # fmt: skip
        for wheel in WHEELS.glob("*.whl"):
            shutil.copy2(wheel, wheels)
        engine.docker("import", str(BASE_TARBALL), BASE, timeout=600)
        engine.docker(
            "build", "-q", "--build-arg", f"BASE={BASE}", "-t", IMAGE,
            "-f", str(context / "deploy" / "Dockerfile"), str(context),
            timeout=1200,
        )  # fmt: skip
        yield topo, engine


def _logs(engine: DockerEngine, name: str) -> tuple[str, str]:
    proc = subprocess.run(
        [engine.client, "logs", name], capture_output=True, text=True, env=engine.env()
    )
    return proc.stdout, proc.stderr


def _wait_for(engine: DockerEngine, name: str, what: str, found: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not found(*_logs(engine, name)):
        if time.monotonic() > deadline:
            out, err = _logs(engine, name)
            pytest.fail(f"no {what} within {timeout:.0f} s; stdout={out!r} stderr={err!r}")
        time.sleep(0.2)


def _records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_the_image_watch_finds_a_wrong_source_reply(built: tuple[Topology, DockerEngine]) -> None:
    topo, engine = built
    assert engine.docker("run", "--rm", IMAGE, "-V").startswith("ctfix ")
    server = topo.spawn(topo.host, ["socat", f"UDP4-RECVFROM:{PORT},fork", "EXEC:cat"])
    wait_udp_bound(server.pid, PORT, address="0.0.0.0")
    # The container shares the namespace it watches (the DaemonSet's hostNetwork).
    engine.docker(
        "run", "-d", "--name", "watcher", "--network", "host",
        "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW", IMAGE, "watch", "--json",
    )  # fmt: skip
    _wait_for(engine, "watcher", "'watching' note", lambda _o, err: "watching" in err, 120)

    assert udp_exchange(topo.container, BRIDGE_V4, PORT).answered
    assert not udp_exchange(topo.container, UPLINK_V4, PORT).answered

    def wrong_source(out: str, _err: str) -> bool:
        return any(r.get("kind") == "wrong-source-reply" for r in _records(out))

    _wait_for(engine, "watcher", "wrong-source finding", wrong_source, 60)
    engine.docker("stop", "-t", "30", "watcher", timeout=60)
    engine.docker("wait", "watcher")
    out, _err = _logs(engine, "watcher")
    findings = [r for r in _records(out) if r.get("kind") == "wrong-source-reply"]
    assert findings[0]["service"] == f"{UPLINK_V4}:{PORT}"
    assert findings[0]["actual_source"] == f"{BRIDGE_V4}:{PORT}"
    summary = [r for r in _records(out) if r.get("kind") == "summary"]
    assert summary and summary[-1]["findings"] >= 1



def _docker_flags(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """`docker run` flags for what the DaemonSet's pod spec asks of Kubernetes."""
    flags = ["--network", "host"] if pod.get("hostNetwork") else []
    flags += ["--pid", "host"] if pod.get("hostPID") else []
    security = container["securityContext"]
    flags += ["--user", str(security["runAsUser"])]
    flags += ["--read-only"] if security.get("readOnlyRootFilesystem") else []
    if security.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if security.get("appArmorProfile", {}).get("type") == "Unconfined":
        flags += ["--security-opt", "apparmor=unconfined"]
    for cap in security["capabilities"]["drop"]:
        flags += ["--cap-drop", cap]
    for cap in security["capabilities"]["add"]:
        flags += ["--cap-add", cap]
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    for mount in container["volumeMounts"]:
        options = ["ro"] if mount.get("readOnly") else []
        if mount.get("mountPropagation") == "HostToContainer":
            options.append("rslave")
        flags += ["-v", f"{paths[mount['name']]}:{mount['mountPath']}:{','.join(options)}"]
    return flags


def test_the_image_run_as_the_daemonset_runs_it_watches_other_namespaces(
    built: tuple[Topology, DockerEngine],
) -> None:
    """QA F6: with the DaemonSet's arguments (`watch --all-netns`), capabilities,
    hostPID and /run/netns, the image's watch reports a wrong-source reply in a
    namespace that is neither its own nor its engine's (a pod's, on a node). One of
    the namespaces holds an iptables-legacy DNAT (kube-proxy's on older nodes): the
    image reads it (python-iptables needs iptables' extensions; without them watch
    ended with an internal error at start)."""
    _topo, engine = built
    # python-iptables loads in the image: iptables' extensions are there.
    python = "/opt/ctfix/bin/python"
    engine.docker("run", "--rm", "--entrypoint", python, IMAGE, "-c", "import iptc")
    pod, container = watch_pod()
    args = [a.replace("$(NODE_IP)", "127.0.0.1") for a in container["args"]]
    with fleet_topology(count=2, broken=1) as fleet:
        [server] = fleet.broken_servers
        fleet.run(fleet.ok_server, "iptables-legacy", "-w", "-t", "nat", "-A", "PREROUTING",
                  "-p", "udp", "--dport", "5140", "-j", "DNAT",
                  "--to-destination", "198.51.100.22")  # fmt: skip
        engine.docker(
            "run", "-d", "--name", "daemonset", *_docker_flags(pod, container), IMAGE, *args
        )  # fmt: skip
        try:
            # every namespace of the machine: two dumps each, on a loaded machine
            _wait_for(engine, "daemonset", "'watching' note",
                      lambda _o, err: "watching" in err, 300)  # fmt: skip

            def found(out: str, _err: str) -> bool:
                fleet.ask_broken()
                return any(
                    r.get("kind") == "wrong-source-reply" and r.get("netns") == server
                    for r in _records(out)
                )

            _wait_for(engine, "daemonset", f"a finding in {server}", found, 120)
        finally:
            engine.docker("stop", "-t", "30", "daemonset", timeout=60)
    out, err = _logs(engine, "daemonset")
    [*_, summary] = _records(out)
    assert summary["kind"] == "summary" and summary["all_netns"] is True, err
    assert summary["namespaces"]["watched"] >= 2 and summary["findings"] >= 1
