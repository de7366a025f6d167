"""Container ids from cgroup paths, CRI protobuf decoding, and the engines ctfix asks."""

from __future__ import annotations

import pytest

from ctfix.core.model import ContainerRef
from ctfix.platform import engines
from ctfix.platform.containers import CgroupContainer, container_from_cgroup
from ctfix.platform.sockdiag import unit_from_cgroup
from ctfix.render.container import container_json, container_text

ID = "91fd6913a1154346fc700ba5018e1bbb0e8b711d6247466a997bb977a07b4eb3"


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        # Docker, cgroupfs driver, cgroup v1 (and the hybrid's unified line)
        (f"4:memory:/docker/{ID}\n0::/docker/{ID}\n", CgroupContainer(ID, "docker")),
        (f"12:pids:/docker/{ID}\n1:name=systemd:/docker/{ID}\n", CgroupContainer(ID, "docker")),
        # Docker, systemd driver, cgroup v2
        (f"0::/system.slice/docker-{ID}.scope\n", CgroupContainer(ID, "docker")),
        # Kubernetes with containerd (systemd driver) and with CRI-O
        (
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1c0a.slice/"
            f"cri-containerd-{ID}.scope\n",
            CgroupContainer(ID, "containerd"),
        ),
        (
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2.slice/crio-{ID}.scope",
            CgroupContainer(ID, "cri-o"),
        ),
        # Kubernetes, cgroupfs driver: the runtime is not in the path
        (f"0::/kubepods/besteffort/pod1c0a-22/{ID}\n", CgroupContainer(ID, None)),
        # Podman (root, systemd), with its `container` sub-cgroup; and cgroupfs
        (f"0::/machine.slice/libpod-{ID}.scope/container\n", CgroupContainer(ID, "podman")),
        (f"0::/libpod_parent/libpod-{ID}\n", CgroupContainer(ID, "podman")),
        # the runtimes' monitor processes (conmon) are not in the container
        (f"0::/machine.slice/libpod-conmon-{ID}.scope\n", None),
        (f"0::/system.slice/crio-conmon-{ID}.scope\n", None),
        # not a container
        ("0::/\n", None),
        ("0::/system.slice/ssh.service\n", None),
        ("0::/user.slice/user-0.slice/session-3.scope\n", None),
        ("", None),
    ],
)
def test_container_id_from_cgroup_paths(cgroup: str, expected: CgroupContainer | None) -> None:
    assert container_from_cgroup(cgroup) == expected


def test_unit_names_the_container_or_the_systemd_unit() -> None:
    assert unit_from_cgroup(f"0::/system.slice/docker-{ID}.scope\n") == f"docker:{ID[:12]}"
    assert unit_from_cgroup(f"0::/kubepods/burstable/pod9/{ID}\n") == f"container:{ID[:12]}"
    assert unit_from_cgroup("0::/system.slice/chrony.service\n") == "chrony.service"
    assert unit_from_cgroup("0::/user.slice/user-0.slice/session-3.scope\n") is None


def test_engines_follow_docker_host_and_cri_endpoint() -> None:
    default = engines.engines({})
    assert [(e.name, e.path) for e in default][:2] == [
        ("docker", "/var/run/docker.sock"),
        ("podman", "/run/podman/podman.sock"),
    ]
    chosen = engines.engines(
        {
            "DOCKER_HOST": "unix:///tmp/d.sock",
            "CONTAINER_RUNTIME_ENDPOINT": "unix:///run/crio/crio.sock",
        }
    )
    assert chosen[0].path == "/tmp/d.sock"
    assert [e.name for e in chosen if e.path == "/run/crio/crio.sock"] == ["cri-o"]
    # A TCP DOCKER_HOST is another daemon: not replaced by the default socket.
    remote = engines.engines({"DOCKER_HOST": "tcp://192.0.2.9:2376"})
    assert all(e.name != "docker" for e in remote)


def _map_entry(number: int, key: str, value: str) -> bytes:
    return engines.pb_bytes(
        number, engines.pb_bytes(1, key.encode()) + engines.pb_bytes(2, value.encode())
    )


def test_cri_container_status_answer_is_decoded() -> None:
    status = (
        engines.pb_bytes(1, ID.encode())
        + engines.pb_bytes(2, engines.pb_bytes(1, b"coredns") + b"\x10\x02")  # name, attempt
        + b"\x18\x01"  # state RUNNING (a varint field between)
        + _map_entry(12, "io.kubernetes.pod.name", "coredns-5d78c9869d-x2x9q")
        + _map_entry(12, "io.kubernetes.pod.namespace", "kube-system")
    )
    answer = engines.pb_bytes(1, status) + _map_entry(2, "info", '{"pid": 4242, "sandboxID": "x"}')
    record = engines.cri_status_response(answer)
    assert record is not None
    assert (record.id, record.name, record.pid) == (ID, "coredns", 4242)
    assert record.labels["io.kubernetes.pod.namespace"] == "kube-system"


def test_cri_list_entry_uses_its_own_field_numbers() -> None:
    container = (
        engines.pb_bytes(1, ID.encode())
        + engines.pb_bytes(2, b"sandbox")
        + engines.pb_bytes(3, engines.pb_bytes(1, b"api"))
        + _map_entry(8, "io.kubernetes.pod.name", "api-7d9f")
    )
    record = engines.cri_container(container, status=False)
    assert (record.name, record.labels) == ("api", {"io.kubernetes.pod.name": "api-7d9f"})


@pytest.mark.parametrize("garbage", [b"\x0a\xff", b"\x0a\x05ab", b"\xff\xff\xff", b"\x0b"])
def test_cri_decoder_rejects_truncated_or_odd_messages(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        list(engines.pb_fields(garbage))


def test_hpack_integers_use_their_prefix_then_continuation_bytes() -> None:
    # RFC 7541 C.1.1 and C.1.2: 10 in a 5-bit prefix; 1337 in a 5-bit prefix.
    assert engines._hpack_int(10, 5) == b"\x0a"
    assert engines._hpack_int(1337, 5) == b"\x1f\x9a\x0a"


def test_container_json_and_words() -> None:
    plain = ContainerRef(id=ID, name="web", engine="docker")
    assert container_json(plain) == {
        "id": ID,
        "name": "web",
        "engine": "docker",
        "pod": None,
        "namespace": None,
    }
    assert container_json(None) is None
    assert container_text(plain) == "container web"
    pod = ContainerRef(id=ID, name="api", engine="containerd", pod="api-7d9f", namespace="prod")
    assert container_text(pod) == "pod prod/api-7d9f (container api)"
