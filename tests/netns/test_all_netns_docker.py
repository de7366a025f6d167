"""`--all-netns` with a real Docker engine: a container's namespace is found among
the host's and named by the container's name, and its services carry it; watch names
the container of a wrong-source reply's client, in one namespace and in all."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from ctfix.lab.topology import UPLINK_V4, Topology, wait_udp_bound
from tests.netns.docker_engine import DockerEngine
from tests.netns.test_docker import HOST_PORT, ask, docker_lab, host_service_and_client
from tests.netns.test_watch_all_netns import START_TIMEOUT, watching_all

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


def test_watch_names_the_container_of_a_client_and_of_a_namespace(
    docker_lab: tuple[Topology, DockerEngine],
) -> None:
    topo, engine = docker_lab
    client_id = host_service_and_client(topo, engine)
    with (
        watching_all(env=engine.env()) as every,
        watching_all("--netns", topo.host, env=engine.env()) as one,
    ):
        through_uplink = ask(engine, "web-client", UPLINK_V4, HOST_PORT)
        assert not through_uplink["answered"]  # the bug, with a real engine's network

        def found(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [
                r for r in records
                if r["kind"] == "wrong-source-reply" and r["netns"] == topo.host
                and r["client"].startswith(f"{through_uplink['client']}:")
            ]

        every.wait_for("the finding", lambda: bool(found(every.records)), START_TIMEOUT)
        one.wait_for("the finding", lambda: bool(found(one.records)), START_TIMEOUT)
        records = {"all": every.stop(), "one": one.stop()}
    for name, seen in records.items():
        [*_, last] = found(seen)
        assert last["container"] == {
            "id": client_id, "name": "web-client", "engine": "docker", "pod": None,
            "namespace": None,
        }, name
        assert last["netns_container"] is None  # the lab's host namespace: no container's
    summaries = {r["netns"]: r for r in records["all"] if r["kind"] == "namespace-summary"}
    assert summaries["web-client"]["netns_container"]["id"] == client_id
