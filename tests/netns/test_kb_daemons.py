"""Every knowledge-base claim, checked against the real program Debian 12 ships.

For each entry of rules/*.yaml whose program Debian 12 packages, the real daemon runs
in the lab topology's host namespace (br0 192.0.2.1, uplink 198.51.100.13, and their
IPv6 twins), bound to the wildcard, with a minimal configuration of its own written to
a temporary directory (never /etc). From the container namespace (192.0.2.3) a
`connect()`ed client sends one real request of the program's protocol to the uplink
address and to the bridge address, and the test compares what came back with what
the entry says:

- `affected_when_wildcard` (or `affected_by_family`, `fixed_if_cmdline`): false means
  the uplink request is answered from the uplink address; true means the reply left
  from the bridge address (the bug: the connected client never sees it);
- a variant that sets the option the entry's fix names must answer correctly, and the
  entry's `fix`/`snippet` must name that option;
- `replies_from_other_port`: the reply comes from another port (TFTP), and the test
  says from which address;
- `one_way`: the daemon received the message (it logged it) and sent nothing back;
- recognition: ctfix's own socket listing and `KnowledgeBase.match` name the entry by
  process (not by a port guess).

The bridge address is the positive control: a daemon must answer there, so "no
answer" on the uplink is never mistaken for a daemon that did not start. A program
that cannot run here is skipped with the reason printed. Each line the test prints
(`pytest -s`) is one row of docs/knowledge-base.md's verification table.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ctfix.core import rules
from ctfix.core.model import Family
from ctfix.errors import CtfixError
from ctfix.lab.topology import (
    BRIDGE_V4,
    BRIDGE_V6,
    UPLINK_V4,
    UPLINK_V6,
    Topology,
    lab_topology,
    wait_udp_bound,
)
from ctfix.platform import netns, rules_files, sockdiag
from tests.netns import kb_lab
from tests.netns.kb_lab import KB_ROOT

TARGETS = {"ipv4": (UPLINK_V4, BRIDGE_V4), "ipv6": (UPLINK_V6, BRIDGE_V6)}
WILDCARD = {"ipv4": "0.0.0.0", "ipv6": "::"}

Argv = Callable[[Path], list[str]]
Request = Callable[[str, int], bytes]


@dataclass(frozen=True)
class Variant:
    """One run of one program: how to start it, what to send, what the KB predicts."""

    rule: str  # the knowledge-base entry under test
    name: str  # pytest id
    package: str  # Debian package (its version goes into the printed row)
    binary: str  # absolute path; missing -> skipped with the package to install
    port: int
    argv: Argv  # writes the config into the directory, returns the command line
    request: Request
    families: tuple[Family, ...] = ("ipv4", "ipv6")
    #: None: the entry's own verdict for this command line. "right"/"wrong": this
    #: configuration's outcome, for an entry that says `depends` or a fix option.
    expect: str | None = None
    #: text the entry's fix or snippet must contain (the option this variant sets)
    fix_option: str | None = None
    #: the fix binds the uplink address only: the bridge address is not served
    uplink_only: bool = False
    #: netcat serves one client and quits: a fresh daemon for each request
    one_client: bool = False
    #: the socket is shared by several processes (pre-forked workers)
    prefork: bool = False
    client_port: int = 0
    #: one-way services: the file the daemon writes what it received to
    received: Callable[[Path], Path] | None = None
    bound: str | None = None  # wait for a socket bound to this address; None: any
    #: shell commands run in a private mount namespace first (hard-coded run dirs)
    mounts: Callable[[Path], str] | None = None


# -- configurations ------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _echo(_target: str, _port: int) -> bytes:
    return b"ctfix-kb-probe\n"


def _version_bind(_target: str, _port: int) -> bytes:
    return kb_lab.dns_query()  # version.bind CH TXT


def _localhost(_target: str, _port: int) -> bytes:
    return kb_lab.dns_query("localhost.", qtype=1, qclass=1)


def _syslog(_target: str, _port: int) -> bytes:
    return kb_lab.syslog_line("ctfix-kb-probe")


def _no_clock(argv: list[str]) -> list[str]:
    # Time daemons adjust the kernel clock, which no namespace isolates: without
    # CAP_SYS_TIME every attempt fails (they log it) and the machine's clock is safe.
    return ["setpriv", "--bounding-set", "-sys_time", "--inh-caps", "-sys_time", *argv]


def _feeder(nc: str) -> list[str]:
    # netcat sends its stdin to the peer: a line loop gives the client an answer
    # (stdin from /dev/null never replies).
    return ["sh", "-c", f"while :; do echo pong; sleep 0.1; done | exec {nc}"]


def unbound(d: Path, automatic: bool) -> list[str]:
    extra = "  interface-automatic: yes\n" if automatic else ""
    conf = _write(d / "unbound.conf", f"""server:
  interface: 0.0.0.0
  interface: ::
{extra}  port: 53
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{d}"
  pidfile: ""
  use-syslog: no
  access-control: 0.0.0.0/0 allow
  access-control: ::/0 allow
  hide-version: no
  num-threads: 1
