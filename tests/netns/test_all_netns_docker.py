"""`--all-netns` with a real Docker engine: a container's namespace is found among
the host's and named by the container's name, and its services carry it."""

from __future__ import annotations

import json
import subprocess
import sys

from ctfix.lab.topology import Topology, wait_udp_bound
from tests.netns.docker_engine import DockerEngine
from tests.netns.test_docker import docker_lab

__all__ = ["docker_lab"]  # the fixture, shared with test_docker.py

PORT = 20301


def test_scan_all_netns_names_a_containers_namespace_by_the_container(
    docker_lab: tuple[Topology, DockerEngine],
) -> None:
    topo, engine = docker_lab
    server_id = engine.run("udp-web", "socat", f"UDP4-RECVFROM:{PORT},fork", "EXEC:cat")
    wait_udp_bound(engine.pid_of("udp-web"), PORT, address="0.0.0.0")
    done = subprocess.run(
        [sys.executable, "-m", "ctfix", "scan", "--all-netns", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=engine.env(),
    )
    assert done.returncode in (0, 1), done.stderr
    document = json.loads(done.stdout)
    listed = {ns["netns"]: ns for ns in document["namespaces"]}
    web = listed["udp-web"]
    assert (web["kind"], web["spec"]) == ("container", "container:udp-web")
    assert web["container"]["id"] == server_id and web["container"]["engine"] == "docker"
    assert listed[topo.host]["kind"] == "ip-netns"  # the engine's own namespace
    [service] = [s for s in document["services"] if s["netns"] == "udp-web"]
    assert service["port"] == PORT
    assert service["netns_container"]["name"] == "udp-web"
