"""The seed story with a real Docker engine (Debian's docker.io 20.10) in the lab's
host namespace: containers asking the host's uplink address, docker-proxy serving a
published port, and explain naming containers (tests/netns/docker_engine.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ctfix.lab.topology import UPLINK_V4, Topology, lab_topology, wait_udp_bound
from ctfix.platform import rules_files as rules
from tests.netns.docker_engine import BRIDGE_V4, DockerEngine, docker_engine

HOST_PORT = 56789
PUBLISHED_PORT = 5353

CLIENT = """
import json, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(float(sys.argv[3]))
sock.connect((sys.argv[1], int(sys.argv[2])))
sock.send(b"ctfix-docker")
try:
    sock.recv(2048)
    answered = True
except OSError:
    answered = False
print(json.dumps({"answered": answered, "client": sock.getsockname()[0]}))
"""


@pytest.fixture
def docker_lab() -> Iterator[tuple[Topology, DockerEngine]]:
    """The lab (IPv4, nft) with a Docker engine in its host namespace."""
    with lab_topology(ipv6=False, netfilter="nft") as topo, docker_engine(topo.host) as engine:
        yield topo, engine


def ask(engine: DockerEngine, container: str, server: str, port: int) -> dict[str, Any]:
    """One request from a connect()ed client in the container's namespace."""
    timeout = "1" if server == UPLINK_V4 else "5"
    argv = engine.in_container_netns(
        container, [sys.executable, "-c", CLIENT, server, str(port), timeout]
    )
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def explain(
    engine: DockerEngine, port: int | str, netns: str, *extra: str
) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "ctfix", "explain", str(port), "--netns", netns, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=engine.env(),
    )
    return proc.returncode, proc.stdout, proc.stderr


def explain_json(engine: DockerEngine, port: int | str, netns: str) -> dict[str, Any]:
    status, out, err = explain(engine, port, netns, "--json")
    assert err == "", err
    result: dict[str, Any] = json.loads(out)
    result["exit_status"] = status
    return result


def host_service_and_client(topo: Topology, engine: DockerEngine) -> str:
    """A wildcard socat on HOST_PORT in the engine's (the lab's host) namespace, and a
    container `web-client` to ask it; the container's id."""
    server = topo.spawn(topo.host, ["socat", f"UDP4-RECVFROM:{HOST_PORT},fork", "EXEC:cat"])
    wait_udp_bound(server.pid, HOST_PORT, address="0.0.0.0")
    return engine.run("web-client", "sleep", "600")


def test_host_service_asked_by_a_container_names_the_client_container(
    docker_lab: tuple[Topology, DockerEngine],
) -> None:
    topo, engine = docker_lab
    client_id = host_service_and_client(topo, engine)

    assert ask(engine, "web-client", BRIDGE_V4, HOST_PORT)["answered"]
    through_uplink = ask(engine, "web-client", UPLINK_V4, HOST_PORT)
    assert not through_uplink["answered"]  # the bug, with a real engine's network

    report = explain_json(engine, HOST_PORT, topo.host)
    assert report["verdict"] == "broken" and report["exit_status"] == 1
    wrong = [w for w in report["evidence"]["wrong_source"] if w["container"]]
    assert wrong, report["evidence"]
    assert wrong[0]["container"]["name"] == "web-client"
    assert wrong[0]["container"]["id"] == client_id
    assert wrong[0]["container"]["engine"] == "docker"
    assert wrong[0]["client"].startswith(f"{through_uplink['client']}:")
    assert report["netns_container"] is None  # the lab's host namespace is no container's
    status, text, _err = explain(engine, HOST_PORT, topo.host)
    assert status == 1 and "web-client" in text


def test_listener_in_a_container_is_named_and_container_netns_works(
    docker_lab: tuple[Topology, DockerEngine],
) -> None:
    _topo, engine = docker_lab
    server_id = engine.run("dns-server", "socat", f"UDP4-RECVFROM:{HOST_PORT},fork", "EXEC:cat")
    wait_udp_bound(engine.pid_of("dns-server"), HOST_PORT, address="0.0.0.0")

    for spec in ("container:dns-server", f"container:{server_id[:12]}"):
        report = explain_json(engine, HOST_PORT, spec)
        assert report["netns"] == spec
        assert report["netns_container"]["name"] == "dns-server"
        socat = [lst for lst in report["listeners"] if lst["process"] == "socat"]
        assert socat, report["listeners"]
        assert socat[0]["container"] == {
            "id": server_id,
            "name": "dns-server",
            "engine": "docker",
            "pod": None,
            "namespace": None,
        }
    _status, text, _err = explain(engine, HOST_PORT, "container:dns-server")
    assert any("socat" in line and "dns-server" in line for line in text.splitlines()), text
    # A port by its /etc/services name, as ss and tcpdump take it.
    assert explain_json(engine, "domain", "container:dns-server")["port"] == 53


def test_container_netns_errors_are_one_line(docker_lab: tuple[Topology, DockerEngine]) -> None:
    _topo, engine = docker_lab
    status, out, err = explain(engine, HOST_PORT, "container:no-such-container")
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "no-such-container" in err
    engine.run("stopped", "sh", "-c", "exit 0")
    engine.docker("wait", "stopped")
    status, out, err = explain(engine, HOST_PORT, "container:stopped")
    assert status == 2 and len(err.strip().splitlines()) == 1


def test_published_udp_port_through_docker_proxy_is_broken_with_its_advice(
    docker_lab: tuple[Topology, DockerEngine],
) -> None:
    topo, engine = docker_lab
    engine.run(
        "resolver",
        *["socat", f"UDP4-RECVFROM:{PUBLISHED_PORT},fork", "EXEC:cat"],
        publish=[f"{PUBLISHED_PORT}:{PUBLISHED_PORT}/udp"],
    )
    wait_udp_bound(engine.pid_of("resolver"), PUBLISHED_PORT, address="0.0.0.0")
    # docker-proxy, in the engine's (the lab host's) namespace
    wait_udp_bound(engine.pid, PUBLISHED_PORT, address="0.0.0.0")
    engine.run("app", "sleep", "600")

    assert ask(engine, "app", BRIDGE_V4, PUBLISHED_PORT)["answered"]
    assert not ask(engine, "app", UPLINK_V4, PUBLISHED_PORT)["answered"]  # moby 11998

    report = explain_json(engine, PUBLISHED_PORT, topo.host)
    assert report["verdict"] == "broken"
    assert {lst["process"] for lst in report["listeners"]} == {"docker-proxy"}
    entry = rules.load().get("docker-proxy")
    assert entry is not None
    assert report["service"] == entry.name
    advice = [f for f in report["fixes"] if f["method"] == "bind"]
    assert advice and advice[0]["recommended"]
    assert entry.fix in advice[0]["detail"] and entry.snippet.strip() in advice[0]["detail"]
    assert any(w["container"] and w["container"]["name"] == "app"
               for w in report["evidence"]["wrong_source"])  # fmt: skip
    _status, text, _err = explain(engine, PUBLISHED_PORT, topo.host)
    assert entry.snippet.strip().splitlines()[-1] in text
