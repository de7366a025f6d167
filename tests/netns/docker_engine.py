"""A real Docker engine (Debian's docker.io) inside a test's own network namespace.

dockerd is started with `nsenter --net=/run/netns/NS` (not `ip netns exec`, whose
fresh /sys hides the cgroup mounts dockerd needs), with its own data root, exec root,
pid file and API socket under a temporary directory, a bridge on a documentation
range, no IPv6 rules and no registry: its one image is imported from a directory of
busybox-static (plus the host's socat and the libraries it loads). It is always
stopped by its pid (SIGTERM; it stops its containers and unmounts its overlays) and
everything it made outside its directory (/etc/docker/key.json, /run/docker, the
`docker` cgroups) is removed when it was not there before.

Where an engine cannot run (no docker.io, not root, dockerd fails to start), the test
is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ctfix.platform.engines import TIMEOUT_VARIABLE

#: the engine's bridge (docker0): a documentation range the lab does not use
BRIDGE_CIDR = "203.0.113.1/24"
BRIDGE_V4 = "203.0.113.1"
IMAGE = "ctfix-tiny:1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
#: seconds ctfix waits for this engine's answers (it is asked when it is up)
ANSWER_TIMEOUT = 60.0
#: what dockerd and its containerd shims make outside their roots
_ROOT_LEFTOVERS = ("/etc/docker/key.json", "/run/docker", "/run/containerd")


def docker_client(dockerd: str) -> str | None:
    """The docker CLI shipped with this dockerd (docker.io puts both in /usr): another
    one on PATH (a newer Docker CE client in /usr/local/bin) may speak another API."""
    beside = Path(dockerd).resolve().parent.parent / "bin" / "docker"
    if beside.is_file():
        return str(beside)
    return shutil.which("docker")


def why_no_engine() -> str | None:
    """Why a Docker engine cannot run here, or None when it may."""
    if os.geteuid() != 0:
        return "a Docker engine needs root"
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        return "dockerd is not installed (apt-get install docker.io, or run scripts/setup)"
    if docker_client(dockerd) is None:
        return "the docker client is not installed (docker.io)"
    if shutil.which("busybox") is None or not Path("/bin/busybox").is_file():
        return "busybox-static is not installed (the tiny image is made from it)"
    if shutil.which("nsenter") is None:
        return "nsenter is not installed (util-linux)"
    return None


def _copy_with_libraries(program: str, rootfs: Path) -> None:
    """Copy a dynamically linked program and the libraries `ldd` names into rootfs."""
    target = rootfs / program.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(program, target)
    listing = subprocess.run(["ldd", program], capture_output=True, text=True, check=True)
    for line in listing.stdout.splitlines():
        for word in line.split():
            if word.startswith("/"):
                lib = rootfs / word.lstrip("/")
                lib.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(word, lib, follow_symlinks=True)


def make_rootfs(rootfs: Path) -> None:
    """busybox-static with a few links, and socat (a real UDP server to run in a
    container, in the container's cgroup)."""
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "tmp").mkdir()
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "sleep", "cat", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    socat = shutil.which("socat")
    if socat is not None:
        _copy_with_libraries(os.path.realpath(socat), rootfs)
        if not (rootfs / "bin" / "socat").exists():
            (rootfs / "bin" / "socat").symlink_to(os.path.realpath(socat))