""")
    return ["unbound", "-d", "-c", str(conf)]


def named(d: Path) -> list[str]:
    conf = _write(d / "named.conf", f"""options {{
  directory "{d}";
  pid-file none;
  listen-on {{ any; }};
  listen-on-v6 {{ any; }};
  recursion no;
  dnssec-validation no;
  allow-query {{ any; }};
}};
""")
    return ["named", "-g", "-u", "root", "-c", str(conf)]


def nsd(d: Path, addresses: tuple[str, ...] = ()) -> list[str]:
    lines = "".join(f"  ip-address: {a}\n" for a in addresses)
    conf = _write(d / "nsd.conf", f"""server:
{lines}  port: 53
  username: ""
  chroot: ""
  zonesdir: "{d}"
  database: ""
  pidfile: "{d}/pid"
  xfrdfile: "{d}/xfrd.state"
  zonelistfile: "{d}/zone.list"
  server-count: 1
  hide-version: no
remote-control:
  control-enable: no
""")
    return ["nsd", "-d", "-c", str(conf)]


def knotd(d: Path) -> list[str]:
    conf = _write(d / "knot.conf", f"""server:
  listen: [ 0.0.0.0@53, ::@53 ]
  rundir: {d}
  udp-workers: 1
  tcp-workers: 1
  background-workers: 1
  version: ctfix-test
database:
  storage: {d}
log:
  - target: stderr
    any: info
""")
    return ["knotd", "-c", str(conf)]


def kresd(d: Path, addresses: tuple[str, ...] = ("0.0.0.0", "::")) -> list[str]:
    listen = "".join(f"net.listen('{a}', 53, {{ kind = 'dns' }})\n" for a in addresses)
    conf = _write(d / "kresd.conf", listen + "modules = { 'hints > iterate' }\n")
    return ["kresd", "-n", "-c", str(conf), str(d)]


def pdns_recursor(d: Path) -> list[str]:
    _write(d / "recursor.conf", "")
    return ["pdns_recursor", "--daemon=no", f"--config-dir={d}", f"--socket-dir={d}",
            "--local-address=0.0.0.0,::", "--allow-from=0.0.0.0/0,::/0", "--setuid=root",
            "--setgid=root", "--threads=1", "--disable-syslog"]


def pdns_server(d: Path) -> list[str]:
    _write(d / "pdns.conf", "")
    zone = _write(d / "zone", "$ORIGIN ctfix.test.\n@ 3600 IN SOA ns hostmaster 1 3600 600 "
                  "86400 60\n@ 3600 IN NS ns\nns 3600 IN A 192.0.2.1\n")
    conf = _write(d / "named.conf", f'zone "ctfix.test" {{ file "{zone}"; type master; }};\n')
    return ["pdns_server", "--guardian=no", "--daemon=no", f"--config-dir={d}",
            f"--socket-dir={d}", "--local-address=0.0.0.0,::", "--launch=bind",
            f"--bind-config={conf}", "--setuid=root", "--setgid=root", "--disable-syslog",
            "--security-poll-suffix="]


def _soa(_target: str, _port: int) -> bytes:
    return kb_lab.dns_query("ctfix.test.", qtype=6, qclass=1)


def dnsdist(d: Path) -> list[str]:
    conf = _write(d / "dnsdist.conf", """setLocal("0.0.0.0:53")
