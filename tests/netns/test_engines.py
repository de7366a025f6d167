"""Engines' API sockets as ctfix meets them: one that answers, one that never does,
none at all, and a real containerd's CRI (Debian's containerd, started here in a test
namespace of its own)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ctfix.errors import CtfixError
from ctfix.platform import engines
from ctfix.platform.containers import Resolver
from ctfix.platform.engines import EngineUnavailable

ID = "0123456789abcdef" * 4


class _FakeDocker(http.server.BaseHTTPRequestHandler):
    known: ClassVar[dict[str, dict[str, Any]]] = {
        ID: {
            "Id": ID,
            "Name": "/coredns",
            "State": {"Pid": os.getpid()},
            "Config": {
                "Labels": {
                    "io.kubernetes.pod.name": "coredns-5d78c9869d-x2x9q",
                    "io.kubernetes.pod.namespace": "kube-system",
                }
            },
        }
    }

    def do_GET(self) -> None:
        key = self.path.split("/")[2] if self.path.startswith("/containers/") else ""
        record = self.known.get(key) or next(
            (r for r in self.known.values() if r["Name"] == f"/{key}"), None
        )
        body = json.dumps(record if record else {"message": "No such container"}).encode()
        self.send_response(200 if record else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def sockets() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ctfix-engines-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def fake_docker(path: Path) -> Iterator[None]:
    server = _UnixHTTPServer(str(path), _FakeDocker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def test_docker_api_names_a_container_with_its_pod(sockets: Path) -> None:
    path = sockets / "docker.sock"
    with fake_docker(path):
        res = Resolver(environ={"DOCKER_HOST": f"unix://{path}"})
        ref = res.for_cgroup(f"0::/kubepods/besteffort/pod1c0a/{ID}\n")
        assert ref is not None
        assert (ref.name, ref.engine, ref.pod, ref.namespace) == (
            "coredns",
            "docker",
            "coredns-5d78c9869d-x2x9q",
            "kube-system",
        )
        found, netns_path = res.netns_of("coredns")
        assert found.id == ID and netns_path == f"/proc/{os.getpid()}/ns/net"
        with pytest.raises(CtfixError, match="no container 'nope'"):
            res.netns_of("nope")


def test_an_engine_that_never_answers_costs_one_timeout_and_leaves_the_short_id(
    sockets: Path,
) -> None:
    path = sockets / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    try:
        res = Resolver(environ={"DOCKER_HOST": f"unix://{path}"})
        for engine in res.engines:
            if engine.name != "docker":
                engine.down = "not part of this test"
        ref = res.for_cgroup(f"0::/docker/{ID}\n")
        assert ref is not None and (ref.name, ref.engine) == (ID[:12], "docker")
        docker = next(e for e in res.engines if e.name == "docker")
        assert docker.down is not None and "no answer" in docker.down
        other = "f" * 64
        assert res.for_cgroup(f"0::/docker/{other}\n") == type(ref)(other, other[:12], "docker")
        with pytest.raises(EngineUnavailable):
            engines.inspect(docker, other)  # down: not asked again this run
        with pytest.raises(CtfixError, match="no container engine answered"):
            res.netns_of("web")
    finally:
        listener.close()


def test_no_engine_at_all_is_a_one_line_error(sockets: Path) -> None:
    res = Resolver(
        environ={
            "DOCKER_HOST": f"unix://{sockets}/none.sock",
            "CONTAINER_HOST": f"unix://{sockets}/none2.sock",
        }
    )
    for engine in res.engines:
        if engine.kind == "cri":
            engine.path = str(sockets / f"{engine.name}.sock")
    with pytest.raises(CtfixError) as raised:
        res.netns_of("web")
    assert "no container engine answered" in raised.value.one_line()
    assert "\n" not in raised.value.one_line()


@pytest.fixture
def containerd_cri(sockets: Path) -> Iterator[Path]:
    """Debian's containerd with its CRI plugin, in a namespace of its own."""
    binary = shutil.which("containerd")
    if binary is None:
        pytest.skip("containerd is not installed (docker.io brings it; run scripts/setup)")
    ns = f"ctfix-cri-{os.getpid() % 0xFFFF:04x}{os.urandom(2).hex()}"
    config = sockets / "config.toml"
    config.write_text(
        f'version = 2\nroot = "{sockets}/root"\nstate = "{sockets}/state"\n'
        f'[grpc]\n  address = "{sockets}/containerd.sock"\n'
        f'[ttrpc]\n  address = "{sockets}/containerd.sock.ttrpc"\n'
        f'[debug]\n  address = "{sockets}/debug.sock"\n'
        # CNI's default conf_dir is /etc/cni/net.d, which CRI creates: keep it here.
        '[plugins."io.containerd.grpc.v1.cri".cni]\n'
        f'  conf_dir = "{sockets}/cni/net.d"\n  bin_dir = "{sockets}/cni/bin"\n'
    )
    subprocess.run(["ip", "netns", "add", ns], check=True)
    log = open(sockets / "containerd.log", "wb")  # noqa: SIM115 (closed in the finally)
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", binary, "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        endpoint = sockets / "containerd.sock"
        deadline = time.monotonic() + 30
        while engines.cri_version_or_none(str(endpoint)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"containerd's CRI did not start here (log: {log.name})")
            time.sleep(0.1)
        yield endpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_real_containerd_cri_answers_version_list_and_not_found(containerd_cri: Path) -> None:
    version = engines.cri_version(str(containerd_cri))
    assert version is not None and version.startswith("containerd")
    engine = engines.Engine("containerd", "cri", str(containerd_cri))
    assert engines.find(engine, "web") == []  # ListContainers: an empty node
    assert engines.inspect(engine, ID) is None  # ContainerStatus: NotFound
    assert engine.down is None
    res = Resolver(environ={"CONTAINER_RUNTIME_ENDPOINT": f"unix://{containerd_cri}"})
    for other in res.engines:
        if other.path != str(containerd_cri):
            other.down = "not part of this test"
    ref = res.for_cgroup(f"0::/kubepods.slice/cri-containerd-{ID}.scope\n")
    assert ref is not None and (ref.name, ref.engine) == (ID[:12], "containerd")
