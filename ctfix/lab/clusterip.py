"""`ctfix lab --scenario clusterip`: the Kubernetes story (kubernetes 95565).

A Service's ClusterIP is DNAT'd by kube-proxy to a hostNetwork backend on the same
node; a wildcard UDP server there answers a pod on the bridge (cni0) from the bridge
address; the reply does not match the DNAT'd conntrack entry, becomes a NEW flow, and
the pod gets nothing. On the lab's topology: the host is the node, br0 is cni0, the
container is a pod; the scenario adds kube-proxy's shape of rules (a services chain,
jumped to from prerouting and output, that jumps to one DNAT chain per endpoint) for
a ClusterIP on the lab's port and on another port, both DNAT'd to the node's uplink
address on the lab's port, and `ctfix serve --broken` on the node.

The story: the failure (both ports, with conntrack's two entries), explain's finding,
`ctfix fix --method snat-zone --apply` (replies now come from the ClusterIP and port
each pod asked; direct clients of the node's addresses too), `--status`, and the
revert (the ruleset exactly as before, and the failure back). Know before changing:
the verdict needs the failure AND the repair; the fix is recorded in a state
directory of the run's own, so nothing is left under /run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from typing import Any

from ctfix.core.addr import endpoint
from ctfix.lab import topology as t
from ctfix.lab.checks import (
    ApplyCheck,
    Check,
    ConntrackCheck,
    ExplainCheck,
    RevertCheck,
    Section,
    ServiceCheck,
    StatusCheck,
    Story,
)
from ctfix.lab.scenario import Report, server

CLUSTER_IP_V4 = "203.0.113.10"
CLUSTER_IP_V6 = "2001:db8:3::10"


def other_port(port: int) -> int:
    """The ClusterIP's second port, DNAT'd to another port (the lab's)."""
    return port + 1 if port < 65535 else port - 1


def _families(topo: t.Topology) -> list[tuple[int, str, str]]:
    """(family, ClusterIP, node address) for each family the lab runs."""
    found: list[tuple[int, str, str]] = [(socket.AF_INET, CLUSTER_IP_V4, t.UPLINK_V4)]
    if topo.ipv6:
        found.append((socket.AF_INET6, CLUSTER_IP_V6, t.UPLINK_V6))
    return found


# -- kube-proxy's rules ------------------------------------------------------------------


def load_service_rules(topo: t.Topology, port: int) -> None:
    """The ClusterIP on `port` and on `other_port(port)`, DNAT'd to the node's uplink
    address on `port`, in kube-proxy's chain shape, in the lab's netfilter."""
    other = other_port(port)
    if topo.netfilter == "nft":
        ruleset = ""
        for family, cluster_ip, node in _families(topo):
            nf = "ip6" if family == socket.AF_INET6 else "ip"
            ruleset += (
                f"table {nf} ctfix_lab_kube {{\n"
                " chain prerouting {\n  type nat hook prerouting priority dstnat; "
                "policy accept;\n  jump services\n }\n"
                " chain output {\n  type nat hook output priority -100; policy accept;\n"
                "  jump services\n }\n"
                " chain services {\n"
                f"  {nf} daddr {cluster_ip} udp dport {port} jump sep_same_port\n"
                f"  {nf} daddr {cluster_ip} udp dport {other} jump sep_other_port\n }}\n"
                f" chain sep_same_port {{\n  meta l4proto udp dnat to {node}\n }}\n"
                f" chain sep_other_port {{\n  meta l4proto udp dnat to "
                f"{endpoint(node, port)}\n }}\n}}\n"
            )
        topo.run(topo.host, "nft", "-f", "-", stdin=ruleset)
        return
    for family, cluster_ip, node in _families(topo):
        tool = "ip6tables-legacy" if family == socket.AF_INET6 else "iptables-legacy"

        def rule(*words: str, tool: str = tool) -> None:
            topo.run(topo.host, tool, "-w", "-t", "nat", *words)

        for chain in ("KUBE-SERVICES", "KUBE-SEP-SAME", "KUBE-SEP-OTHER"):
            rule("-N", chain)
        for hook in ("PREROUTING", "OUTPUT"):
            rule("-A", hook, "-j", "KUBE-SERVICES")
        for service_port, chain in ((port, "KUBE-SEP-SAME"), (other, "KUBE-SEP-OTHER")):
            rule("-A", "KUBE-SERVICES", "-d", cluster_ip, "-p", "udp", "-m", "udp",
                 "--dport", str(service_port), "-j", chain)
        rule("-A", "KUBE-SEP-SAME", "-p", "udp", "-j", "DNAT", "--to-destination", node)
        rule("-A", "KUBE-SEP-OTHER", "-p", "udp", "-j", "DNAT",
             "--to-destination", endpoint(node, port))


def ruleset(topo: t.Topology) -> str:
    """What the fix may change, as the tools print it (counters and comments out)."""
    if topo.netfilter == "nft":
        return topo.run(topo.host, "nft", "list", "ruleset")
    text = ""
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        saved = topo.run(topo.host, tool)
        text += re.sub(r"\[\d+:\d+\]", "[0:0]", "".join(
            line for line in saved.splitlines(keepends=True) if not line.startswith("#")
        ))
    return text + topo.run(topo.host, "ipset", "list", "-n")


#: what an iptables-legacy table ctfix had to load looks like after revert: the kernel
#: cannot unload it from a live namespace (the apply says so)
EMPTY_RAW = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


def _same_ruleset(before: str, after: str) -> bool:
    return after == before or ("*raw" not in before and after.replace(EMPTY_RAW, "") == before)


# -- the story ---------------------------------------------------------------------------------


def _ctfix(topo: t.Topology, state: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A ctfix command in the node's namespace, its fix state in the run's directory."""
    return subprocess.run(
        [sys.executable, "-m", "ctfix", *args, "--netns", topo.host],
        capture_output=True,
        text=True,
        env={**os.environ, "CTFIX_STATE_DIR": state},
        timeout=120,
        check=False,
    )


def _json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        found = json.loads(done.stdout)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _ask(
    topo: t.Topology, address: str, port: int, *, want: bool, timeout: float, **kind: bool
) -> ServiceCheck:
    """A connected pod asks address:port; want: a reply from exactly that."""
    ex = t.udp_exchange(topo.container, address, port, timeout=timeout)
    return ServiceCheck(ex.client, address, port, want, ex.reply_from, **kind)


def _conntrack(topo: t.Topology, cluster_ip: str, node: str, port: int) -> ConntrackCheck:
    """The DNAT'd request and the reply conntrack filed as a NEW flow."""
    from ctfix.platform import netns
    from ctfix.platform.conntrack import dump

    other = other_port(port)
    ex = t.udp_exchange(topo.container, cluster_ip, other, timeout=0.5)
    client, client_port = ex.client
    with netns.entered(topo.host):
        entries = list(dump(proto=17))
    request = next(
        (e for e in entries if (e.orig.src, e.orig.sport, e.orig.dst, e.orig.dport)
         == (client, client_port, cluster_ip, other) and e.reply.src == node),
        None,
    )
    reply = next(
        (e for e in entries if (e.orig.dst, e.orig.dport, e.orig.sport)
         == (client, client_port, port) and e.orig.src != node),
        None,
    )
    return ConntrackCheck(port, node, request, reply)


def _finding(topo: t.Topology, state: str, port: int, services: list[str]) -> ExplainCheck:
    found = _json(_ctfix(topo, state, "explain", str(port), "--json"))
    verdict = found.get("verdict")
    return ExplainCheck(
        port,
        verdict if isinstance(verdict, str) else None,
        tuple(sorted(f["service"] for f in found.get("forwarded_from", []))),
        tuple(services),
        tuple(f["method"] for f in found.get("fixes", []) if f.get("recommended")),
        tuple(
            r["text"]
            for r in found.get("reasons", [])
            if r.get("code") in ("forwarded-here-by-dnat", "client-network-exposed")
        ),
    )


def _apply(topo: t.Topology, state: str, port: int, services: list[str]) -> ApplyCheck:
    done = _ctfix(
        topo, state, "fix", str(port), "--method", "snat-zone", "--apply", "--listen", "0",
        "--json",
    )
    covers = [c["service"] for c in _json(done).get("plan", {}).get("covers", [])]
    error = done.stderr.strip() if done.returncode else ""
    return ApplyCheck(port, done.returncode, tuple(covers), tuple(services), error)


def _status(topo: t.Topology, state: str) -> StatusCheck:
    done = _ctfix(topo, state, "fix", "--status", "--json")
    fixes = _json(done).get("fixes") or [{}]
    effect = fixes[0].get("effect") or {}
    return StatusCheck(
        done.returncode, bool(fixes[0].get("ok")), str(effect.get("verdict", "unreadable"))
    )


def _revert(topo: t.Topology, state: str, port: int, before: str) -> RevertCheck:
    done = _ctfix(topo, state, "fix", "--revert", str(port))
    return RevertCheck(port, done.returncode, _same_ruleset(before, ruleset(topo)))


def run_story(topo: t.Topology, port: int, report: Report, *, timeout: float = 1.0) -> Story:
    """The failure, explain's finding, the snat-zone repair and the revert."""
    story = Story(port)
    other = other_port(port)

    def add(section: Section, *checks: Check) -> None:
        for check in checks:
            section.checks.append(check)
            report(check)

    def section(kind: str, pid: int) -> Section:
        part = Section(kind == "clusterip-failure", pid, kind=kind)
        report(part)
        return part

    load_service_rules(topo, port)
    services = [endpoint(ip, p) for _f, ip, _n in _families(topo) for p in (port, other)]
    with tempfile.TemporaryDirectory(prefix="ctfix-lab-") as state, server(
        topo, port, broken=True
    ) as proc:
        failure = section("clusterip-failure", proc.pid)
        for _family, cluster_ip, node in _families(topo):
            for service_port in (port, other):
                add(failure, _ask(topo, cluster_ip, service_port, want=False, timeout=timeout))
            add(failure, _conntrack(topo, cluster_ip, node, port))
        finding = section("clusterip-finding", proc.pid)
        add(finding, _finding(topo, state, port, services))
        story.bug += [failure, finding]

        before = ruleset(topo)
        repair = section("clusterip-repair", proc.pid)
        add(repair, _apply(topo, state, port, services))
        for _family, cluster_ip, _node in _families(topo):
            for service_port in (port, other):
                add(repair, _ask(topo, cluster_ip, service_port, want=True, timeout=timeout))
        for family, _cluster_ip, _node in _families(topo):
            for address in topo.local_addresses(family):
                add(repair, _ask(topo, address, port, want=True, timeout=timeout, direct=True))
        add(repair, _status(topo, state))
        undo = section("clusterip-revert", proc.pid)
        _family, cluster_ip, _node = _families(topo)[0]
        add(
            undo,
            _revert(topo, state, port, before),
            _ask(topo, cluster_ip, port, want=False, timeout=timeout, again=True),
        )
        story.fix += [repair, undo]
    return story