addLocal("[::]:53")
setACL({"0.0.0.0/0", "::/0"})
setSecurityPollSuffix("")
addAction(AllRule(), RCodeAction(DNSRCode.REFUSED))
""")
    return ["dnsdist", "--supervised", "--disable-syslog", "-C", str(conf)]


def avahi(d: Path) -> list[str]:
    conf = _write(d / "avahi-daemon.conf", "[server]\nuse-ipv4=yes\nuse-ipv6=yes\n"
                  "enable-dbus=no\nhost-name=ctfixhost\n")
    return ["avahi-daemon", "--no-drop-root", "--no-chroot", "--no-rlimits", "-f", str(conf)]


def _mdns(_target: str, _port: int) -> bytes:
    return kb_lab.dns_query("ctfixhost.local.", qtype=1, qclass=1)


def chronyd(d: Path) -> list[str]:
    conf = _write(d / "chrony.conf", f"allow all\nlocal stratum 10\ncmdport 0\npidfile {d}/pid\n")
    return _no_clock([str(KB_ROOT / "chrony/usr/sbin/chronyd"), "-d", "-x", "-u", "root",
                      "-f", str(conf)])


def ntpsec(d: Path) -> list[str]:
    conf = _write(d / "ntp.conf", f"driftfile {d}/drift\n")
    return _no_clock([str(KB_ROOT / "ntpsec/usr/sbin/ntpd"), "-n", "-c", str(conf)])


def openntpd(d: Path) -> list[str]:
    conf = _write(d / "ntpd.conf", "listen on *\n")
    return _no_clock([str(KB_ROOT / "openntpd/usr/sbin/ntpd"), "-d", "-f", str(conf)])


def _openntpd_mounts(d: Path) -> str:
    # Unpacked, not installed: no "ntpd" user (privilege separation needs one) and no
    # /var/lib/openntpd. Both exist only in the daemon's private mount namespace.
    (d / "empty").mkdir(exist_ok=True)
    passwd = _write(d / "passwd", Path("/etc/passwd").read_text()
                    + f"ntpd:x:0:0::{d}/empty:/usr/sbin/nologin\n")
    return (f"mount --bind {passwd} /etc/passwd && mount -t tmpfs ctfix-kb /var/lib && "
            "mkdir -p /var/lib/openntpd/run")


def _ntp(_target: str, _port: int) -> bytes:
    return kb_lab.ntp_request()


def snmpd(d: Path) -> list[str]:
    conf = _write(d / "snmpd.conf", "rocommunity public default\nrocommunity6 public default\n"
                  "agentaddress udp:161,udp6:161\n")
    return ["snmpd", "-f", "-Lo", "-C", "-c", str(conf), "-p", str(d / "pid")]


def freeradius(d: Path) -> list[str]:
    # Debian's own configuration (ipaddr = * and ipv6addr = ::), copied, with one
    # client for the test networks and no delay before a reject.
    raddb = d / "raddb"
    kb_lab.run("cp", "-a", "/etc/freeradius/3.0", str(raddb))  # owners too: it checks them
    with open(raddb / "clients.conf", "a") as fh:
        fh.write("client ctfix { ipaddr = 0.0.0.0/0\n secret = ctfix-secret }\n"
                 "client ctfix6 { ipv6addr = ::/0\n secret = ctfix-secret }\n")
    conf = raddb / "radiusd.conf"
    # It stays root: user freerad could not enter pytest's private temporary directory.
    text = conf.read_text().replace("reject_delay = 1", "reject_delay = 0")
    conf.write_text(text.replace("\tuser = freerad", "\t#").replace("\tgroup = freerad", "\t#"))
    return ["freeradius", "-f", "-l", "stdout", "-d", str(raddb)]


def _radius(_target: str, _port: int) -> bytes:
    return kb_lab.radius_access_request(b"ctfix-secret")


def krb5kdc(d: Path) -> list[str]:
    kdc = _write(d / "kdc.conf", f"""[kdcdefaults]
 kdc_ports = 88
 kdc_tcp_ports = 88
[realms]
 CTFIX.TEST = {{
  database_name = {d}/principal
  key_stash_file = {d}/stash
  acl_file = {d}/kadm5.acl
 }}
[logging]
 kdc = STDERR
""")
    krb5 = _write(d / "krb5.conf", "[libdefaults]\n default_realm = CTFIX.TEST\n")
    env = {"KRB5_CONFIG": str(krb5), "KRB5_KDC_PROFILE": str(kdc)}
    kb_lab.run("kdb5_util", "create", "-s", "-r", "CTFIX.TEST", "-P", "ctfix-master", env=env)
    return ["env", *(f"{k}={v}" for k, v in env.items()), "krb5kdc", "-n", "-r", "CTFIX.TEST"]


def _as_req(_target: str, _port: int) -> bytes:
    return kb_lab.krb5_as_req("CTFIX.TEST")


def tftpd_hpa(address: str) -> Argv:
    def argv(d: Path) -> list[str]:
        _write(d / "ctfix-test.txt", "hello\n")
        return ["in.tftpd", "-L", "-a", address, "-s", str(d)]
    return argv


def atftpd(d: Path) -> list[str]:
    _write(d / "ctfix-test.txt", "hello\n")
    return [str(KB_ROOT / "atftpd/usr/sbin/atftpd"), "--daemon", "--no-fork", "--logfile", "-",
            "--user", "root.root", "--port", "69", str(d)]


def _rrq(_target: str, _port: int) -> bytes:
    return kb_lab.tftp_rrq()


def memcached(listen: str) -> Argv:
    return lambda d: ["memcached", "-u", "root", "-U", "11211", "-p", "0", "-l", listen]


def _memcached(_target: str, _port: int) -> bytes:
    return kb_lab.memcached_version()


def dhcpd(local_address: str | None) -> Argv:
    def argv(d: Path) -> list[str]:
        local = f"local-address {local_address};\n" if local_address else ""
        conf = _write(d / "dhcpd.conf", f"""{local}ddns-update-style none;
