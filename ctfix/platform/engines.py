"""Container engines' own API sockets: Docker's (and Podman's compatible) REST API,
and the Kubernetes CRI (containerd, CRI-O) over gRPC, with the standard library only.

Know before changing: everything here is a best effort with short timeouts. ctfix
names containers to help a person read its output; an engine that is absent, slow,
refuses us or answers nonsense must never cost more than one timeout per run nor
raise past `EngineUnavailable` (callers fall back to the short id). An engine that
failed once is not asked again in the same run (`Engine.down`).

The CRI client speaks just enough HTTP/2 for one unary call: the client preface,
one HEADERS frame (HPACK literals, no Huffman, no table), one DATA frame; it reads
DATA frames until the stream ends and never decodes the server's headers: a call
without a message (an error status) is "no answer", which is all ctfix needs.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: tests only: seconds to wait instead (a test's own engine on a loaded machine; such
#: a test is about the name, not the wait)
TIMEOUT_VARIABLE = "CTFIX_TEST_ENGINE_TIMEOUT"
_CHOSEN = os.environ.get(TIMEOUT_VARIABLE, "")
#: seconds for one connect or one answer; a name is not worth a longer wait.
TIMEOUT = float(_CHOSEN) if _CHOSEN.replace(".", "", 1).isdigit() and float(_CHOSEN) else 1.0
#: an engine's answer larger than this is not an answer (ListContainers on a big node
#: is a few hundred kB).
MAX_ANSWER = 16 * 1024 * 1024


class EngineUnavailable(Exception):
    """The engine's socket is missing, refuses us, or does not speak its protocol."""


@dataclass
class Engine:
    """One API socket: `kind` "docker" (REST, also Podman's) or "cri" (gRPC)."""

    name: str  # "docker", "podman", "containerd", "cri-o"
    kind: str  # "docker" | "cri"
    path: str
    down: str | None = None  # why it did not answer, once it did not
    _cri_service: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return f"{self.name} at {self.path}"


@dataclass(frozen=True, slots=True)
class EngineContainer:
    """What an engine says about one container."""

    id: str
    name: str
    labels: dict[str, str]
    pid: int | None  # its first process (None when not running or not said)


def _unix_path(url: str | None) -> str | None:
    if url and url.startswith("unix://"):
        return url[len("unix://") :] or None
    return None


def engines(environ: dict[str, str] | None = None) -> list[Engine]:
    """The API sockets to ask, in order: DOCKER_HOST (unix://) or Docker's default,
    Podman's, then the CRI endpoints (CONTAINER_RUNTIME_ENDPOINT, containerd, CRI-O).
    A DOCKER_HOST that is not unix:// (tcp, ssh) is not ours to follow: Docker is then
    left out rather than asked at the default socket, which would be another daemon."""
    env = os.environ if environ is None else environ
    found: list[Engine] = []
    docker_host = env.get("DOCKER_HOST")
    if docker_host is None:
        found.append(Engine("docker", "docker", "/var/run/docker.sock"))
    elif path := _unix_path(docker_host):
        found.append(Engine("docker", "docker", path))
    podman = _unix_path(env.get("CONTAINER_HOST")) or "/run/podman/podman.sock"
    found.append(Engine("podman", "docker", podman))
    cri = _unix_path(env.get("CONTAINER_RUNTIME_ENDPOINT"))
    if cri:
        found.append(Engine("cri-o" if "crio" in cri else "containerd", "cri", cri))
    found.append(Engine("containerd", "cri", "/run/containerd/containerd.sock"))
    found.append(Engine("cri-o", "cri", "/run/crio/crio.sock"))
    seen: set[str] = set()
    unique = []
    for engine in found:
        if engine.path not in seen:
            seen.add(engine.path)
            unique.append(engine)
    return unique


def inspect(engine: Engine, ref: str) -> EngineContainer | None:
    """The engine's record of a container by id (or, for Docker, name); None when the
    engine does not know it. Raises EngineUnavailable when the engine does not answer
    (and marks it down for the rest of the run)."""
    if engine.down is not None:
        raise EngineUnavailable(engine.down)
    try:
        if engine.kind == "docker":
            return _docker_inspect(engine.path, ref)
        return _cri_inspect(engine, ref)
    except EngineUnavailable as err:
        engine.down = f"{engine.where}: {err}"
        raise EngineUnavailable(engine.down) from None


def find(engine: Engine, name_or_id: str) -> list[EngineContainer]:
    """Containers whose name is `name_or_id` or whose id starts with it."""
    if engine.kind == "docker":
        found = inspect(engine, name_or_id)
        return [found] if found is not None else []
    if engine.down is not None:
        raise EngineUnavailable(engine.down)
    try:
        listed = _cri_list(engine)
    except EngineUnavailable as err:
        engine.down = f"{engine.where}: {err}"
        raise EngineUnavailable(engine.down) from None
    matches = [c for c in listed if c.name == name_or_id or c.id.startswith(name_or_id)]
    return [inspect(engine, c.id) or c for c in matches]


