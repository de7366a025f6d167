"""A host with two uplinks (two providers), and a client on the internet behind both.

    host ns   wan1 198.51.100.13/24 2001:db8:100::13/64  default via isp1, metric 100
              wan2 192.0.2.13/24    2001:db8:200::13/64  default via isp2, metric 200
        |  (veth)                    |  (veth)
    isp1 ns   198.51.100.1           isp2 ns   192.0.2.1          (routers)
              203.0.113.1                      203.0.113.2
        |  (veth)                    |  (veth)
    net ns    bridge inet0: the client 203.0.113.7/24 2001:db8:300::7/64, with a route
              to each provider's customers through that provider (no route out)

Each provider validates the source of what its customer sends (BCP 38): packets from
the host whose source is not in that provider's network are counted and dropped
(`rejected()`), as a real provider does; so a reply that leaves by the wrong uplink
is lost here as it would be there, and the count shows it. The host tracks
connections (a stateful `ct state invalid drop` input rule, in nftables or
iptables-legacy), like any host with a firewall.

Know before changing: like ctfix.lab.topology, every interface is made inside a
namespace of this run and only documentation ranges are used.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from ctfix.lab.topology import Namespaces, Netfilter, built, new_run_id, require_tools

WAN1_V4, ISP1_V4, WAN1_NET_V4 = "198.51.100.13", "198.51.100.1", "198.51.100.0/24"
WAN2_V4, ISP2_V4, WAN2_NET_V4 = "192.0.2.13", "192.0.2.1", "192.0.2.0/24"
ISP1_OUT_V4, ISP2_OUT_V4, CLIENT_V4 = "203.0.113.1", "203.0.113.2", "203.0.113.7"
WAN1_V6, ISP1_V6, WAN1_NET_V6 = "2001:db8:100::13", "2001:db8:100::1", "2001:db8:100::/64"
WAN2_V6, ISP2_V6, WAN2_NET_V6 = "2001:db8:200::13", "2001:db8:200::1", "2001:db8:200::/64"
ISP1_OUT_V6, ISP2_OUT_V6, CLIENT_V6 = "2001:db8:300::1", "2001:db8:300::2", "2001:db8:300::7"
CLIENT_NET_V4, CLIENT_NET_V6 = "203.0.113.0/24", "2001:db8:300::/64"


@dataclass
class TwoUplinks(Namespaces):
    """The namespaces of one two-uplink run."""

    ipv6: bool
    netfilter: Netfilter

    @property
    def host(self) -> str:
        return self.name("host")

    @property
    def isp1(self) -> str:
        return self.name("isp1")

    @property
    def isp2(self) -> str:
        return self.name("isp2")

    @property
    def internet(self) -> str:
        return self.name("net")

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.host, self.isp1, self.isp2, self.internet)

    def build(self) -> None:
        require_tools("ip", "sysctl", "nft")
        if self.netfilter == "iptables-legacy":
            require_tools("iptables-legacy", "ip6tables-legacy")
        self.create_namespaces()
        v6 = self.ipv6
        for ns in self.namespaces:
            self.ip(ns, "link set lo up\n")
        self.veth(self.host, "wan1", self.isp1, "eth0")
        self.veth(self.host, "wan2", self.isp2, "eth0")
        self.ip(self.internet, "link add inet0 type bridge\nlink set inet0 up\n")
        for isp, port in ((self.isp1, "p1"), (self.isp2, "p2")):
            self.veth(self.internet, port, isp, "out")
            self.ip(self.internet, f"link set {port} master inet0\n")
        uplinks = (
            ("wan1", self.isp1, 100, (WAN1_V4, ISP1_V4, ISP1_OUT_V4, WAN1_NET_V4),
             (WAN1_V6, ISP1_V6, ISP1_OUT_V6, WAN1_NET_V6)),
            ("wan2", self.isp2, 200, (WAN2_V4, ISP2_V4, ISP2_OUT_V4, WAN2_NET_V4),
             (WAN2_V6, ISP2_V6, ISP2_OUT_V6, WAN2_NET_V6)),
        )
        for wan, isp, metric, (wan4, isp4, out4, net4), (wan6, isp6, out6, net6) in uplinks:
            self.ip(
                self.host,
                f"addr add {wan4}/24 dev {wan}\n"
                f"route add default via {isp4} dev {wan} metric {metric}\n"
                + (
                    f"addr add {wan6}/64 dev {wan} nodad\n"
                    f"route add default via {isp6} dev {wan} metric {metric}\n"
                    if v6
                    else ""
                ),
            )
            self.forwarding(isp, v6)
            self.ip(
                isp,
                f"addr add {isp4}/24 dev eth0\naddr add {out4}/24 dev out\n"
                + (f"addr add {isp6}/64 dev eth0 nodad\naddr add {out6}/64 dev out nodad\n"
                   if v6 else ""),
            )
            self._source_validation(isp, net4, net6)
        self.ip(
            self.internet,
            f"addr add {CLIENT_V4}/24 dev inet0\n"
            f"route add {WAN1_NET_V4} via {ISP1_OUT_V4}\n"
            f"route add {WAN2_NET_V4} via {ISP2_OUT_V4}\n"
            + (
                f"addr add {CLIENT_V6}/64 dev inet0 nodad\n"
                f"route add {WAN1_NET_V6} via {ISP1_OUT_V6}\n"
                f"route add {WAN2_NET_V6} via {ISP2_OUT_V6}\n"
                if v6
                else ""
            ),
        )
        self._stateful_host()

    def _source_validation(self, isp: str, net4: str, net6: str) -> None:
        """BCP 38 at the provider: what its customer sends must come from its network."""
        self.run(
            isp,
            "nft",
            "-f",
            "-",
            stdin="table inet bcp38 {\n chain forward {\n"
            "  type filter hook forward priority filter; policy accept;\n"
            f'  iifname "eth0" meta nfproto ipv4 ip saddr != {net4} counter drop\n'
            f'  iifname "eth0" meta nfproto ipv6 ip6 saddr != {net6} counter drop\n'
            " }\n}\n",
        )

    def _stateful_host(self) -> None:
        """A stateful input rule: it makes the host's kernel track connections."""
        if self.netfilter == "iptables-legacy":
            for tool in ("iptables-legacy", "ip6tables-legacy"):
                self.run(
                    self.host, tool, "-w", "-A", "INPUT", "-m", "conntrack", "--ctstate",
                    "INVALID", "-j", "DROP",
                )
        elif self.netfilter == "nft":
            self.run(
                self.host,
                "nft",
                "-f",
                "-",
                stdin="table inet filter {\n chain input {\n"
                "  type filter hook input priority filter; policy accept;\n"
                "  ct state invalid drop\n }\n}\n",
            )

    def rejected(self, isp: str) -> int:
        """Packets the provider dropped because their source is not its customer's
        network (replies that left the host by the wrong uplink)."""
        ruleset = json.loads(self.run(isp, "nft", "-j", "list", "table", "inet", "bcp38"))
        total = 0
        for obj in ruleset["nftables"]:
            for expr in obj.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
        return total


@contextlib.contextmanager
def uplinks_topology(
    *, ipv6: bool = True, netfilter: Netfilter = "nft", run_id: str | None = None
) -> Iterator[TwoUplinks]:
    """Build the two-uplink topology, yield it, and always tear it down."""
    with built(TwoUplinks(run_id or new_run_id(), ipv6=ipv6, netfilter=netfilter)) as topo:
        yield topo