authoritative;
subnet 192.0.2.0 netmask 255.255.255.0 {{ range 192.0.2.100 192.0.2.200; }}
subnet 198.51.100.0 netmask 255.255.255.0 {{ }}
""")
        _write(d / "leases", "")
        return ["dhcpd", "-f", "-d", "-4", "-cf", str(conf), "-lf", str(d / "leases"),
                "-pf", str(d / "pid"), "br0"]
    return argv


def kea(d: Path) -> list[str]:
    conf = _write(d / "kea.json", f"""{{ "Dhcp4": {{
  "interfaces-config": {{ "interfaces": [ "*" ], "dhcp-socket-type": "udp" }},
  "lease-database": {{ "type": "memfile", "persist": false }},
  "control-socket": {{ "socket-type": "unix", "socket-name": "{d}/kea.sock" }},
  "subnet4": [ {{ "id": 1, "subnet": "192.0.2.0/24",
                 "pools": [ {{ "pool": "192.0.2.100 - 192.0.2.200" }} ] }} ],
  "loggers": [ {{ "name": "kea-dhcp4", "output_options": [ {{ "output": "stdout" }} ],
                 "severity": "INFO" }} ]
}} }}
""")
    return ["env", f"KEA_PIDFILE_DIR={d}", f"KEA_LOCKFILE_DIR={d}", "kea-dhcp4", "-c", str(conf)]


def _relayed(_target: str, _port: int) -> bytes:
    return kb_lab.dhcp_relayed_discover("192.0.2.3")


def kamailio(d: Path) -> list[str]:
    conf = _write(d / "kamailio.cfg", """#!KAMAILIO
listen=udp:0.0.0.0:5060
listen=udp:[::]:5060
children=2
loadmodule "sl.so"
request_route {
    sl_send_reply("200", "OK");
}
""")
    return ["kamailio", "-DD", "-E", "-f", str(conf), "-P", str(d / "pid"), "-Y", str(d),
            "-L", "/usr/lib/x86_64-linux-gnu/kamailio/modules"]


def coturn(listen: tuple[str, ...]) -> Argv:
    def argv(d: Path) -> list[str]:
        ips = [arg for address in listen for arg in ("-L", address)]
        return ["turnserver", "-n", "--listening-port", "3478", *ips, "--no-tcp", "--no-tls",
                "--no-dtls", "--no-cli", "--pidfile", str(d / "pid"), "--db", str(d / "turndb"),
                "--log-file", "stdout"]
    return argv


def openvpn(*extra: str) -> Argv:
    def argv(d: Path) -> list[str]:
        key, cert = d / "key.pem", d / "cert.pem"
        kb_lab.run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                   "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                   str(cert), "-days", "2", "-subj", "/CN=ctfix-test")
        return ["openvpn", "--server", "203.0.113.0", "255.255.255.0", "--proto", "udp6",
                "--port", "1194", "--dev", "tun", "--ca", str(cert), "--cert", str(cert),
                "--key", str(key), "--dh", "none", "--verb", "3", *extra]
    return argv


def charon(d: Path) -> list[str]:
    conf = _write(d / "strongswan.conf", """charon {
  load = random nonce aes sha1 sha2 md5 hmac gmp pem pkcs1 x509 pubkey kernel-netlink socket-default
  port = 500
  port_nat_t = 4500
  install_routes = no
  filelog {
    stdout { default = 1 }
  }
}
""")
    return ["env", f"STRONGSWAN_CONF={conf}", "/usr/lib/ipsec/charon"]


def rsyslogd(d: Path) -> list[str]:
    root = KB_ROOT / "rsyslog"
    conf = _write(d / "rsyslog.conf", f"""module(load="imudp")
input(type="imudp" port="514" address="0.0.0.0")
input(type="imudp" port="514" address="::")
*.* action(type="omfile" file="{d}/received.log")
""")
    return [str(root / "usr/sbin/rsyslogd"), "-n", "-f", str(conf), "-i", str(d / "pid"),
            "-M", str(root / "usr/lib/x86_64-linux-gnu/rsyslog")]


def syslog_ng(d: Path) -> list[str]:
    root = KB_ROOT / "syslog-ng-core"
    conf = _write(d / "syslog-ng.conf", f"""@version: 3.38