@dataclass
class DockerEngine:
    """One running dockerd in a namespace, and how to talk to it."""

    netns: str
    root: Path
    pid: int
    client: str

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """The environment for ctfix and the docker CLI to reach this engine, which
        ctfix waits for as long as the CLI would (on a loaded machine this dockerd can
        take more than ctfix's 1 s to answer an inspect, and ctfix then names a
        container by its short id: the tests assert the name)."""
        return {**os.environ, "DOCKER_HOST": self.host, TIMEOUT_VARIABLE: str(ANSWER_TIMEOUT)}

    def docker(self, *args: str, stdin: bytes | None = None, timeout: float = 120.0) -> str:
        proc = subprocess.run(
            [self.client, *args],
            input=stdin,
            capture_output=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}"
            )
        return proc.stdout.decode().strip()

    def run(self, name: str, *command: str, publish: Sequence[str] = ()) -> str:
        """Start a container from the tiny image; its id."""
        ports = [arg for spec in publish for arg in ("-p", spec)]
        return self.docker("run", "-d", "--name", name, *ports, IMAGE, *command)

    def pid_of(self, name: str) -> int:
        return int(self.docker("inspect", "-f", "{{.State.Pid}}", name))

    def address_of(self, name: str) -> str:
        return self.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name)

    def in_container_netns(self, name: str, argv: Sequence[str]) -> list[str]:
        """argv run in the container's network namespace (not in its cgroup)."""
        return ["nsenter", "-t", str(self.pid_of(name)), "-n", *argv]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our child not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _stop(pid: int, timeout: float) -> None:
    """SIGTERM by pid, wait, SIGKILL if it will not go."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _unmount_under(root: Path) -> None:
    """Unmount whatever is still mounted below root (a dockerd killed hard)."""
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    for point in sorted((p for p in points if p.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _remove_if_unused(path: str) -> None:
    """Remove a file, or a directory tree with no file left in it (an engine started
    meanwhile by another test run may still use one)."""
    if not os.path.isdir(path):
        with contextlib.suppress(OSError):
            os.remove(path)
        return
    for current, _dirs, _files in sorted(os.walk(path), key=lambda e: -len(e[0])):
        with contextlib.suppress(OSError):
            os.rmdir(current)


def _docker_cgroups() -> set[str]:
    return {str(p) for p in Path("/sys/fs/cgroup").glob("*/docker")} | (
        {"/sys/fs/cgroup/docker"} if Path("/sys/fs/cgroup/docker").is_dir() else set()
    )


@contextlib.contextmanager
def docker_engine(netns: str, bridge: str = BRIDGE_CIDR) -> Iterator[DockerEngine]:
    """Start dockerd in the `ip netns` namespace `netns`, import the tiny image, yield
    the engine; always stop it by pid and remove what it made. Skips when an engine
    cannot run here."""
    reason = why_no_engine()
    if reason is not None:
        pytest.skip(reason)
    dockerd = shutil.which("dockerd")
    assert dockerd is not None
    client = docker_client(dockerd)
    assert client is not None
    existed = {path: os.path.exists(path) for path in _ROOT_LEFTOVERS}
    cgroups_before = _docker_cgroups()
    root = Path(tempfile.mkdtemp(prefix="ctfix-docker-"))
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 (closed in the finally)
    proc: subprocess.Popen[bytes] | None = None
    engine: DockerEngine | None = None
    try:
        proc = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{netns}",
                dockerd,
                "--data-root", str(root / "data"),
                "--exec-root", str(root / "exec"),
                "--pidfile", str(root / "docker.pid"),
                "-H", f"unix://{root / 'docker.sock'}",
                "--bip", bridge,
                "--ip6tables=false",
                "--shutdown-timeout", "2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        engine = DockerEngine(netns=netns, root=root, pid=proc.pid, client=client)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                tail = (root / "dockerd.log").read_text(errors="replace").strip().splitlines()
                pytest.skip(f"dockerd cannot run here: {tail[-1] if tail else proc.returncode}")
            if engine.socket.exists():
                ping = subprocess.run(
                    [client, "version"], capture_output=True, env=engine.env(), check=False
                )
                if ping.returncode == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"dockerd did not answer in {START_TIMEOUT:.0f} s (log: {log.name})")
            time.sleep(0.1)
        rootfs = root / "rootfs"
        make_rootfs(rootfs)
        tarball = subprocess.run(
            ["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True
        ).stdout
        engine.docker("import", "-", IMAGE, stdin=tarball)
        yield engine
    finally:
        if engine is not None and proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = engine.docker("ps", "-aq", timeout=30).split()
                if ids:
                    engine.docker("rm", "-f", *ids, timeout=60)
        if proc is not None:
            _stop(proc.pid, STOP_TIMEOUT)
            proc.wait()
        containerd = _read_pid(root / "exec" / "containerd" / "containerd.pid")
        if containerd is not None and _alive(containerd):
            _stop(containerd, 10.0)
        log.close()
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
        for path, was_there in existed.items():
            if not was_there:
                _remove_if_unused(path)
        for cgroup in sorted(_docker_cgroups() - cgroups_before):
            with contextlib.suppress(OSError):
                os.rmdir(cgroup)  # only when empty: another engine may still use it
