"""Build, use and always remove the lab topology of the write-up.

    container ns  eth0 192.0.2.3/24  2001:db8:1::3/64   default via the bridge
         |  (veth vc0, a port of br0)
    host ns       br0  192.0.2.1/24  2001:db8:1::1/64   (the docker0 role)
                  eth0 198.51.100.13/24 2001:db8:2::13/64 (the uplink)
         |  (veth)
    upstream ns   eth0 198.51.100.1/24 2001:db8:2::1/64   (no route anywhere else)

plus MASQUERADE for the container network leaving by anything but br0, as Docker
installs it (nftables or iptables-legacy), which also switches conntrack on.

Know before changing: every interface is created *inside* a namespace of this run
(veth peers are moved at creation), so deleting the run's namespaces removes
everything; nothing is ever created in the caller's namespace. Names carry a
per-run id so that two labs or test runs can coexist. Only documentation ranges.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from ctfix.errors import CtfixError, MissingFeatureError, PrivilegeError
from ctfix.platform import netns

PREFIX = "ctfix"

BRIDGE_V4 = "192.0.2.1"
CONTAINER_V4 = "192.0.2.3"
UPLINK_V4 = "198.51.100.13"
UPSTREAM_V4 = "198.51.100.1"
CONTAINER_NET_V4 = "192.0.2.0/24"
UPLINK_NET_V4 = "198.51.100.0/24"

BRIDGE_V6 = "2001:db8:1::1"
CONTAINER_V6 = "2001:db8:1::3"
UPLINK_V6 = "2001:db8:2::13"
UPSTREAM_V6 = "2001:db8:2::1"
CONTAINER_NET_V6 = "2001:db8:1::/64"
UPLINK_NET_V6 = "2001:db8:2::/64"

Netfilter = Literal["nft", "iptables-legacy", "none"]


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise CtfixError(f"`{' '.join(argv)}` failed: {detail[-1] if detail else proc.returncode}")
    return proc


def require_tools(*tools: str) -> None:
    """Fail with one line naming the Debian package when a tool is missing."""
    packages = {
        "ip": "iproute2",
        "sysctl": "procps",
        "nft": "nftables",
        "iptables-legacy": "iptables",
        "ip6tables-legacy": "iptables",
        "conntrack": "conntrack",
        "ipset": "ipset",
    }
    for tool in tools:
        if shutil.which(tool) is None:
            raise MissingFeatureError(
                f"`{tool}` is not installed",
                f"apt-get install {packages.get(tool, tool)} (or run scripts/setup)",
            )


@dataclass
class Namespaces:
    """The network namespaces of one run (named `ctfix-<run id>-<role>`) and the
    processes started in them: what every topology shares. Subclasses say which
    namespaces they have (`namespaces`) and build them."""

    run_id: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list, kw_only=True)

    def name(self, role: str) -> str:
        return f"{PREFIX}-{self.run_id}-{role}"

    @property
    def namespaces(self) -> tuple[str, ...]:
        raise NotImplementedError

    def build(self) -> None:
        raise NotImplementedError

    # -- commands in a namespace -------------------------------------------------

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, *argv: str, stdin: str | None = None) -> str:
        """Run a command in ns, return its stdout; a failure raises CtfixError."""
        return _run(self.exec_argv(ns, argv), stdin=stdin).stdout

    def ip(self, ns: str, batch: str) -> None:
        """Run `ip` commands (one per line, without the leading `ip`) in ns."""
        _run(["ip", "-n", ns, "-batch", "-"], stdin=batch)

    def spawn(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = subprocess.DEVNULL,
        stdin: int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start a process in ns; it is stopped (by pid) at teardown at the latest."""
        proc = subprocess.Popen(
            self.exec_argv(ns, argv),
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # its own process group: stop() ends all of it
        )
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 2.0) -> None:
        """Stop a process this topology started and what it started in turn: SIGTERM,
        then SIGKILL, to its process group (spawn makes one per process), so that the
        rest of a pipeline such as `sh -c 'feed | nc -ul P'` does not outlive it."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        # The leader is gone; give the rest of its group a moment, then insist.
        deadline = time.monotonic() + min(timeout, 0.5)
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        _signal_group(proc.pid, signal.SIGKILL)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if proc in self.processes:
            self.processes.remove(proc)

    # -- building blocks ----------------------------------------------------------

    def create_namespaces(self) -> None:
        """Create every namespace of the run, with IPv6 DAD off (an address must be
        usable the moment it is reported up)."""
        for ns in self.namespaces:
            proc = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
            if proc.returncode != 0:
                if "Operation not permitted" in proc.stderr or os.geteuid() != 0:
                    raise PrivilegeError("creating network namespaces", "CAP_SYS_ADMIN")
                raise CtfixError(f"cannot create network namespace {ns}: {proc.stderr.strip()}")
            self.run(
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            )

    def veth(self, ns: str, name: str, peer_ns: str, peer_name: str) -> None:
        """A veth pair from ns (`name`) to peer_ns (`peer_name`), made inside ns, both
        ends up."""
        self.ip(ns, f"link add {name} type veth peer name {peer_name} netns {peer_ns}\n"
                    f"link set {name} up\n")
        self.ip(peer_ns, f"link set {peer_name} up\n")

    def forwarding(self, ns: str, ipv6: bool) -> None:
        """Make ns a router (IPv4, and IPv6 when asked)."""
        self.run(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if ipv6:
            self.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

    def destroy(self) -> None:
        """Stop our processes by pid, then delete our namespaces. Never raises."""
        for proc in list(self.processes):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=1.0)
        for ns in self.namespaces:
            if os.path.exists(os.path.join(netns.NETNS_RUN_DIR, ns)):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


AnyNamespaces = TypeVar("AnyNamespaces", bound=Namespaces)


@dataclass
class Topology(Namespaces):
    """The namespaces of one lab run, and the processes started in them."""

    ipv6: bool
    netfilter: Netfilter

    bridge = "br0"
    uplink = "eth0"
    container_if = "eth0"

    @property
    def host(self) -> str:
        return self.name("host")

    @property
    def container(self) -> str:
        return self.name("ctr")

    @property
    def upstream(self) -> str:
        return self.name("up")

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.host, self.container, self.upstream)

    # -- life cycle ---------------------------------------------------------------

    def build(self) -> None:
        require_tools("ip", "sysctl")
        if self.netfilter == "nft":
            require_tools("nft")
        elif self.netfilter == "iptables-legacy":
            require_tools("iptables-legacy", "ip6tables-legacy")
        self.create_namespaces()
        self.run(self.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        v6 = self.ipv6
        self.ip(
            self.host,
            f"""link set lo up