options {{ use-dns(no); }};
source s_net {{ network(transport("udp") ip("::") ip-protocol(6) port(514)); }};
destination d_file {{ file("{d}/received.log"); }};
log {{ source(s_net); destination(d_file); }};
""")
    libs = f"{root}/usr/lib/syslog-ng:{root}/usr/lib/x86_64-linux-gnu"
    return ["env", f"LD_LIBRARY_PATH={libs}", str(root / "usr/sbin/syslog-ng"), "-F",
            "--no-caps", "-f", str(conf), f"--module-path={root}/usr/lib/syslog-ng/3.38",
            "-R", str(d / "persist"), "-p", str(d / "pid"), "-c", str(d / "ctl")]


def _received(d: Path) -> Path:
    return d / "received.log"


V4: tuple[Family, ...] = ("ipv4",)
NC_OPENBSD, NC_TRAD = "/usr/bin/nc.openbsd", "/usr/bin/nc.traditional"
VARIANTS: list[Variant] = [
    Variant("socat", "socat", "socat", "/usr/bin/socat", 40101,
            lambda d: ["socat", "UDP6-RECVFROM:40101,ipv6only=0,fork", "EXEC:cat"], _echo),
    Variant("socat", "socat-bind", "socat", "/usr/bin/socat", 40101,
            lambda d: ["socat", f"UDP4-RECVFROM:40101,bind={UPLINK_V4},fork", "EXEC:cat"],
            _echo, families=V4, expect="right", fix_option="bind=", uplink_only=True),
    Variant("netcat-openbsd", "nc-openbsd", "netcat-openbsd", NC_OPENBSD, 40102,
            lambda d: _feeder("nc.openbsd -4 -u -l 40102"), _echo, families=V4,
            one_client=True),
    Variant("netcat-openbsd", "nc-openbsd-v6", "netcat-openbsd", NC_OPENBSD, 40102,
            lambda d: _feeder("nc.openbsd -6 -u -l 40102"), _echo, families=("ipv6",),
            one_client=True),
    Variant("netcat-openbsd", "nc-openbsd-address", "netcat-openbsd", NC_OPENBSD, 40102,
            lambda d: _feeder(f"nc.openbsd -u -l {UPLINK_V4} 40102"), _echo, families=V4,
            expect="right", fix_option="nc -u -l ADDRESS", uplink_only=True),
    Variant("netcat-traditional", "nc-traditional", "netcat-traditional", NC_TRAD, 40103,
            lambda d: _feeder("nc.traditional -u -l -p 40103"), _echo, families=V4,
            one_client=True),
    Variant("netcat-traditional", "nc-traditional-s", "netcat-traditional", NC_TRAD, 40103,
            lambda d: _feeder(f"nc.traditional -u -l -s {UPLINK_V4} -p 40103"), _echo,
            families=V4, expect="right", fix_option="-s ADDRESS", uplink_only=True),
    Variant("dnsmasq", "dnsmasq", "dnsmasq-base", "/usr/sbin/dnsmasq", 53,
            lambda d: ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                       f"--pid-file={d}/pid", "--user=root", "--port=53", "--log-facility=-",
                       "--address=/ctfix.test/192.0.2.53"], _localhost),
    Variant("unbound", "unbound-wildcard", "unbound", "/usr/sbin/unbound", 53,
            lambda d: unbound(d, automatic=False), _version_bind, expect="wrong",
            bound="0.0.0.0"),
    Variant("unbound", "unbound-interface-automatic", "unbound", "/usr/sbin/unbound", 53,
            lambda d: unbound(d, automatic=True), _version_bind, expect="right",
            fix_option="interface-automatic: yes", bound="0.0.0.0"),
    Variant("bind9", "named", "bind9", "/usr/sbin/named", 53, named, _version_bind,
            bound=UPLINK_V6),
    Variant("nsd", "nsd", "nsd", "/usr/sbin/nsd", 53, nsd, _version_bind, prefork=True),
    Variant("nsd", "nsd-ip-address", "nsd", "/usr/sbin/nsd", 53,
            lambda d: nsd(d, (UPLINK_V4, BRIDGE_V4, UPLINK_V6, BRIDGE_V6)), _version_bind,
            expect="right", fix_option="ip-address:", bound=BRIDGE_V6),
    Variant("knot", "knotd", "knot", "/usr/sbin/knotd", 53, knotd,
            lambda t, p: kb_lab.dns_query("version.server.")),
    Variant("knot-resolver", "kresd", "knot-resolver", "/usr/sbin/kresd", 53,
            lambda d: kresd(d), _localhost, bound="::"),
    Variant("knot-resolver", "kresd-per-address", "knot-resolver", "/usr/sbin/kresd", 53,
            lambda d: kresd(d, (UPLINK_V4, BRIDGE_V4, UPLINK_V6, BRIDGE_V6)), _localhost,
            expect="right", fix_option="net.listen('{address}'", bound=BRIDGE_V6),
    Variant("pdns-recursor", "pdns-recursor", "pdns-recursor", "/usr/sbin/pdns_recursor", 53,
            pdns_recursor, _localhost, bound="::"),
    Variant("pdns-server", "pdns-server", "pdns-server", "/usr/sbin/pdns_server", 53,
            pdns_server, _soa, bound="::"),
    Variant("dnsdist", "dnsdist", "dnsdist", "/usr/bin/dnsdist", 53, dnsdist, _version_bind,
            bound="::"),
    Variant("avahi-daemon", "avahi-daemon", "avahi-daemon", "/usr/sbin/avahi-daemon", 5353,
            avahi, _mdns, families=V4, mounts=lambda d: "mount -t tmpfs ctfix-kb /run"),
    Variant("chrony", "chronyd", "chrony", str(KB_ROOT / "chrony/usr/sbin/chronyd"), 123,
            chronyd, _ntp),
    Variant("ntpd", "ntpsec", "ntpsec", str(KB_ROOT / "ntpsec/usr/sbin/ntpd"), 123, ntpsec,
            _ntp, bound=UPLINK_V6),
    Variant("openntpd", "openntpd", "openntpd", str(KB_ROOT / "openntpd/usr/sbin/ntpd"), 123,
            openntpd, _ntp, bound=UPLINK_V6, mounts=_openntpd_mounts),
    Variant("snmpd", "snmpd", "snmpd", "/usr/sbin/snmpd", 161, snmpd,
            lambda t, p: kb_lab.snmp_get(), bound="::"),
    Variant("freeradius", "freeradius", "freeradius", "/usr/sbin/freeradius", 1812, freeradius,
            _radius, bound="::"),
    Variant("krb5kdc", "krb5kdc", "krb5-kdc", "/usr/sbin/krb5kdc", 88, krb5kdc, _as_req,
            bound="::"),
    Variant("tftpd-hpa", "tftpd-hpa", "tftpd-hpa", "/usr/sbin/in.tftpd", 69,
            tftpd_hpa(":69"), _rrq, bound="::"),
    Variant("tftpd-hpa", "tftpd-hpa-address", "tftpd-hpa", "/usr/sbin/in.tftpd", 69,
            tftpd_hpa(f"{UPLINK_V4}:69"), _rrq, families=V4, expect="right",
            fix_option="--address ADDRESS:69", uplink_only=True),
    Variant("atftpd", "atftpd", "atftpd", str(KB_ROOT / "atftpd/usr/sbin/atftpd"), 69, atftpd,
            _rrq, families=V4),
    Variant("memcached", "memcached", "memcached", "/usr/bin/memcached", 11211,
            memcached("0.0.0.0,::"), _memcached, bound="::"),
    Variant("memcached", "memcached-per-address", "memcached", "/usr/bin/memcached", 11211,
            memcached(f"{UPLINK_V4},{BRIDGE_V4}"), _memcached, families=V4, expect="right",
            fix_option="-l", bound=BRIDGE_V4),
    Variant("isc-dhcp-server", "dhcpd-relayed", "isc-dhcp-server", "/usr/sbin/dhcpd", 67,
            dhcpd(None), _relayed, families=V4, client_port=67),
    Variant("isc-dhcp-server", "dhcpd-local-address", "isc-dhcp-server", "/usr/sbin/dhcpd", 67,
            dhcpd(UPLINK_V4), _relayed, families=V4, client_port=67, expect="right",
            fix_option="local-address", uplink_only=True),
    Variant("kea-dhcp4", "kea-dhcp4", "kea-dhcp4-server", "/usr/sbin/kea-dhcp4", 67, kea,
            _relayed, families=V4, client_port=67, bound=UPLINK_V4),
    Variant("kamailio", "kamailio", "kamailio", "/usr/sbin/kamailio", 5060, kamailio,
            kb_lab.sip_options, bound="::", prefork=True),
    Variant("coturn", "coturn-wildcard", "coturn", "/usr/bin/turnserver", 3478,
            coturn(("0.0.0.0", "::")), lambda t, p: kb_lab.stun_binding(), bound="::"),
    Variant("coturn", "coturn-default", "coturn", "/usr/bin/turnserver", 3478, coturn(()),
            lambda t, p: kb_lab.stun_binding(), expect="right", fix_option="listening-ip",
            bound=UPLINK_V6),
    Variant("openvpn", "openvpn", "openvpn", "/usr/sbin/openvpn", 1194, openvpn(),
            lambda t, p: kb_lab.openvpn_hard_reset(), bound="::", expect="wrong"),
    Variant("openvpn", "openvpn-multihome", "openvpn", "/usr/sbin/openvpn", 1194,
            openvpn("--multihome"), lambda t, p: kb_lab.openvpn_hard_reset(), bound="::"),
    Variant("strongswan", "charon", "strongswan-charon", "/usr/lib/ipsec/charon", 500, charon,
            lambda t, p: kb_lab.ike_sa_init(), bound="::", mounts=lambda d: "mount -t tmpfs "
            "ctfix-kb /run"),
    Variant("rsyslog", "rsyslogd", "rsyslog", str(KB_ROOT / "rsyslog/usr/sbin/rsyslogd"), 514,
            rsyslogd, _syslog, received=_received, bound="::"),
    Variant("syslog-ng", "syslog-ng", "syslog-ng-core",
            str(KB_ROOT / "syslog-ng-core/usr/sbin/syslog-ng"), 514, syslog_ng, _syslog,
            received=_received, bound="::"),
]


# -- the test ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with lab_topology(ipv6=True) as built:
        yield built


@pytest.fixture(scope="module")
def kb() -> rules.KnowledgeBase:
    return rules_files.load()


def _version(package: str) -> str:
    unpacked = KB_ROOT / package / ".version"
    if unpacked.exists():
        return unpacked.read_text().strip()
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
        check=False,
    )
    return out.stdout.strip() or "?"


@contextlib.contextmanager
def _running(variant: Variant, topo: Topology, d: Path) -> Iterator[list[str]]:
    """Start the daemon in the host namespace, wait for its socket, stop it by pid."""
    argv = variant.argv(d)
    command = argv
    if variant.mounts is not None:
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'{variant.mounts(d)} && exec "$@"', "sh", *argv]
    env = {**os.environ, "PATH": f"{Path(variant.binary).parent}:{os.environ['PATH']}"}
    log = d / "daemon.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            topo.exec_argv(topo.host, command), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True, cwd=d,
        )
    topo.processes.append(proc)  # stopped at teardown at the latest
    try:
        try:
            wait_udp_bound(proc.pid, variant.port, timeout=30, address=variant.bound)
        except CtfixError as exc:
            pytest.fail(f"{variant.name} did not bind: {exc}\n{log.read_text(errors='replace')}")
        yield argv
    finally:
        topo.stop(proc, timeout=5.0)


def _verdict(seen: kb_lab.Seen) -> str:
    if seen.source is None:
        return "silent"
    return "right" if seen.source[0] == seen.target[0] else "wrong"


def _describe(seen: kb_lab.Seen) -> str:
    if seen.source is None:
        return f"{seen.target[0]}: no reply"
    return f"{seen.target[0]}: reply from {seen.source[0]} port {seen.source[1]}"


def _expected(variant: Variant, rule: rules.ServiceRule, family: Family, argv: list[str]) -> str:
    if rule.one_way:
        return "silent"
    if variant.expect is not None:
        if variant.fix_option:
            assert variant.fix_option in rule.fix + rule.snippet, (
                f"{rule.id}: the entry's fix does not name {variant.fix_option!r}"
            )
        return variant.expect
    verdict = rule.affected(family, argv)
    assert verdict is not None, (
        f"{rule.id} says 'depends' for {family}: the variant must name its configuration"
    )
    return "wrong" if verdict else "right"


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_kb_claim_holds_for_the_real_program(
    variant: Variant, topo: Topology, kb: rules.KnowledgeBase, tmp_path: Path
) -> None:
    rule = kb.get(variant.rule)
    assert rule is not None, f"no knowledge-base entry {variant.rule!r}"
    if not os.path.exists(variant.binary):
        pytest.skip(f"{variant.binary} missing: install {variant.package} (scripts/setup)")
    rows = []
    if variant.one_client:
        # netcat serves one client and quits: a fresh daemon for each request
        for family in variant.families:
            seen = {}
            for target in _targets(variant, family):
                with _running(variant, topo, tmp_path) as argv:
                    _check_recognised(variant, rule, kb, topo)
                    expected = _expected(variant, rule, family, argv)
                    seen[target] = _ask(variant, topo, target, _timeout(expected))
            rows.append(_judge(variant, rule, family, expected, seen, tmp_path))
    else:
        with _running(variant, topo, tmp_path) as argv:
            _check_recognised(variant, rule, kb, topo)
            for family in variant.families:
                expected = _expected(variant, rule, family, argv)
                seen = {
                    target: _ask(variant, topo, target, _timeout(expected))
                    for target in _targets(variant, family)
                }
                rows.append(_judge(variant, rule, family, expected, seen, tmp_path))
    print(f"\nKB-CHECK {variant.name} | {variant.package} {_version(variant.package)} | "
          + " | ".join(rows))


def _targets(variant: Variant, family: str) -> list[str]:
    uplink, bridge = TARGETS[family]
    # The bridge first: the positive control that the daemon answers at all.
    return [uplink] if variant.uplink_only else [bridge, uplink]


def _timeout(expected: str) -> float:
    # A one-way service is given a second to (not) answer after it logged the message;
    # everything else answers at once, the deadline only bounds a broken run.
    return 1.0 if expected == "silent" else 15.0


def _ask(variant: Variant, topo: Topology, target: str, timeout: float) -> kb_lab.Seen:
    """One request; a request that gets nothing is repeated (a daemon may bind before it
    answers: avahi probes its host name first) until `timeout` is spent."""
    deadline = time.monotonic() + timeout
    while True:
        payload = variant.request(target, variant.port)
        left = deadline - time.monotonic()
        seen = kb_lab.probe(topo.container, target, variant.port, payload,
                            client_port=variant.client_port, timeout=min(1.0, max(left, 0.1)))
        if seen.source is not None or time.monotonic() >= deadline:
            return seen


def _judge(
    variant: Variant, rule: rules.ServiceRule, family: str, expected: str,
    seen: dict[str, kb_lab.Seen], d: Path,
) -> str:
    uplink, bridge = TARGETS[family]
    detail = "; ".join(_describe(s) for s in seen.values())
    if expected == "silent":
        assert variant.received is not None
        assert kb_lab.wait_for(variant.received(d), b"ctfix-kb-probe"), f"{rule.id} got nothing"
        assert all(s.source is None for s in seen.values()), f"{rule.id} answered: {detail}"
        return f"{family} one-way: logged, {detail}"
    if bridge in seen:  # the positive control: the daemon answers at all
        assert _verdict(seen[bridge]) == "right", f"positive control failed: {detail}"
    got = seen[uplink]
    assert _verdict(got) == expected, f"{rule.id} expected {expected}: {detail}"
    assert got.source is not None
    assert (got.source[1] != variant.port) == rule.replies_from_other_port, (
        f"{rule.id}: replies_from_other_port is {rule.replies_from_other_port}: {detail}"
    )
    if expected == "wrong":
        assert got.source[0] == bridge and not got.connected, detail
    elif not rule.replies_from_other_port:
        assert got.connected, detail  # the connect()ed client took it
    return f"{family} {expected}: {detail}"


def _check_recognised(
    variant: Variant, rule: rules.ServiceRule, kb: rules.KnowledgeBase, topo: Topology
) -> None:
    """ctfix's own socket listing names the entry by process, and every holder."""
    deadline = time.monotonic() + 15
    while True:
        with netns.entered(topo.host):
            found = [lst for lst, _uid in sockdiag.listeners(variant.port)]
        # A pre-forking daemon forks its workers after binding: wait for them.
        settled = not variant.prefork or all(len(lst.processes) >= 2 for lst in found)
        if (found and settled) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert found, f"sock_diag sees no socket on port {variant.port}"
    for listener in found:
        match = kb.match(listener.process, listener.cmdline, variant.port, exe=listener.exe)
        assert match is not None and match.rule.id == rule.id and not match.port_only, (
            f"{listener.process} ({listener.exe}) {listener.cmdline} on {variant.port} is "
            f"recognised as {match and (match.rule.id, match.matched_by)}, not {rule.id}"
        )
        assert listener.processes and listener.processes[0][0] == listener.pid
        if variant.prefork:
            assert len(listener.processes) >= 2, f"one holder only: {listener.processes}"