# -- Docker (and Podman's Docker-compatible API) ---------------------------------------


def _unavailable(err: Exception, timeout: float) -> EngineUnavailable:
    """An engine socket's failure in the words a person needs."""
    if isinstance(err, FileNotFoundError):
        return EngineUnavailable("no such socket")
    if isinstance(err, PermissionError):
        return EngineUnavailable("permission denied")
    if isinstance(err, ConnectionRefusedError):
        return EngineUnavailable("connection refused (is the daemon running?)")
    if isinstance(err, TimeoutError):
        return EngineUnavailable(f"no answer within {timeout:g} s")
    return EngineUnavailable(f"{type(err).__name__}: {err}")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def docker_get(path: str, url: str, timeout: float = TIMEOUT) -> Any:
    """GET `url` from the Docker API at the unix socket `path`: the decoded JSON, or
    None for 404. Raises EngineUnavailable for anything else."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", url, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(MAX_ANSWER + 1)
    except (OSError, http.client.HTTPException) as err:
        raise _unavailable(err, timeout) from None
    finally:
        conn.close()
    if response.status == 404:
        return None
    if response.status != 200 or len(body) > MAX_ANSWER:
        raise EngineUnavailable(f"HTTP {response.status} for {url}")
    try:
        return json.loads(body)
    except ValueError:
        raise EngineUnavailable(f"not JSON from {url}") from None


def _docker_inspect(path: str, ref: str) -> EngineContainer | None:
    data = docker_get(path, f"/containers/{urllib.parse.quote(ref, safe='')}/json")
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("Id"), str):
        raise EngineUnavailable("unexpected answer to a container inspect")
    config = data.get("Config") if isinstance(data.get("Config"), dict) else {}
    labels = config.get("Labels") if isinstance(config, dict) else None
    state = data.get("State") if isinstance(data.get("State"), dict) else {}
    pid = state.get("Pid") if isinstance(state, dict) else None
    name = data.get("Name")
    return EngineContainer(
        id=data["Id"],
        name=name.lstrip("/") if isinstance(name, str) and name.strip("/") else data["Id"][:12],
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        pid=pid if isinstance(pid, int) and pid > 0 else None,
    )


# -- CRI over gRPC (HTTP/2), just enough for unary calls -------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0, 1, 3, 4, 6, 7
_WINDOW_UPDATE = 8
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_SETTINGS_INITIAL_WINDOW_SIZE = 4
_WINDOW = 1 << 24
_CRI_SERVICES = ("runtime.v1.RuntimeService", "runtime.v1alpha2.RuntimeService")


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack("!I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack("!I", stream)
        + payload
    )


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _hpack_literal(name: str, value: str) -> bytes:
    """'Literal header field without indexing, new name', no Huffman (RFC 7541 6.2.2)."""
    raw_name, raw_value = name.encode(), value.encode()
    return (
        b"\x00"
        + _hpack_int(len(raw_name), 7)
        + raw_name
        + _hpack_int(len(raw_value), 7)
        + raw_value
    )


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise EngineUnavailable("connection closed mid-answer")
        chunks += chunk
    return bytes(chunks)


def grpc_unary(path: str, method: str, message: bytes, timeout: float = TIMEOUT) -> bytes | None:
    """Call `method` ("/pkg.Service/Method") at the unix socket `path` with one
    protobuf `message`; the answer's message, or None when the call ended without
    one (a gRPC error status such as NotFound or Unimplemented)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        headers = b"".join(
            _hpack_literal(name, value)
            for name, value in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", method),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        body = b"\x00" + struct.pack("!I", len(message)) + message
        sock.sendall(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, struct.pack("!HI", _SETTINGS_INITIAL_WINDOW_SIZE, _WINDOW))
            + _frame(_WINDOW_UPDATE, 0, 0, struct.pack("!I", _WINDOW - 65535))
            + _frame(_HEADERS, _END_HEADERS, 1, headers)
            + _frame(_DATA, _END_STREAM, 1, body)
        )
        data = bytearray()
        while True:
            head = _recv_exactly(sock, 9)
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            if len(data) + length > MAX_ANSWER:
                raise EngineUnavailable("answer too large")
            payload = _recv_exactly(sock, length)
            if kind == _SETTINGS and not flags & _ACK:
                sock.sendall(_frame(_SETTINGS, _ACK, 0))
            elif kind == _PING and not flags & _ACK:
                sock.sendall(_frame(_PING, _ACK, 0, payload))
            elif kind == _GOAWAY or (kind == _RST_STREAM and stream == 1):
                break
            elif stream == 1 and kind in (_DATA, _HEADERS):
                if kind == _DATA:
                    pad = payload[0] if flags & 0x8 else 0
                    data += payload[1 if flags & 0x8 else 0 : len(payload) - pad]
                if flags & _END_STREAM:
                    break
    except OSError as err:
        raise _unavailable(err, timeout) from None
    finally:
        sock.close()
    if len(data) < 5:
        return None
    if data[0] != 0:
        raise EngineUnavailable("compressed gRPC message (not asked for)")
    size = int.from_bytes(data[1:5], "big")
    if len(data) < 5 + size:
        raise EngineUnavailable("truncated gRPC message")
    return bytes(data[5 : 5 + size])


