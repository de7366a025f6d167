"""explain and the fix dry run with exactly the systemd unit's capabilities
(CAP_NET_ADMIN, CAP_NET_RAW) as a user other than root, and as a plain user
(issue 9 item 8).

With the capabilities they work, skipping what only root can read (the list of
iptables-legacy tables is mode 0440) and saying so; as a plain user nothing but
ctfix's own one-line error reaches stderr (libnftables printed "Operation not
permitted (you must be root)" of its own).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ctfix.lab.topology import UPLINK_V4, Topology
from tests.netns import test_fix as fix_tests
from tests.netns.test_fix import PORT, answered

NOBODY = "65534"
CAPS = ["--inh-caps=+net_admin,+net_raw", "--ambient-caps=+net_admin,+net_raw"]
CHECKOUT = Path(__file__).parents[2]


legacy_lab = fix_tests.legacy_lab  # the fixture, by name


def as_nobody(topo: Topology, caps: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", topo.host, "setpriv", f"--reuid={NOBODY}",
         f"--regid={NOBODY}", "--clear-groups", *(caps or ["--inh-caps=-all"]),
         sys.executable, "-m", "ctfix", *argv],
        capture_output=True, text=True, timeout=60, cwd=CHECKOUT,
    )


@pytest.fixture(autouse=True)
def _checkout_readable_by_nobody(legacy_lab: Topology) -> None:
    probe = as_nobody(legacy_lab, [], "--version")
    if probe.returncode != 0:
        pytest.skip(f"this checkout is not readable by uid {NOBODY}: {probe.stderr.strip()}")


def test_explain_with_the_unit_capabilities_says_what_it_could_not_read(
    legacy_lab: Topology,
) -> None:
    topo = legacy_lab
    assert not answered(topo, UPLINK_V4)
    done = as_nobody(topo, CAPS, "explain", str(PORT))
    assert done.stderr == ""
    assert done.returncode == 1, done.stdout  # broken or at-risk, not an error
    assert "iptables-legacy" in done.stdout and "root only" in done.stdout


def test_fix_dry_run_with_the_unit_capabilities_plans_and_says_what_it_skipped(
    legacy_lab: Topology,
) -> None:
    topo = legacy_lab
    assert not answered(topo, UPLINK_V4)
    done = as_nobody(topo, CAPS, "fix", str(PORT), "--method", "snat-zone")
    assert done.stderr == ""
    assert done.returncode == 0
    assert "dry run, nothing changed" in done.stdout
    assert "iptables-legacy tables could not be read (root only)" in done.stdout


def test_a_plain_user_gets_ctfix_one_line_and_nothing_else(legacy_lab: Topology) -> None:
    for argv in (
        ("fix", str(PORT), "--method", "snat-zone", "--force"),
        ("fix", str(PORT), "--method", "policy-route", "--force"),
        ("explain", str(PORT)),
    ):
        done = as_nobody(legacy_lab, [], *argv)
        assert done.returncode == 2
        [line] = done.stderr.splitlines()
        assert line.startswith(f"ctfix {argv[0]}: error: "), line