#: Entries without a run against the real program, and why (printed as skips).
UNTESTED = {
    "coredns": "CoreDNS is not packaged in Debian 12",
    "consul": "Consul is not packaged in Debian 12",
    "statsd": "Etsy's StatsD is not packaged in Debian 12",
    "asterisk": "Asterisk is not in Debian 12 (removed before bookworm)",
    "wireguard": "this kernel has no WireGuard module, and a handshake with wireguard-go "
    "needs a Noise IK initiator in the test; the claim rests on the source",
    "docker-proxy": "tested with a real Docker engine in its own test",
}


@pytest.mark.parametrize("rule_id", sorted(UNTESTED))
def test_entries_that_cannot_run_here(rule_id: str) -> None:
    pytest.skip(f"{rule_id}: {UNTESTED[rule_id]}")


def test_every_debian_program_has_a_variant() -> None:
    """The variants above cover every entry but those UNTESTED names, with a reason."""
    tested = {v.rule for v in VARIANTS}
    missing = {r.id for r in rules_files.load().entries} - tested - set(UNTESTED)
    assert not missing, f"entries without a test against the real program: {sorted(missing)}"


def test_tftpd_hpa_answers_the_first_request_after_start_from_the_routing_choice(
    topo: Topology, kb: rules.KnowledgeBase, tmp_path: Path
) -> None:
    """The entry's caveat: Debian 12's in.tftpd switches IP_PKTINFO on only after its
    first read, so the first transfer after a start (per socket) comes from the
    address routing picks; the client's retry, and every later request, from the
    address asked (and from a new port, as TFTP does)."""
    variant = next(v for v in VARIANTS if v.name == "tftpd-hpa")
    if not os.path.exists(variant.binary):
        pytest.skip(f"{variant.binary} missing: install {variant.package} (scripts/setup)")
    rule = kb.get("tftpd-hpa")
    assert rule is not None and rule.affected("ipv4") is False
    with _running(variant, topo, tmp_path):
        first = _ask(variant, topo, UPLINK_V4, 15.0)
        retry = _ask(variant, topo, UPLINK_V4, 15.0)
    assert first.source is not None and first.source[0] == BRIDGE_V4, _describe(first)
    assert retry.source is not None and retry.source[0] == UPLINK_V4, _describe(retry)
    assert retry.source[1] != variant.port  # a new transfer id
    print(f"\nKB-CHECK tftpd-hpa-first-request | {variant.package} {_version(variant.package)}"
          f" | first {_describe(first)} | retry {_describe(retry)}")