link add {self.bridge} type bridge
link add vc0 type veth peer name {self.container_if} netns {self.container}
link set vc0 master {self.bridge}
link add {self.uplink} type veth peer name eth0 netns {self.upstream}
addr add {BRIDGE_V4}/24 dev {self.bridge}
addr add {UPLINK_V4}/24 dev {self.uplink}
"""
            + (
                f"addr add {BRIDGE_V6}/64 dev {self.bridge} nodad\n"
                f"addr add {UPLINK_V6}/64 dev {self.uplink} nodad\n"
                if v6
                else ""
            )
            + f"link set {self.bridge} up\nlink set vc0 up\nlink set {self.uplink} up\n",
        )
        self.ip(
            self.container,
            f"link set lo up\naddr add {CONTAINER_V4}/24 dev {self.container_if}\n"
            + (f"addr add {CONTAINER_V6}/64 dev {self.container_if} nodad\n" if v6 else "")
            + f"link set {self.container_if} up\nroute add default via {BRIDGE_V4}\n"
            + (f"route add default via {BRIDGE_V6}\n" if v6 else ""),
        )
        self.ip(
            self.upstream,
            f"link set lo up\naddr add {UPSTREAM_V4}/24 dev eth0\n"
            + (f"addr add {UPSTREAM_V6}/64 dev eth0 nodad\n" if v6 else "")
            + "link set eth0 up\n",
        )
        self.load_masquerade()

    def load_masquerade(self) -> None:
        """Docker's rule: masquerade the container network leaving by another port."""
        if self.netfilter == "nft":
            families = [("ip", CONTAINER_NET_V4)] + (
                [("ip6", CONTAINER_NET_V6)] if self.ipv6 else []
            )
            ruleset = "".join(
                f"table {family} ctfix_lab {{\n chain postrouting {{\n"
                "  type nat hook postrouting priority srcnat; policy accept;\n"
                f'  {family} saddr {net} oifname != "{self.bridge}" masquerade\n }}\n}}\n'
                for family, net in families
            )
            self.run(self.host, "nft", "-f", "-", stdin=ruleset)
        elif self.netfilter == "iptables-legacy":
            nets = [("iptables-legacy", CONTAINER_NET_V4)]
            if self.ipv6:
                nets.append(("ip6tables-legacy", CONTAINER_NET_V6))
            for tool, net in nets:
                self.run(
                    self.host,
                    *[tool, "-w", "-t", "nat", "-A", "POSTROUTING", "-s", net],
                    *["!", "-o", self.bridge, "-j", "MASQUERADE"],
                )

    # -- addresses ----------------------------------------------------------------

    def local_addresses(self, family: int = socket.AF_INET) -> list[str]:
        """The host namespace's addresses a client can send to, for one family."""
        if family == socket.AF_INET6:
            return [UPLINK_V6, BRIDGE_V6] if self.ipv6 else []
        return [UPLINK_V4, BRIDGE_V4]


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the lab itself is killed (even -9)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def new_run_id() -> str:
    return f"{os.getpid() % 0xFFFF:04x}{secrets.token_hex(2)}"