# -- protobuf, the few shapes CRI needs ------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def pb_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, value


def pb_bytes(number: int, value: bytes) -> bytes:
    out = bytearray()
    key = number << 3 | 2
    for part in (key, len(value)):
        while part >= 0x80:
            out.append(part & 0x7F | 0x80)
            part >>= 7
        out.append(part)
    return bytes(out) + value


def pb_bool(number: int, value: bool) -> bytes:
    return bytes((number << 3, 1)) if value else b""


def _text(value: int | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else ""


def _map_entry(value: int | bytes) -> tuple[str, str]:
    key = text = ""
    if isinstance(value, bytes):
        for number, item in pb_fields(value):
            if number == 1:
                key = _text(item)
            elif number == 2:
                text = _text(item)
    return key, text


def _metadata_name(value: int | bytes) -> str:
    if isinstance(value, bytes):
        for number, item in pb_fields(value):
            if number == 1:
                return _text(item)
    return ""


def cri_container(message: bytes, *, status: bool) -> EngineContainer:
    """A CRI `ContainerStatus` (status=True: id 1, metadata 2, labels 12) or a
    `Container` from ListContainers (id 1, metadata 3, labels 8)."""
    metadata_field, labels_field = (2, 12) if status else (3, 8)
    ident = name = ""
    labels: dict[str, str] = {}
    for number, value in pb_fields(message):
        if number == 1:
            ident = _text(value)
        elif number == metadata_field:
            name = _metadata_name(value)
        elif number == labels_field:
            key, text = _map_entry(value)
            labels[key] = text
    return EngineContainer(id=ident, name=name or ident[:12], labels=labels, pid=None)


def cri_status_response(message: bytes) -> EngineContainer | None:
    """ContainerStatusResponse: status (1) and the verbose `info` map (2), whose
    "info" entry is the runtime's JSON (containerd and CRI-O put the pid there)."""
    found: EngineContainer | None = None
    pid: int | None = None
    for number, value in pb_fields(message):
        if number == 1 and isinstance(value, bytes):
            found = cri_container(value, status=True)
        elif number == 2:
            key, text = _map_entry(value)
            if key == "info":
                try:
                    info = json.loads(text)
                except ValueError:
                    continue
                candidate = info.get("pid") if isinstance(info, dict) else None
                pid = candidate if isinstance(candidate, int) and candidate > 0 else None
    if found is None or not found.id:
        return None
    return EngineContainer(found.id, found.name, found.labels, pid)


def _cri_call(engine: Engine, method: str, message: bytes) -> bytes | None:
    """Try the CRI API versions in turn; remember the first that answers."""
    services = (engine._cri_service,) if engine._cri_service else _CRI_SERVICES
    for service in services:
        answer = grpc_unary(engine.path, f"/{service}/{method}", message)
        if answer is not None:
            engine._cri_service = service
            return answer
    return None


def _cri_inspect(engine: Engine, container_id: str) -> EngineContainer | None:
    request = pb_bytes(1, container_id.encode()) + pb_bool(2, True)  # verbose: the pid
    answer = _cri_call(engine, "ContainerStatus", request)
    if answer is None:
        return None
    try:
        return cri_status_response(answer)
    except ValueError as err:
        raise EngineUnavailable(f"bad ContainerStatus answer: {err}") from None


def _cri_list(engine: Engine) -> list[EngineContainer]:
    answer = _cri_call(engine, "ListContainers", b"")
    if answer is None:
        if engine._cri_service is None:
            raise EngineUnavailable("no CRI runtime service answered")
        return []
    try:
        return [
            cri_container(value, status=False)
            for number, value in pb_fields(answer)
            if number == 1 and isinstance(value, bytes)
        ]
    except ValueError as err:
        raise EngineUnavailable(f"bad ListContainers answer: {err}") from None


def cri_version(path: str) -> str | None:
    """`runtime_name runtime_version` of a CRI endpoint (its Version call), or None."""
    for service in _CRI_SERVICES:
        answer = grpc_unary(path, f"/{service}/Version", pb_bytes(1, b"v1"))
        if answer is not None:
            fields = dict(pb_fields(answer))
            return f"{_text(fields.get(2, b''))} {_text(fields.get(3, b''))}".strip()
    return None


def cri_version_or_none(path: str) -> str | None:
    """Like `cri_version`, but None also when the socket does not answer (yet)."""
    try:
        return cri_version(path)
    except EngineUnavailable:
        return None
