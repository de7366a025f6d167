"""Name the container a process, a network namespace or a client address belongs to.

A process's cgroup path (/proc/PID/cgroup, v1 or v2) holds its container's id
(`docker-<id>.scope`, `/docker/<id>`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
`libpod-<id>.scope`, `/kubepods/.../pod<uid>/<id>`); the engine's API socket
(ctfix.platform.engines) turns the id into the name people use, and the Kubernetes
labels into pod and namespace. When no engine answers, the name is the short id.

Know before changing: one `Resolver` per run caches every answer (an engine that
did not answer is not asked again), and nothing here raises for a missing or silent
engine: a container's name is a courtesy, never a reason to fail. Only
`container_netns()` (for `--netns container:NAME`) raises, with a one-line error.
A network namespace belongs to a container when the lowest pid in it is in one
(the container's first process; a process that joined it later with nsenter or
`ip netns exec` does not make it the host's); pid 1's namespace is the host's.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from ctfix.core.model import ContainerRef, Diagnosis
from ctfix.errors import CtfixError
from ctfix.platform import engines
from ctfix.platform.netns import Netns, entered
from ctfix.platform.procfs import read_text, stat_key

POD_LABEL = "io.kubernetes.pod.name"
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
#: entries a long-running process keeps per cache before starting over
CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class CgroupContainer:
    """A container id read from a cgroup path, and the engine the path names."""

    id: str
    engine: str | None  # "docker", "podman", "containerd", "cri-o"; None: not said


_ID = r"[0-9a-f]{64}"
# systemd driver: a scope per container, named by the runtime.
_SCOPE = re.compile(rf"^(docker|libpod|crio|cri-containerd|nerdctl)-({_ID})(?:\.scope)?$")
# A runtime's own monitor process (conmon), not the container.
_MONITOR = re.compile(rf"^(?:libpod|crio)-conmon-{_ID}(?:\.scope)?$")
_ENGINE_OF = {
    "docker": "docker",
    "libpod": "podman",
    "crio": "cri-o",
    "cri-containerd": "containerd",
    "nerdctl": "containerd",
}


def _from_path(path: str) -> CgroupContainer | None:
    parts = [part for part in path.split("/") if part]
    for index in range(len(parts) - 1, -1, -1):
        part = parts[index]
        if _MONITOR.match(part):
            return None
        match = _SCOPE.match(part)
        if match is not None:
            return CgroupContainer(match.group(2), _ENGINE_OF[match.group(1)])
        if re.fullmatch(_ID, part):
            # cgroupfs driver: /docker/<id>, /libpod_parent/libpod-<id> (above),
            # /kubepods/<qos>/pod<uid>/<id> (any CRI runtime), /<ns>/<id> (containerd).
            parent = parts[index - 1] if index else ""
            engine = (
                "docker"
                if parent == "docker"
                else "podman"
                if parent.startswith("libpod")
                else None
            )
            return CgroupContainer(part, engine)
    return None


def container_from_cgroup(text: str) -> CgroupContainer | None:
    """The container of a /proc/PID/cgroup text (v2 `0::/path` first, then v1 lines)."""
    lines = [line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2]
    ordered = [fields for fields in lines if fields[0] == "0"] + [
        fields for fields in lines if fields[0] != "0"
    ]
    for fields in ordered:
        found = _from_path(fields[2])
        if found is not None:
            return found
    return None


def _ref(ident: str, record: engines.EngineContainer, engine: str | None) -> ContainerRef:
    return ContainerRef(
        id=ident,
        name=record.name,
        engine=engine,
        pod=record.labels.get(POD_LABEL) or None,
        namespace=record.labels.get(NAMESPACE_LABEL) or None,
    )


class Resolver:
    """Answers for one run: container refs by id, pid, namespace and address."""

    def __init__(self, proc: str = "/proc", environ: dict[str, str] | None = None) -> None:
        self.proc = proc
        self.engines = engines.engines(environ)
        self._by_id: dict[str, ContainerRef] = {}
        self._members: dict[tuple[int, int], list[int]] | None = None
        self._addresses: dict[str, tuple[int, int]] | None = None

    # -- by id ----------------------------------------------------------------------

    def _candidates(self, hint: str | None) -> list[engines.Engine]:
        """The engines to ask about a container whose cgroup path named `hint`."""
        if hint is None:
            return list(self.engines)
        chosen = [e for e in self.engines if e.name == hint]
        if hint in ("docker", "podman"):
            # Docker's socket may be served by Podman (podman-docker), and the reverse.
            chosen += [e for e in self.engines if e.kind == "docker" and e not in chosen]
        return chosen

    def _ask(self, found: CgroupContainer) -> ContainerRef:
        for engine in self._candidates(found.engine):
            try:
                record = engines.inspect(engine, found.id)
            except engines.EngineUnavailable:
                continue
            if record is not None:
                return _ref(found.id, record, found.engine or engine.name)
        return ContainerRef(id=found.id, name=found.id[:12], engine=found.engine)

    def for_cgroup(self, text: str) -> ContainerRef | None:
        """The container of a /proc/PID/cgroup text, named by its engine if it answers."""
        found = container_from_cgroup(text)
        if found is None:
            return None
        cached = self._by_id.get(found.id)
        if cached is None:
            if len(self._by_id) >= CACHE_LIMIT:
                self._by_id.clear()
            cached = self._by_id[found.id] = self._ask(found)
        return cached

    def for_pid(self, pid: int) -> ContainerRef | None:
        return self.for_cgroup(read_text(f"{self.proc}/{pid}/cgroup") or "")

    # -- by network namespace --------------------------------------------------------

    def _namespace_members(self) -> dict[tuple[int, int], list[int]]:
        """netns (dev, inode) -> the pids in it, lowest first (one walk per run)."""
        if self._members is None:
            members: dict[tuple[int, int], list[int]] = {}
            try:
                names = os.listdir(self.proc)
            except OSError:
                names = []
            for name in names:
                if name.isdigit():
                    key = stat_key(f"{self.proc}/{name}/ns/net")
                    if key is not None:
                        members.setdefault(key, []).append(int(name))
            for pids in members.values():
                pids.sort()
            self._members = members
        return self._members

    def for_netns(self, path: str) -> ContainerRef | None:
        """The container whose network namespace `path` is (None: the host's, or no
        container's)."""
        key = stat_key(path)
        if key is None or key == stat_key(f"{self.proc}/1/ns/net"):
            return None
        pids = self._namespace_members().get(key)
        return self.for_pid(pids[0]) if pids else None

    # -- by address -----------------------------------------------------------------

    def _address_map(self) -> dict[str, tuple[int, int]]:
        """Every local address of every container's namespace -> that namespace."""
        if self._addresses is None:
            from ctfix.platform import routing

            addresses: dict[str, tuple[int, int]] = {}
            host = stat_key(f"{self.proc}/1/ns/net")
            for key, pids in self._namespace_members().items():
                cgroup = read_text(f"{self.proc}/{pids[0]}/cgroup") or ""
                if key == host or container_from_cgroup(cgroup) is None:
                    continue
                path = f"{self.proc}/{pids[0]}/ns/net"
                try:
                    with entered(Netns(f"pid:{pids[0]}", path)):
                        local = routing.local_addresses()
                except (CtfixError, OSError):
                    continue  # gone meanwhile, or not ours to enter
                for address in local:
                    if not address.loopback:
                        addresses.setdefault(address.address, key)
            self._addresses = addresses
        return self._addresses

    def forget_addresses(self) -> None:
        """Look again at every container's addresses (and the namespaces' members)
        next time: containers come and go while a watch runs."""
        self._addresses = None
        self._members = None

    def for_address(self, address: str) -> ContainerRef | None:
        """The container that owns `address` in its own network namespace."""
        key = self._address_map().get(address)
        if key is None:
            return None
        pids = self._namespace_members().get(key)
        return self.for_pid(pids[0]) if pids else None

    # -- by the name people give ----------------------------------------------------

    def netns_of(self, name_or_id: str) -> tuple[ContainerRef, str]:
        """`--netns container:NAME_OR_ID`: the container and its /proc/PID/ns/net.
        Raises CtfixError in one line when no engine answers or none knows it."""
        silent: list[str] = []
        for engine in self.engines:
            try:
                records = engines.find(engine, name_or_id)
            except engines.EngineUnavailable as err:
                silent.append(str(err))
                continue
            if len(records) > 1:
                names = ", ".join(sorted(f"{r.name} ({r.id[:12]})" for r in records))
                raise CtfixError(
                    f"container {name_or_id!r} is ambiguous in {engine.name}: {names}",
                    "give more of its id",
                )
            if not records:
                continue
            record = records[0]
            if record.pid is None:
                raise CtfixError(
                    f"container {record.name} ({engine.name}) is not running",
                    "start it, or choose a running container",
                )
            return _ref(record.id, record, engine.name), f"{self.proc}/{record.pid}/ns/net"
        if len(silent) == len(self.engines):
            raise CtfixError(
                f"no container engine answered for --netns container:{name_or_id} "
                f"({'; '.join(silent)})",
                "start the engine, set DOCKER_HOST=unix://PATH for another Docker socket, "
                "or pass --netns pid:PID",
            )
        asked = [e.where for e in self.engines if e.down is None]
        raise CtfixError(
            f"no container {name_or_id!r} in {', '.join(asked)}",
            "list them with `docker ps` (or `crictl ps`), or pass --netns pid:PID",
        )


class ClientContainers:
    """The container of a finding's client, for a long-running watch: each address is
    looked up once (on its first finding: never per event), then answered from a
    bounded cache; an address no container had is asked again after `max_age`
    seconds, with the map of every container's addresses rebuilt at most that often.
    Never raises: a name is a courtesy."""

    def __init__(
        self,
        res: Resolver | None = None,
        max_age: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = res
        self.max_age = max_age
        self.clock = clock
        self._cache: dict[str, tuple[ContainerRef | None, float]] = {}
        self._rebuilt: float | None = None
        self.lookups = 0  # addresses actually looked up (tests, bench)

    def __call__(self, client: str) -> ContainerRef | None:
        """`client`: "addr:port", as findings carry it."""
        from ctfix.core.addr import parse_endpoint, unmap

        try:
            address = unmap(parse_endpoint(client)[0])
        except ValueError:
            return None
        now = self.clock()
        cached = self._cache.get(address)
        if cached is not None and (cached[0] is not None or now - cached[1] < self.max_age):
            return cached[0]
        res = self._resolver or resolver()
        if cached is not None and (self._rebuilt is None or now - self._rebuilt >= self.max_age):
            res.forget_addresses()  # a container may have come since: look again
            self._rebuilt = now
        elif self._rebuilt is None:
            self._rebuilt = now
        self.lookups += 1
        try:
            ref = res.for_address(address)
        except Exception:  # a courtesy must never end a watch
            ref = None
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[address] = (ref, now)
        return ref


_resolver: Resolver | None = None


def resolver() -> Resolver:
    """The run's resolver (one per process: its caches are the run's)."""
    global _resolver
    if _resolver is None:
        _resolver = Resolver()
    return _resolver


def container_netns(spec: str) -> Netns:
    """`--netns container:NAME_OR_ID` -> the container's network namespace; raises a
    one-line CtfixError when the spec is empty, no engine answers or none knows it."""
    name = spec[len("container:") :]
    if not name:
        raise CtfixError(
            f"bad --netns {spec!r}", "use container:NAME or container:ID (as `docker ps`)"
        )
    _ref, path = resolver().netns_of(name)
    return Netns(spec, path)


def annotate(diagnosis: Diagnosis, netns_path: str = "/proc/thread-self/ns/net") -> Diagnosis:
    """The diagnosis with its namespace's container and each wrong-source client's
    container (when a container owns the client's address). Listeners already carry
    theirs (ctfix.platform.sockdiag)."""
    import dataclasses

    from ctfix.core.addr import parse_endpoint

    res = resolver()
    wrong = []
    for reply in diagnosis.evidence.wrong_source:
        try:
            address, _port = parse_endpoint(reply.client)
        except ValueError:
            address = ""
        ref = res.for_address(address) if address else None
        wrong.append(dataclasses.replace(reply, container=ref) if ref else reply)
    evidence = dataclasses.replace(diagnosis.evidence, wrong_source=tuple(wrong))
    return dataclasses.replace(
        diagnosis, evidence=evidence, netns_container=res.for_netns(netns_path)
    )