@contextlib.contextmanager
def built(topo: AnyNamespaces) -> Iterator[AnyNamespaces]:
    """Build a topology, yield it, and always tear it down (a half-built one too)."""
    try:
        topo.build()
        yield topo
    finally:
        topo.destroy()


@contextlib.contextmanager
def lab_topology(
    *, ipv6: bool = False, netfilter: Netfilter = "nft", run_id: str | None = None
) -> Iterator[Topology]:
    """Build the topology, yield it, and always tear it down."""
    with built(Topology(run_id or new_run_id(), ipv6=ipv6, netfilter=netfilter)) as topo:
        yield topo


def leftover_namespaces(run_id: str | None = None) -> list[str]:
    """Namespaces named by ctfix's lab (of one run, or of any) that still exist."""
    try:
        names = os.listdir(netns.NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    stem = f"{PREFIX}-{run_id}-" if run_id else f"{PREFIX}-"
    return sorted(n for n in names if n.startswith(stem))


# -- traffic helpers (used by the lab narrative and the tests) -------------------------


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request from a client and what came back."""

    client: tuple[str, int]
    server: tuple[str, int]
    reply: bytes | None
    reply_from: tuple[str, int] | None

    @property
    def answered(self) -> bool:
        return self.reply is not None


def family_of(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def udp_exchange(
    ns: str,
    server: str,
    port: int,
    payload: bytes = b"ctfix-lab",
    *,
    timeout: float = 1.0,
    connect: bool = True,
    scope_id: int = 0,
) -> Exchange:
    """Send one datagram from a client socket in ns and wait for the reply.

    A `connect()`ed client (connect=True) is what real clients such as resolvers
    use: the kernel drops a reply from any other source and answers it with ICMP
    port unreachable. An unconnected client (connect=False) accepts any source,
    which shows where the reply actually came from.
    """
    family = family_of(server)
    with netns.entered(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        dest: tuple[str, int] | tuple[str, int, int, int] = (
            (server, port, 0, scope_id) if family == socket.AF_INET6 else (server, port)
        )
        if connect:
            sock.connect(dest)
            sock.send(payload)
        else:
            sock.sendto(payload, dest)
        client = sock.getsockname()[:2]
        deadline = time.monotonic() + timeout
        while True:
            try:
                data, peer = sock.recvfrom(65535)
            except (TimeoutError, ConnectionRefusedError):
                return Exchange(client, (server, port), None, None)
            if data == payload or time.monotonic() > deadline:
                return Exchange(client, (server, port), data, peer[:2])
    finally:
        sock.close()


def _proc_net_address(address: str) -> str:
    """An address as /proc/net/udp{,6} prints it: 32-bit words in host byte order."""
    packed = socket.inet_pton(family_of(address), address)
    return "".join(
        f"{int.from_bytes(packed[i : i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4)
    )


def wait_udp_bound(
    pid: int, port: int, timeout: float = 5.0, *, address: str | None = None
) -> None:
    """Wait until process pid's namespace has a UDP socket on port (server ready).

    With `address` ("0.0.0.0", "::", "192.0.2.1"...), only a socket bound to exactly
    that address counts: with two servers on one port in a namespace, the first one
    up must not make the second look ready.
    """
    port_hex = f"{port:04X}"
    wanted = f"{_proc_net_address(address)}:{port_hex}" if address else None
    tables = ("udp6",) if address and ":" in address else ("udp",) if address else ("udp", "udp6")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for table in tables:
            try:
                with open(f"/proc/{pid}/net/{table}") as fh:
                    rows = fh.read().splitlines()[1:]
            except FileNotFoundError:
                raise CtfixError(f"process {pid} exited before binding UDP port {port}") from None
            for row in rows:
                local = row.split(None, 2)[1]
                if local == wanted or (wanted is None and local.endswith(f":{port_hex}")):
                    return
        time.sleep(0.02)
    raise CtfixError(f"nothing bound UDP port {port} within {timeout:.0f}s (pid {pid})")
