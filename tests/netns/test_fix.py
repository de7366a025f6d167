"""`ctfix fix` against an unmodified broken server in the lab topology.

What a user notices: clients get replies after --apply, the dry run changes nothing,
and after --revert the namespace's routing and netfilter state is what it was
(compared as the tools print it), also after a `kill -9` in the middle of an apply.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctfix.lab.topology import (
    BRIDGE_V4,
    BRIDGE_V6,
    UPLINK_V4,
    UPLINK_V6,
    Netfilter,
    Topology,
    family_of,
    lab_topology,
    udp_exchange,
    wait_udp_bound,
)
from ctfix.platform import netns
from ctfix.platform.remedy import PAUSE_ENV
from tests.netns.kernel import namespace_state

PORT = 56789
ALL_ADDRESSES = (UPLINK_V4, BRIDGE_V4, UPLINK_V6, BRIDGE_V6)
#: what an iptables-legacy table ctfix had to load looks like after revert.
EMPTY_RAW = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


def _lab(netfilter: Netfilter) -> Iterator[Topology]:
    with lab_topology(ipv6=True, netfilter=netfilter) as topo:
        server = topo.spawn(
            topo.host, [sys.executable, "-m", "ctfix", "serve", "--broken", "--port", str(PORT)]
        )
        wait_udp_bound(server.pid, PORT)
        yield topo


@pytest.fixture(params=["nft", "iptables-legacy"])
def broken_lab(request: pytest.FixtureRequest) -> Iterator[Topology]:
    yield from _lab(request.param)


@pytest.fixture
def nft_lab() -> Iterator[Topology]:
    yield from _lab("nft")


@pytest.fixture
def legacy_lab() -> Iterator[Topology]:
    yield from _lab("iptables-legacy")


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CTFIX_STATE_DIR", str(tmp_path))
    return tmp_path


def schema2(document: dict[str, Any], topo: Topology) -> dict[str, Any]:
    """The document, after checking it starts with the schema-2 envelope."""
    assert list(document)[:5] == ["schema", "generated", "host", "ctfix", "netns"], document
    assert document["schema"] == 2 and document["netns"] == topo.host
    return document


def ctfix_fix(topo: Topology, *args: str, env: dict[str, str] | None = None) -> (
    subprocess.CompletedProcess[str]
):
    return subprocess.run(
        [sys.executable, "-m", "ctfix", "fix", *args, "--netns", topo.host],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def kernel_state(topo: Topology) -> dict[str, str]:
    """Everything fix may touch, as the tools print it (timestamps, counters removed)."""
    return namespace_state(topo, topo.host)


def answered(topo: Topology, address: str) -> bool:
    return udp_exchange(topo.container, address, PORT, timeout=0.5).answered


def answered_from_port(topo: Topology, address: str, client_port: int) -> bool:
    """A connected client on a fixed source port (ntpd's 123, an SNMP manager)."""
    family = family_of(address)
    with netns.entered(topo.container):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", client_port))
        sock.settimeout(0.5)
        sock.connect((address, PORT))
        sock.send(b"ctfix-fixed-port")
        return sock.recv(100) == b"ctfix-fixed-port"
    except (TimeoutError, ConnectionRefusedError):
        return False
    finally:
        sock.close()


def start_apply(
    topo: Topology, port: int = PORT, *, pause: str = "0", env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`ctfix fix PORT --method snat-zone --apply` in the background, pausing `pause`
    seconds between steps (the test hook), so a test can act in the middle."""
    return subprocess.Popen(
        [sys.executable, "-m", "ctfix", "fix", str(port), "--method", "snat-zone",
         "--apply", "--netns", topo.host],
        env={**(env or os.environ), PAUSE_ENV: pause},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_steps(
    topo: Topology, ready: Callable[[list[dict[str, Any]]], bool], interval: float = 0.1
) -> list[dict[str, Any]]:
    """Poll the state file until the first recorded fix's steps satisfy ready (or 20 s
    pass); return those steps. The file itself, not `fix --status`: a status asks the
    kernel about every step (seconds on a loaded machine), and an apply that pauses
    0.4 s per step would be over before it answered."""
    del topo  # the state directory (CTFIX_STATE_DIR) holds this test's namespace only
    deadline = time.monotonic() + 20
    steps: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        fixes = [
            fix
            for path in sorted(Path(os.environ["CTFIX_STATE_DIR"]).glob("netns-*.json"))
            for _port, fix in sorted(json.loads(path.read_text())["fixes"].items())
        ]
        steps = fixes[0]["steps"] if fixes else []
        if ready(steps):
            break
        time.sleep(interval)
    return steps


def without_members(state: dict[str, str]) -> dict[str, str]:
    """The remembered clients (set members and their timers), which traffic changes."""
    cleaned = dict(state)
    cleaned["nft"] = re.sub(r"\s*elements = \{[^}]*\}", "", state["nft"])
    cleaned["ipset"] = re.sub(r"Members:\n(?:.+\n)*", "Members:\n", state["ipset"])
    cleaned["ipset"] = re.sub(r"References: \d+|Size in memory: \d+", "", cleaned["ipset"])
    return cleaned


def without_loaded_raw(after: dict[str, str], before: dict[str, str]) -> dict[str, str]:
    """Drop an empty `raw` table the fix loaded: the kernel cannot unload it (see
    ctfix/platform/remedy/legacy.py); the apply output announces it."""
    cleaned = dict(after)
    for key in ("iptables-legacy-save", "ip6tables-legacy-save"):
        if "*raw" not in before[key]:
            cleaned[key] = after[key].replace(EMPTY_RAW, "")
    return cleaned


def test_policy_route_refuses_to_break_the_clients_of_their_gateway(nft_lab: Topology) -> None:
    """Only the uplink is in conntrack, but the containers may use 192.0.2.1 (their
    gateway) at any time: a route from 198.51.100.13 would break them, so no."""
    topo = nft_lab
    assert not answered(topo, UPLINK_V4) and not answered(topo, UPLINK_V6)
    before = kernel_state(topo)
    refused = ctfix_fix(topo, str(PORT), "--method", "policy-route", "--apply")
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "policy-route would break clients in 192.0.2.0/24 that address 192.0.2.1" in line
    assert "clients in 2001:db8:1::/64 that address 2001:db8:1::1" in line  # QA P8: all
    assert "use --method snat-zone" in line and "--force" in line
    assert kernel_state(topo) == before
    assert answered(topo, BRIDGE_V4)


def test_policy_route_forced_fixes_the_uplink_warns_and_reverts_exactly(
    nft_lab: Topology,
) -> None:
    topo = nft_lab
    # Clients that address the uplink: broken, and now in conntrack as evidence.
    # (No request to the bridge address yet: that would be evidence of mixed addressing.)
    assert not answered(topo, UPLINK_V4) and not answered(topo, UPLINK_V6)
    before = kernel_state(topo)

    dry = ctfix_fix(topo, str(PORT), "--method", "policy-route", "--force")
    assert dry.returncode == 0, dry.stderr
    assert "dry run, nothing changed" in dry.stdout
    assert "ip route add 192.0.2.0/24 dev br0 src 198.51.100.13" in dry.stdout
    assert "warning: --force: replies to 192.0.2.0/24 will leave from 198.51.100.13" in dry.stdout
    assert dry.stdout.rstrip().endswith(
        f"apply with: ctfix fix {PORT} --method policy-route --force --netns {topo.host} --apply"
    )
    assert kernel_state(topo) == before

    applied = ctfix_fix(topo, str(PORT), "--method", "policy-route", "--force", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert "192.0.2.3 now leaves from 198.51.100.13" in applied.stdout
    # The warning names exactly who pays for it, and they do.
    assert (
        "warning: --force: replies to 192.0.2.0/24 will leave from 198.51.100.13; clients in "
        "192.0.2.0/24 that address 192.0.2.1 (the host's own address on br0, their gateway) "
        "will get no answer until --revert" in applied.stdout
    )
    assert answered(topo, UPLINK_V4) and answered(topo, UPLINK_V6)
    assert not answered(topo, BRIDGE_V4)
    fixed = kernel_state(topo)

    again = ctfix_fix(topo, str(PORT), "--method", "policy-route", "--force", "--apply")
    assert again.returncode == 0, again.stderr
    assert "already applied" in again.stdout
    assert kernel_state(topo) == fixed

    reverted = ctfix_fix(topo, "--revert", str(PORT))
    assert reverted.returncode == 0, reverted.stderr
    assert kernel_state(topo) == before
    assert not answered(topo, UPLINK_V4) and answered(topo, BRIDGE_V4)


def test_snat_zone_fixes_clients_of_both_addresses(broken_lab: Topology) -> None:
    topo = broken_lab
    assert [answered(topo, a) for a in ALL_ADDRESSES] == [False, True, False, True]
    before = kernel_state(topo)

    dry = ctfix_fix(topo, str(PORT), "--method", "snat-zone")
    assert dry.returncode == 0, dry.stderr
    backend = "nftables" if topo.netfilter == "nft" else "iptables-legacy"
    assert f"backend {backend}" in dry.stdout
    assert kernel_state(topo) == before

    applied = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply")
    assert applied.returncode == 0, applied.stderr
    # Twice each: the second request of a client goes through the remembered path.
    for _ in range(2):
        assert [answered(topo, a) for a in ALL_ADDRESSES] == [True, True, True, True]
    fixed = kernel_state(topo)

    again = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply")
    assert again.returncode == 0 and "already applied" in again.stdout
    assert without_members(kernel_state(topo)) == without_members(fixed)

    status = ctfix_fix(topo, "--status", "--json")
    [fix] = schema2(json.loads(status.stdout), topo)["fixes"]
    assert fix["method"] == "snat-zone" and fix["complete"]
    # --status PORT (QA F5: the runbook's `ctfix fix P --status`) narrows it to the port
    mine = ctfix_fix(topo, "--status", str(PORT), "--json")
    [only] = json.loads(mine.stdout)["fixes"]
    assert mine.returncode == 0 and (only["port"], only["steps"]) == (PORT, fix["steps"])
    other = ctfix_fix(topo, "--status", str(PORT + 1), "--json")
    assert other.returncode == 0 and json.loads(other.stdout)["fixes"] == []
    assert all(step["present"] for step in fix["steps"])
    text = ctfix_fix(topo, "--status")
    assert text.returncode == 0 and "applied" in text.stdout
    objects = [obj for step in fix["steps"] for obj in step["step"]["creates"]]
    lines = text.stdout.splitlines()
    for obj in objects:  # one object per line
        assert sum(line.rstrip().endswith(obj) for line in lines) == 1, (obj, text.stdout)

    reverted = ctfix_fix(topo, "--revert")
    assert reverted.returncode == 0, reverted.stderr
    removed = [line.strip() for line in reverted.stdout.splitlines() if "  removed " in line]
    assert sorted(removed) == sorted(f"removed {obj}" for obj in objects)  # one per line
    after = kernel_state(topo)
    if topo.netfilter == "iptables-legacy" and "*raw" not in before["iptables-legacy-save"]:
        assert "cannot unload" in applied.stdout
        after = without_loaded_raw(after, before)
    assert after == before
    assert not answered(topo, UPLINK_V4)


def test_snat_zone_client_with_a_fixed_port_alternating_addresses(
    broken_lab: Topology,
) -> None:
    """QA P2: one client (address, port) asks the bridge address, the uplink, the
    bridge again...: every request is answered, from the address it was sent to (the
    bridge's replies, which worked before the fix, must not be rewritten)."""
    topo = broken_lab
    assert [answered(topo, a) for a in ALL_ADDRESSES] == [False, True, False, True]
    applied = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply")
    assert applied.returncode == 0, applied.stderr
    for bridge, uplink in ((BRIDGE_V4, UPLINK_V4), (BRIDGE_V6, UPLINK_V6)):
        sequence = (bridge, uplink, bridge, uplink, bridge)
        assert [answered_from_port(topo, a, 40123) for a in sequence] == [True] * 5, bridge
    assert ctfix_fix(topo, "--revert").returncode == 0


def test_snat_zone_plans_only_for_what_a_wildcard_socket_receives(nft_lab: Topology) -> None:
    """QA P6: an IPv4 socket bound to the uplink next to an IPv6-only wildcard. IPv4
    has no wrong-source problem (the bridge address has no IPv4 listener at all), so
    the fix covers the IPv6 uplink only."""
    topo = nft_lab
    port = 5353
    # recvfrom/sendto echo servers in one process each (socat's fork re-listens after
    # every datagram, and a request in that gap got ICMP port unreachable: flaky).
    echo = (
        "import socket, sys\n"
        "family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
        "s = socket.socket(family, socket.SOCK_DGRAM)\n"
        "if family == socket.AF_INET6:\n"
        "    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n"
        "s.bind((sys.argv[1], int(sys.argv[2])))\n"
        "while True:\n"
        "    data, peer = s.recvfrom(2048)\n"
        "    s.sendto(data, peer)\n"
    )
    bound = topo.spawn(topo.host, [sys.executable, "-c", echo, UPLINK_V4, str(port)])
    wild6 = topo.spawn(topo.host, [sys.executable, "-c", echo, "::", str(port)])
    wait_udp_bound(bound.pid, port, address=UPLINK_V4)
    wait_udp_bound(wild6.pid, port, address="::")

    def replies() -> list[bool]:
        return [udp_exchange(topo.container, a, port, timeout=0.5).answered
                for a in ALL_ADDRESSES]

    assert replies() == [True, False, False, True]
    dry = ctfix_fix(topo, str(port), "--method", "snat-zone", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = schema2(json.loads(dry.stdout), topo)["plan"]
    # The nftables batch is JSON data, the very commands --apply gives libnftables.
    [table] = [step["spec"] for step in plan["steps"] if step["spec"]["kind"] == "nft-table"]
    assert table["batch"][0] == {"add": {"table": {"family": "inet", "name": f"ctfix_{port}"}}}
    creates = [obj for step in plan["steps"] for obj in step["creates"]]
    assert [obj for obj in creates if obj.startswith("set ")] == [
        f"set clients6_0: clients that sent to [{UPLINK_V6}]:{port}"
    ]
    assert any("no IPv4 wildcard socket" in note for note in plan["notes"])
    assert ctfix_fix(topo, str(port), "--method", "snat-zone", "--apply").returncode == 0
    assert replies() == [True, False, True, True]
    assert ctfix_fix(topo, "--revert").returncode == 0


def test_snat_zone_client_with_a_fixed_port_moving_between_two_uplink_addresses(
    broken_lab: Topology,
) -> None:
    """Two rewritten addresses: a NAT binding is made once per conntrack entry, so
    each address needs a zone of its own or the client keeps the first one's."""
    topo = broken_lab
    second = "198.51.100.14"
    topo.ip(topo.host, f"addr add {second}/24 dev {topo.uplink}\n")
    assert [answered(topo, a) for a in (UPLINK_V4, second)] == [False, False]
    applied = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply")
    assert applied.returncode == 0, applied.stderr
    sequence = (UPLINK_V4, second, UPLINK_V4, BRIDGE_V4, second)
    assert [answered_from_port(topo, a, 40123) for a in sequence] == [True] * 5
    assert ctfix_fix(topo, "--revert").returncode == 0


def test_kill_9_in_the_middle_of_apply_then_revert_restores(legacy_lab: Topology) -> None:
    topo = legacy_lab
    assert not answered(topo, UPLINK_V4)
    before = kernel_state(topo)
    proc = start_apply(topo, pause="0.4")
    try:
        # Wait until a few steps are recorded (some done, one pending), then kill -9.
        wait_for_steps(topo, lambda steps: len(steps) >= 4)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate()
    status = ctfix_fix(topo, "--status")
    assert status.returncode == 1 and "INTERRUPTED" in status.stdout
    assert ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply").returncode == 2

    reverted = ctfix_fix(topo, "--revert", str(PORT))
    assert reverted.returncode == 0, reverted.stderr
    assert without_loaded_raw(kernel_state(topo), before) == before
    status = ctfix_fix(topo, "--status")
    assert status.returncode == 0 and "no fix recorded" in status.stdout
    # Reverting again is safe, and says so, with or without the port.
    for again in (ctfix_fix(topo, "--revert", str(PORT)), ctfix_fix(topo, "--revert")):
        assert again.returncode == 0 and "nothing changed" in again.stdout


def test_no_socket_and_no_evidence_is_refused_and_changes_nothing(nft_lab: Topology) -> None:
    before = kernel_state(nft_lab)
    refused = ctfix_fix(nft_lab, "40000", "--method", "snat-zone", "--apply")
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "no UDP socket on port 40000" in refused.stderr
    assert kernel_state(nft_lab) == before


def test_policy_route_refuses_mixed_addressing(nft_lab: Topology) -> None:
    answered(nft_lab, UPLINK_V4)
    answered(nft_lab, BRIDGE_V4)
    before = kernel_state(nft_lab)
    refused = ctfix_fix(nft_lab, str(PORT), "--method", "policy-route", "--apply")
    assert refused.returncode == 2
    assert "use --method snat-zone" in refused.stderr
    assert kernel_state(nft_lab) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_in_the_middle_of_apply_rolls_back(legacy_lab: Topology, signum: int) -> None:
    """What an operator's Ctrl-C, a service manager's SIGTERM or a closed terminal's
    SIGHUP leave behind: nothing, and one line saying so."""
    topo = legacy_lab
    assert not answered(topo, UPLINK_V4)
    before = kernel_state(topo)
    proc = start_apply(topo, pause="0.3")
    try:
        wait_for_steps(topo, lambda steps: len(steps) >= 3)
        os.kill(proc.pid, signum)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum
    name = signal.Signals(signum).name
    assert f"interrupted ({name}); rolled back" in err and "nothing changed" in err
    assert without_loaded_raw(kernel_state(topo), before) == before
    status = ctfix_fix(topo, "--status")
    assert status.returncode == 0 and "no fix recorded" in status.stdout
    assert not answered(topo, UPLINK_V4)


def test_apply_waits_for_the_xtables_lock_like_iptables_w(
    legacy_lab: Topology, tmp_path: Path
) -> None:
    """QA P8: while another program (Docker, firewalld: `iptables -w`) holds the
    xtables lock, ctfix changes no iptables table; it goes on once the lock is free."""
    topo = legacy_lab
    assert not answered(topo, UPLINK_V4)
    lock = tmp_path / "xtables.lock"  # not /run/xtables.lock: the host's Docker uses that
    env = {**os.environ, "XTABLES_LOCKFILE": str(lock)}
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = start_apply(topo, env=env)
        try:
            # The ipsets come first (ipset has no such lock); the first iptables rule
            # then waits for the lock.
            steps = wait_for_steps(
                topo, lambda steps: any(s["step"]["spec"]["kind"] == "iptables-rule" for s in steps)
            )
            time.sleep(0.5)  # time enough to commit, were it not waiting
            assert [s["step"]["spec"]["kind"] for s in steps][-1] == "iptables-rule"
            assert steps[-1]["status"] == "pending"
            assert proc.poll() is None
            assert "ctfix:" not in topo.run(topo.host, "iptables-legacy-save")
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "ctfix:56789" in topo.run(topo.host, "iptables-legacy-save")
    assert answered(topo, UPLINK_V4)
    assert ctfix_fix(topo, "--revert").returncode == 0


def test_dry_run_apply_line_keeps_netns_and_backend(legacy_lab: Topology) -> None:
    """Pasting the dry run's last line applies the same plan in the same namespace."""
    topo = legacy_lab
    assert not answered(topo, UPLINK_V4)
    dry = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--backend", "iptables-legacy")
    last = dry.stdout.rstrip().splitlines()[-1]
    assert last == (
        f"apply with: ctfix fix {PORT} --method snat-zone --backend iptables-legacy "
        f"--netns {topo.host} --apply"
    )
    argv = shlex.split(last.removeprefix("apply with: "))
    pasted = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60
    )
    assert pasted.returncode == 0, pasted.stderr
    assert f"in netns {topo.host}" in pasted.stdout
    assert "ctfix-56789-v4-0" in topo.run(topo.host, "ipset", "list", "-n")
    assert answered(topo, UPLINK_V4)
    reverted = ctfix_fix(topo, "--revert", "--json")  # QA P8: JSON when asked
    assert reverted.returncode == 0, reverted.stderr
    [fix] = schema2(json.loads(reverted.stdout), topo)["reverted"]
    assert (fix["port"], fix["method"], fix["backend"]) == (PORT, "snat-zone", "iptables-legacy")
    assert fix["removed_steps"] == fix["recorded"] and "ipset ctfix-56789-v4-0" in " ".join(
        fix["removed"]
    )
    assert "ctfix-56789" not in topo.run(topo.host, "ipset", "list", "-n")
    again = json.loads(ctfix_fix(topo, "--revert", "--json").stdout)
    assert again["changed"] is False and again["reverted"] == []
    assert again["reason"] == f"nothing recorded in netns {topo.host}"


RULES = """version: 1
services:
  - id: test-echo
    name: the test echo server
    processes: [test-echo]
    cmdline_patterns: ['serve --broken']
    ports: [56789]
    affected_when_wildcard: true
    why: it answers with recvfrom/sendto on a wildcard socket
    fix: start it with --bind ADDRESS, once per address
    snippet: 'test-echo --bind 192.0.2.1 --bind 198.51.100.13'
    reference: https://example.org/test-echo
    confidence: high
"""


def test_bind_uses_local_rules_and_needs_no_privilege(nft_lab: Topology, tmp_path: Path) -> None:
    topo = nft_lab
    (tmp_path / "mine.yaml").write_text(RULES)
    advised = ctfix_fix(topo, str(PORT), "--method", "bind", "--rules", str(tmp_path))
    assert advised.returncode == 0, advised.stderr
    assert "is the test echo server: start it with --bind ADDRESS" in advised.stdout
    assert "test-echo --bind 192.0.2.1 --bind 198.51.100.13" in advised.stdout
    assert f"ctfix serve --port {PORT}" in advised.stdout and "PORT" not in advised.stdout

    refused = ctfix_fix(topo, str(PORT), "--method", "bind", "--apply")
    assert refused.returncode == 2 and "nothing to apply" in refused.stderr

    # No capabilities at all (root's uid kept, so that the checkout stays readable
    # wherever CI clones it): the advice still comes, nothing needed CAP_NET_ADMIN.
    unprivileged = subprocess.run(
        ["ip", "netns", "exec", topo.host, "setpriv", "--inh-caps=-all", "--bounding-set=-all",
         sys.executable, "-m", "ctfix", "fix", str(PORT), "--method", "bind"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2],
    )
    assert unprivileged.returncode == 0, unprivileged.stderr
    assert f"ctfix serve --port {PORT}" in unprivileged.stdout
    assert "CapEff:\t0000000000000000" in subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "cat", "/proc/self/status"],
        capture_output=True, text=True, check=True,
    ).stdout


