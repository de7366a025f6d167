"""`ctfix lab --scenario stale-nat` as a user runs it: the story, its exit status, and a
clean machine after; `ctfix lab` alone still tells the wrong-source story."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ctfix.lab.topology import leftover_namespaces

LAB = [sys.executable, "-m", "ctfix", "lab"]


@pytest.mark.parametrize("netfilter", ["nft", "iptables-legacy"])
def test_stale_nat_story_is_reproduced_and_recovers(netfilter: str) -> None:
    proc = subprocess.run(
        [*LAB, "--scenario", "stale-nat", "--netfilter", netfilter, "--port", "5140"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "Result: bug reproduced, fix confirmed." in out
    assert "✗" not in out
    # The black hole, the finding with its old and new target, the flush, the recovery.
    assert "seen:     nothing at B" in out
    assert "verdict broken, stale target 198.51.100.21:5140, now 198.51.100.22:5140" in out
    kept = r"seen:     1 deleted; the other \d+ entr(y|ies) of the table all still there"
    assert re.search(kept, out)
    assert "goes to 198.51.100.22:5140" in out
    names = set(re.findall(r"\b(ctfix-[0-9a-f]{8}-(?:host|ctr|up))\b", out))
    assert len(names) == 3 and not names & set(leftover_namespaces())


def test_stale_nat_refuses_ipv6_in_one_line() -> None:
    proc = subprocess.run([*LAB, "--scenario", "stale-nat", "--ipv6"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
