"""Shared fixtures. Namespace tests build their topology with ctfix's lab library."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from ctfix.lab.topology import Topology, lab_topology, leftover_namespaces

# pytest imports readline early (_pytest.capture), and GNU readline exports the
# terminal's COLUMNS and LINES into the process's C environment (not os.environ), which
# every ctfix a test starts inherits: it would then fill its text at 80 columns as for
# a terminal. A test reads ctfix as a pipe does; one that wants a width sets COLUMNS.
for _name in ("COLUMNS", "LINES"):
    if _name not in os.environ:
        os.unsetenv(_name)


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped by SIGTERM or SIGHUP (a CI timeout, a closed terminal) is
    interrupted as by Ctrl-C, so every fixture's teardown still runs: no namespace,
    process or rule is left behind."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/netns/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.netns)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="namespace tests need root"))


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_namespaces() -> Iterator[None]:
    """Fail the run if any test leaves one of the lab's namespaces behind.

    Only this process's namespaces count (their run id starts with our pid), so
    a lab or another test run going on at the same time is not blamed.
    """
    mine = f"{os.getpid() % 0xFFFF:04x}"
    yield
    left = {ns for ns in leftover_namespaces() if ns.split("-")[1].startswith(mine)}
    assert not left, f"namespaces left behind: {sorted(left)}"


@pytest.fixture
def lab() -> Iterator[Topology]:
    """The write-up's topology, IPv4 and IPv6, MASQUERADE in nftables."""
    with lab_topology(ipv6=True, netfilter="nft") as topo:
        yield topo
