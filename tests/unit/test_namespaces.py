"""Namespace discovery's pure parts (mountinfo, diff, labels) and scan --all-netns's
output: worst namespace first, every service carrying its namespace and container,
markdown stamped with when and where."""

from __future__ import annotations

import json

from ctfix import __version__
from ctfix.core.model import ContainerRef, Diagnosis, Reason, Verdict
from ctfix.core.netns_scan import NamespaceKind, NamespaceScan, all_services, worst_first
from ctfix.platform.namespaces import NamespaceRef, _unique_labels, diff, netns_mounts, ordered
from ctfix.render import scan_all
from ctfix.render.scan import render_markdown

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
42 22 0:25 /netns /run/netns rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,mode=755
43 42 0:4 net:[4026532247] /run/netns/blue rw shared:2 - nsfs nsfs rw
44 42 0:4 net:[4026532247] /run/netns/blue rw shared:2 - nsfs nsfs rw
45 22 0:4 mnt:[4026532300] /run/mntns/x rw shared:9 - nsfs nsfs rw
46 22 0:4 net:[4026532399] /var/run/docker/netns/1a2b3c4d5e6f rw shared:7 - nsfs nsfs rw
47 42 0:4 net:[4026532400] /run/netns/with\\040space rw shared:8 - nsfs nsfs rw
48 22 0:26 / /proc rw,nosuid - proc proc rw
"""


def test_only_network_namespace_bind_mounts_are_taken_from_mountinfo() -> None:
    assert netns_mounts(MOUNTINFO) == [
        (4026532247, "/run/netns/blue"),
        (4026532247, "/run/netns/blue"),
        (4026532399, "/var/run/docker/netns/1a2b3c4d5e6f"),
        (4026532400, "/run/netns/with space"),
    ]
    assert netns_mounts("garbage\n\n - nsfs\n") == []


def ref(ident: int, label: str, kind: NamespaceKind = "ip-netns", path: str = "") -> NamespaceRef:
    return NamespaceRef(
        id=ident,
        dev=4,
        inode=ident,
        path=path or f"/run/netns/{label}",
        label=label,
        spec=label,
        kind=kind,
    )


def test_diff_says_what_appeared_went_and_was_renamed() -> None:
    before = {1: ref(1, "host", "host"), 2: ref(2, "blue"), 3: ref(3, "pid:42", "process")}
    after = {
        1: ref(1, "host", "host"),
        3: ref(3, "web", "container"),  # its container's name became known
        4: ref(4, "blue"),  # a new namespace under the old name
    }
    changes = diff(before, after)
    assert [r.id for r in changes.added] == [4]
    assert [r.id for r in changes.removed] == [2]
    assert [r.label for r in changes.changed] == ["web"]
    assert diff(after, after) == diff({}, {}) == type(changes)((), (), ())


def test_labels_are_unique_and_the_host_comes_first() -> None:
    found = {5: ref(5, "web"), 2: ref(2, "web", "container"), 9: ref(9, "host", "host")}
    refs = _unique_labels(found)
    assert sorted(r.label for r in refs.values()) == ["host", "web", "web#5"]
    assert [r.kind for r in ordered(refs)] == ["host", "container", "ip-netns"]


def diagnosis(port: int, netns: str, verdict: Verdict) -> Diagnosis:
    code = {"broken": "wrong-source-seen", "at-risk": "client-network-exposed"}.get(
        verdict, "specific-bind"
    )
    web = ContainerRef("f" * 64, "web", "docker") if netns == "web" else None
    return Diagnosis(port, netns, verdict, (Reason(code, f"{code}."),), netns_container=web)


def scans() -> list[NamespaceScan]:
    web = ContainerRef("f" * 64, "web", "docker")
    return [
        NamespaceScan("host", "/proc/1/ns/net", "host", 1, None, (diagnosis(53, "host", "ok"),)),
        NamespaceScan(
            "web",
            "container:web",
            "container",
            2,
            web,
            (diagnosis(5353, "web", "broken"), diagnosis(123, "web", "ok")),
        ),
        NamespaceScan("blue", "blue", "ip-netns", 3, None, (diagnosis(67, "blue", "at-risk"),)),
        NamespaceScan("dark", "dark", "ip-netns", 6, None, (diagnosis(69, "dark", "unknown"),)),
        NamespaceScan("empty", "empty", "ip-netns", 4),
        NamespaceScan("went", "went", "ip-netns", 5, skipped="gone during the scan", gone=True),
    ]


def test_namespaces_worst_first_and_services_worst_first_overall() -> None:
    order = ["web", "blue", "dark", "host", "empty", "went"]
    assert [s.netns for s in worst_first(scans())] == order
    pairs = [(scan.netns, d.port) for scan, d in all_services(scans())]
    assert pairs == [("web", 5353), ("blue", 67), ("dark", 69), ("web", 123), ("host", 53)]


def test_json_services_carry_their_namespace_and_container_and_the_index_lists_all() -> None:
    document = json.loads(json.dumps(scan_all.scan_document(scans())))
    assert document["schema"] == 2 and document["all_netns"] is True
    # unknown services (ctfix cannot see) are counted as scan counts them (F17)
    assert document["counts"] == {"broken": 1, "at-risk": 1, "unknown": 1, "ok": 2}
    assert sum(document["counts"].values()) == len(document["services"])
    services = document["services"]
    assert [(s["netns"], s["port"]) for s in services][:2] == [("web", 5353), ("blue", 67)]
    assert services[0]["netns_container"]["name"] == "web"
    assert services[1]["netns_container"] is None
    index = {ns["netns"]: ns for ns in document["namespaces"]}
    assert set(index) == {"host", "web", "blue", "dark", "empty", "went"}
    assert index["went"]["gone"] is True and index["went"]["skipped"]
    assert index["web"]["container"]["engine"] == "docker"
    assert index["web"]["counts"] == {"broken": 1, "at-risk": 0, "unknown": 0, "ok": 1}
    assert index["dark"]["counts"]["unknown"] == 1


def test_text_groups_services_under_their_namespace_worst_namespace_first() -> None:
    text = scan_all.render_text(scans(), stamp="STAMP")
    lines = text.splitlines()
    assert lines[1].strip() == "STAMP"
    headings = [line.split(":")[0] for line in lines if line.startswith("namespace ")]
    assert headings == ["namespace web", "namespace blue", "namespace dark", "namespace host"]
    assert "1 unknown" in lines[0]  # the headline counts what ctfix cannot see
    web = lines.index(next(line for line in lines if line.startswith("namespace web")))
    assert "5353" in lines[web + 1] and "123" in lines[web + 2]
    assert any("went" in line and line.startswith("skipped") for line in lines)


def test_markdown_reports_start_with_when_where_and_which_ctfix() -> None:
    for document in (
        scan_all.render_markdown(scans()),
        render_markdown([diagnosis(53, "h", "ok")], "h"),
    ):
        first = document.splitlines()[0]
        assert "UTC" in first and f"ctfix {__version__}" in first