def test_backend_with_policy_route_is_refused(nft_lab: Topology) -> None:
    refused = ctfix_fix(nft_lab, str(PORT), "--method", "policy-route", "--backend", "nft")
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("drop --backend")


# -- objects ctfix did not make, and two applies at once (final review B1, B4) ---------


def test_a_foreign_nft_table_with_ctfix_name_is_refused_and_left_byte_identical(
    nft_lab: Topology,
) -> None:
    """Somebody else's `table inet ctfix_<port>` (or ours, its state file lost: the
    state dir is empty) is not ctfix's to delete: apply refuses in one line and the
    table, with its foreign chain, stays exactly as it was."""
    topo = nft_lab
    assert not answered(topo, UPLINK_V4)
    topo.run(topo.host, "nft", "add", "table", "inet", f"ctfix_{PORT}")
    topo.run(topo.host, "nft", "add", "chain", "inet", f"ctfix_{PORT}", "theirs",
             "{ type filter hook input priority 0 ; policy accept ; }")
    topo.run(topo.host, "nft", "add", "rule", "inet", f"ctfix_{PORT}", "theirs",
             "udp", "dport", "9", "counter", "accept")
    before = kernel_state(topo)
    assert "chain theirs" in before["nft"]

    refused = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--force", "--apply")
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert f"table inet ctfix_{PORT}: it is already in the kernel" in line
    assert "no record of making it" in line and "nothing changed" in line
    assert "rolled back" not in line
    assert kernel_state(topo) == before
    status = ctfix_fix(topo, "--status")
    assert status.returncode == 0 and "no fix recorded" in status.stdout


