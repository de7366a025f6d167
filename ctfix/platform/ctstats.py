"""The kernel's conntrack statistics, read over raw ctnetlink and /proc/sys.

`sample()` asks for every CPU's counters (IPCTNL_MSG_CT_GET_STATS_CPU, what
`conntrack -S` shows) and for the entry count and limit (IPCTNL_MSG_CT_GET_STATS,
`conntrack -C`), and reads nf_conntrack_buckets; it needs neither
/proc/net/stat/nf_conntrack (absent without NF_CONNTRACK_PROCFS) nor the conntrack
tool. Decoding is `ctfix.core.ctstats`.

Know before changing: like every netlink socket, the one used here belongs to the
namespace of the thread that creates it, so call `sample()` after entering the
namespace (the watch loop and `ctfix health` do). nf_conntrack_max and the hash
table are host-wide: a child namespace reads the host's values, and its own entries
count against that same limit. The two requests are two moments; the counters come
first, so entries/max are at least as new as the counters.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator

from ctfix.core import ctstats, decode
from ctfix.core.ctstats import CpuStats, GlobalStats
from ctfix.core.health import Sample
from ctfix.platform.conntrack import _open, _raise_for, _unavailable

_RECV_SIZE = 1 << 16
_SYSCTL = "/proc/sys/net/netfilter/"
_WHAT = "reading conntrack statistics"


def _replies(request: bytes) -> Iterator[bytes]:
    """The raw recv() buffers answering one request, up to its end (DONE or ACK)."""
    sock = _open(_WHAT)
    try:
        sock.bind((0, 0))
        try:
            sock.send(request)
        except PermissionError:
            _raise_for(errno.EPERM, _WHAT)
        while True:
            chunk = sock.recv(_RECV_SIZE)
            yield chunk
            if decode.ends_dump(chunk):
                return
    finally:
        sock.close()


def _exchange(request: bytes) -> tuple[list[CpuStats], GlobalStats | None]:
    cpus: list[CpuStats] = []
    global_stats: GlobalStats | None = None
    for chunk in _replies(request):
        batch = ctstats.decode_stats(chunk)
        cpus += batch.cpus
        global_stats = batch.global_stats or global_stats
        if batch.error == errno.EINVAL:
            # nfnetlink's answer for a subsystem nobody registered: no ctnetlink.
            raise _unavailable()
        if batch.error:
            _raise_for(batch.error, _WHAT)
    return cpus, global_stats


def _sysctl(name: str) -> int | None:
    try:
        with open(_SYSCTL + name) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def udp_timeout() -> int | None:
    """net.netfilter.nf_conntrack_udp_timeout of the calling thread's namespace: how
    long an unreplied UDP entry lives after its last packet (None: not readable)."""
    return _sysctl("nf_conntrack_udp_timeout")


def udp_timeout_stream() -> int | None:
    """net.netfilter.nf_conntrack_udp_timeout_stream: how long an ASSURED UDP entry
    (traffic both ways) lives after its last packet (None: not readable)."""
    return _sysctl("nf_conntrack_udp_timeout_stream")


def sample() -> Sample:
    """One reading of the current namespace's conntrack statistics.

    Raises PrivilegeError without CAP_NET_ADMIN and MissingFeatureError without
    ctnetlink. Entries and max come from netlink, else from /proc/sys (older kernels
    do not send the limit).
    """
    taken = time.monotonic()
    cpus, _ = _exchange(ctstats.stats_cpu_request())
    _, global_stats = _exchange(ctstats.stats_request())
    entries = global_stats.entries if global_stats else None
    max_entries = global_stats.max_entries if global_stats else None
    if entries is None:
        entries = _sysctl("nf_conntrack_count")
    if max_entries is None:
        max_entries = _sysctl("nf_conntrack_max")
    return Sample(
        taken=taken,
        cpus=tuple(sorted(cpus, key=lambda c: c.cpu)),
        entries=entries,
        max_entries=max_entries,
        buckets=_sysctl("nf_conntrack_buckets"),
    )


def raw_messages() -> tuple[bytes, bytes]:
    """The raw replies to both requests, for recording fixtures (root)."""
    return (
        b"".join(_replies(ctstats.stats_cpu_request())),
        b"".join(_replies(ctstats.stats_request())),
    )
