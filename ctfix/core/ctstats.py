"""ctnetlink statistics messages -> small immutable values. Pure; never raises.

Two requests, both to the conntrack subsystem of nfnetlink (what `conntrack -S` and
`conntrack -C` send):

- `IPCTNL_MSG_CT_GET_STATS_CPU`, a dump: one message per possible CPU, the CPU's
  number in nfgenmsg's res_id (big-endian), one big-endian u32 attribute per counter
  (`ctnetlink_ct_stat_cpu_fill_info` in net/netfilter/nf_conntrack_netlink.c);
- `IPCTNL_MSG_CT_GET_STATS`: one message with the namespace's entry count
  (CTA_STATS_GLOBAL_ENTRIES) and the table's limit (CTA_STATS_GLOBAL_MAX_ENTRIES,
  nf_conntrack_max, which is host-wide).

Know before changing:
- Counter names are the uapi attribute names (`enum ctattr_stats_cpu` in
  include/uapi/linux/netfilter/nfnetlink_conntrack.h) without `CTA_STATS_`, in lower
  case: CTA_STATS_CHAIN_TOOLONG is `chain_toolong` (conntrack -S prints
  `chaintoolong`). They are the JSON keys and metric names of `ctfix health`.
- A counter the kernel did not send is absent, never 0: older kernels lack
  clash_resolve and chain_toolong, current ones no longer send searched, new,
  ignore, delete and delete_list. Attribute types this module does not know (a
  newer kernel) are skipped, like conntrack-tools does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from ctfix.core.ctnetlink import attrs as attributes
from ctfix.core.decode import NFNL_SUBSYS_CTNETLINK, NLMSG_DONE, NLMSG_ERROR, Buf, nla

IPCTNL_MSG_CT_GET_STATS_CPU = 4
IPCTNL_MSG_CT_GET_STATS = 5
MSG_STATS_CPU = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS_CPU
MSG_STATS = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300

#: enum ctattr_stats_cpu, in attribute-number order (1 = CTA_STATS_SEARCHED).
CPU_ATTRIBUTES: tuple[str, ...] = (
    "searched",
    "found",
    "new",
    "invalid",
    "ignore",
    "delete",
    "delete_list",
    "insert",
    "insert_failed",
    "drop",
    "early_drop",
    "error",
    "search_restart",
    "clash_resolve",
    "chain_toolong",
)
_CPU_NAME = {number: name for number, name in enumerate(CPU_ATTRIBUTES, start=1)}

CTA_STATS_GLOBAL_ENTRIES = 1
CTA_STATS_GLOBAL_MAX_ENTRIES = 2

_HDR = struct.Struct("=IHHII")  # nlmsghdr
_GENMSG = struct.Struct(">BBH")  # nfgenmsg: family, version, res_id (big-endian)
_BE32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class CpuStats:
    """One CPU's conntrack counters in one namespace (u32 each, they wrap)."""

    cpu: int
    counters: dict[str, int] = field(default_factory=dict)

    def get(self, name: str) -> int | None:
        return self.counters.get(name)


@dataclass(frozen=True, slots=True)
class GlobalStats:
    """The namespace's entry count and the table's (host-wide) limit; None: not sent."""

    entries: int | None = None
    max_entries: int | None = None


class StatsBatch(NamedTuple):
    """Everything decoded from one buffer returned by recv().

    `done`: NLMSG_DONE or NLMSG_ERROR seen (an ACK is an error 0); `error`: errno of
    an NLMSG_ERROR; `malformed`: messages skipped because they did not parse.
    """

    cpus: list[CpuStats]
    global_stats: GlobalStats | None = None
    done: bool = False
    error: int = 0
    malformed: int = 0


def _request(msg_type: int, flags: int, seq: int) -> bytes:
    body = _GENMSG.pack(0, 0, 0)  # AF_UNSPEC, NFNETLINK_V0, res_id 0
    return _HDR.pack(_HDR.size + len(body), msg_type, flags, seq, 0) + body


def stats_cpu_request(seq: int = 1) -> bytes:
    """The dump request for every CPU's counters (`conntrack -S`)."""
    return _request(MSG_STATS_CPU, NLM_F_REQUEST | NLM_F_DUMP, seq)


def stats_request(seq: int = 1) -> bytes:
    """The request for entries and max (`conntrack -C`); acked, so the reply ends."""
    return _request(MSG_STATS, NLM_F_REQUEST | NLM_F_ACK, seq)


def _u32s(buf: Buf, start: int, end: int) -> dict[int, int]:
    values: dict[int, int] = {}
    for kind, value_start, value_end in attributes(buf, start, end):
        if value_end - value_start >= 4:
            values[kind] = _BE32.unpack_from(buf, value_start)[0]
    return values


def decode_stats(buf: Buf) -> StatsBatch:
    """Decode every netlink message in one recv() buffer. Never raises."""
    cpus: list[CpuStats] = []
    global_stats: GlobalStats | None = None
    done = False
    error = malformed = 0
    offset = 0
    size = len(buf)
    try:
        while offset + _HDR.size <= size:
            msg_len, msg_type, _flags, _seq, _pid = _HDR.unpack_from(buf, offset)
            if msg_len < _HDR.size or offset + msg_len > size:
                malformed += 1
                break
            end = offset + msg_len
            body = offset + _HDR.size
            if msg_type == NLMSG_DONE:
                done = True
            elif msg_type == NLMSG_ERROR:
                if msg_len >= _HDR.size + 4:
                    code = struct.unpack_from("=i", buf, body)[0]
                    error = -code if code < 0 else code
                else:
                    malformed += 1
                done = True
            elif msg_type in (MSG_STATS_CPU, MSG_STATS):
                if msg_len < _HDR.size + _GENMSG.size:
                    malformed += 1
                else:
                    res_id = _GENMSG.unpack_from(buf, body)[2]
                    values = _u32s(buf, body + _GENMSG.size, end)
                    if msg_type == MSG_STATS_CPU:
                        counters = {_CPU_NAME[k]: v for k, v in values.items() if k in _CPU_NAME}
                        cpus.append(CpuStats(res_id, counters))
                    else:
                        global_stats = GlobalStats(
                            values.get(CTA_STATS_GLOBAL_ENTRIES),
                            values.get(CTA_STATS_GLOBAL_MAX_ENTRIES),
                        )
            offset += (msg_len + 3) & ~3
    except (struct.error, ValueError, IndexError):
        malformed += 1
    return StatsBatch(cpus, global_stats, done, error, malformed)


def encode_cpu_stats(stats: CpuStats, seq: int = 1, pid: int = 0) -> bytes:
    """The kernel's message for one CPU's counters (tests and fixtures build with it)."""
    number = {name: n for n, name in _CPU_NAME.items()}
    attrs = b"".join(
        nla(number[name], _BE32.pack(value & 0xFFFFFFFF))
        for name, value in sorted(stats.counters.items(), key=lambda item: number[item[0]])
        if name in number
    )
    body = _GENMSG.pack(0, 0, stats.cpu) + attrs
    return _HDR.pack(_HDR.size + len(body), MSG_STATS_CPU, 0x2, seq, pid) + body