def test_a_foreign_route_in_ctfix_routing_table_is_refused_and_left_alone(
    nft_lab: Topology,
) -> None:
    """A route somebody put in the table ctfix would use for the port (its range,
    0xC7F00000+port) is refused up front, not deleted by a rollback."""
    from ctfix.core.plan import table_id

    topo = nft_lab
    assert not answered(topo, UPLINK_V4) and not answered(topo, UPLINK_V6)
    topo.ip(topo.host, f"route add 192.0.2.0/24 dev br0 table {table_id(PORT)}\n")
    before = kernel_state(topo)
    assert f"192.0.2.0/24 dev br0 table {table_id(PORT)}" in before["ip -4 route"]

    refused = ctfix_fix(topo, str(PORT), "--method", "policy-route", "--force", "--apply")
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert f"table {table_id(PORT)} already has a route to 192.0.2.0/24" in line
    assert "nothing changed" in line
    assert kernel_state(topo) == before


def test_two_applies_at_once_on_two_ports_both_recorded_both_revert(
    nft_lab: Topology,
) -> None:
    """Two operators (or two scripts) fix two ports of one host at the same moment:
    each apply keeps the other's record, so --status lists both and --revert removes
    both, leaving the namespace as it was."""
    topo = nft_lab
    second = PORT + 1
    server = topo.spawn(
        topo.host, [sys.executable, "-m", "ctfix", "serve", "--broken", "--port", str(second)]
    )
    wait_udp_bound(server.pid, second)
    ports = (PORT, second)
    for port in ports:
        assert not udp_exchange(topo.container, UPLINK_V4, port, timeout=0.5).answered
    before = kernel_state(topo)

    procs = [start_apply(topo, PORT, pause="1.5")]
    try:
        # The second starts while the first sits between recording and making its step.
        wait_for_steps(topo, bool, interval=0.05)
        procs.append(start_apply(topo, second))
        results = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err

    status = ctfix_fix(topo, "--status", "--json")
    assert status.returncode == 0, status.stdout
    fixes = json.loads(status.stdout)["fixes"]
    assert [(f["port"], f["complete"], f["whole"]) for f in fixes] == [
        (PORT, True, True), (second, True, True)
    ]
    for port in ports:
        assert udp_exchange(topo.container, UPLINK_V4, port, timeout=0.5).answered

    reverted = ctfix_fix(topo, "--revert")
    assert reverted.returncode == 0, reverted.stderr
    assert f"port {PORT}: removed" in reverted.stdout
    assert f"port {second}: removed" in reverted.stdout
    assert without_members(kernel_state(topo)) == without_members(before)
    for port in ports:
        assert not udp_exchange(topo.container, UPLINK_V4, port, timeout=0.5).answered
