"""`ctfix fix --revert/--status` when the state file lies, is lost, or the kernel was
changed by hand (issue 9, items 1-3).

The kernel is the truth, the state file a hint: revert removes only objects that
carry ctfix's own marks for the port (table `inet ctfix_<port>` whose rules carry
`ctfix:<port>`, rules/routes of protocol 199 in the port's table, iptables rules
commented `ctfix:<port>`, ipsets `ctfix-<port>-...`). What a user notices: a tampered
record makes revert refuse in one line and the namespace stays as it was; a lost
record is found by --status and cleaned by --revert; a fix partly removed by hand
reverts completely and says what was already gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ctfix.lab.topology import UPLINK_V4, Topology
from tests.netns import test_fix as fix_tests
from tests.netns.test_fix import (
    PORT,
    answered,
    ctfix_fix,
    kernel_state,
    without_loaded_raw,
    without_members,
)

# The same labs and private state directory as test_fix.py (fixtures, by name).
broken_lab = fix_tests.broken_lab
nft_lab = fix_tests.nft_lab
legacy_lab = fix_tests.legacy_lab
state_dir = fix_tests.state_dir


def _state_file(state_dir: Path) -> Path:
    [path] = [p for p in state_dir.glob("*.json") if not p.name.startswith(".")]
    return path


def _edit_steps(state_dir: Path, edit: Any) -> None:
    """Rewrite the recorded steps of the one fix, as an attacker with root would."""
    path = _state_file(state_dir)
    record = json.loads(path.read_text())
    [fix] = record["fixes"].values()
    for recorded in fix["steps"]:
        edit(recorded["step"])
    path.write_text(json.dumps(record))


def _applied(topo: Topology) -> None:
    assert not answered(topo, UPLINK_V4)
    applied = ctfix_fix(topo, str(PORT), "--method", "snat-zone", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert answered(topo, UPLINK_V4)


def test_a_record_pointing_at_the_masquerade_table_is_refused_and_deletes_nothing(
    nft_lab: Topology, state_dir: Path
) -> None:
    """Item 1: the nft step edited to name the namespace's own MASQUERADE table."""
    topo = nft_lab
    before = kernel_state(topo)
    _applied(topo)

    def point_at_masquerade(step: dict[str, Any]) -> None:
        if step["spec"]["kind"] == "nft-table":
            step["spec"]["family"], step["spec"]["name"] = "ip", "ctfix_lab"

    _edit_steps(state_dir, point_at_masquerade)
    tampered = without_members(kernel_state(topo))
    assert "table ip ctfix_lab" in tampered["nft"] and "masquerade" in tampered["nft"]

    status = ctfix_fix(topo, "--status", "--json")
    assert status.returncode == 1, status.stdout
    report = json.loads(status.stdout)
    [step] = report["fixes"][0]["steps"]
    assert step["foreign"] and "table ip ctfix_lab" in step["foreign"]
    # QA F16: the object the record points at, not the name ctfix made it under.
    assert step["object"] == "table ip ctfix_lab"
    assert "FOREIGN table ip ctfix_lab" in ctfix_fix(topo, "--status").stdout
    assert report["way_out"] and f"--revert {PORT}" in report["way_out"]
    assert not report["fixes"][0]["whole"]
    # ctfix's own table is now explained by no record: it is named as such.
    assert [o["object"] for o in report["unrecorded"]] == [f"table inet ctfix_{PORT}"]
    assert report["unrecorded"][0]["remove_with"] is None  # refused: the way out instead

    reverted = ctfix_fix(topo, "--revert")
    assert reverted.returncode == 2, reverted.stdout
    [line] = reverted.stderr.strip().splitlines()
    assert "table ip ctfix_lab" in line and "nothing was removed" in line
    assert "Traceback" not in reverted.stderr
    assert without_members(kernel_state(topo)) == tampered
    assert answered(topo, UPLINK_V4)  # ctfix's own table still works

    # The way out the refusal gives works: the record aside, --revert PORT removes
    # ctfix's own table (found by its marks) and nothing else.
    assert f"ctfix fix --revert {PORT} --netns {topo.host}" in line
    state = _state_file(state_dir)
    state.rename(state.with_name(state.name + ".aside"))
    out = ctfix_fix(topo, "--revert", str(PORT), "--json")
    assert out.returncode == 0, out.stderr
    assert [o["object"] for o in json.loads(out.stdout)["unrecorded_removed"]] == [
        f"table inet ctfix_{PORT}"
    ]
    assert kernel_state(topo) == before  # the MASQUERADE table is still there
    assert not answered(topo, UPLINK_V4)
    assert not list(state_dir.glob("*.lock"))  # QA F22: the last record gone, the lock too


def test_a_record_pointing_at_a_foreign_ipset_is_refused_and_deletes_nothing(
    legacy_lab: Topology, state_dir: Path
) -> None:
    """Item 1: an ipset step edited to name an ipset ctfix did not make."""
    topo = legacy_lab
    topo.run(topo.host, "ipset", "create", "theirs", "hash:ip,port", "timeout", "60")
    _applied(topo)

    def point_at_theirs(step: dict[str, Any]) -> None:
        if step["spec"]["kind"] == "ipset" and step["spec"]["family"] == "ipv4":
            step["spec"]["name"] = "theirs"

    _edit_steps(state_dir, point_at_theirs)
    tampered = without_members(kernel_state(topo))
    reverted = ctfix_fix(topo, "--revert", str(PORT))
    assert reverted.returncode == 2
    [line] = reverted.stderr.strip().splitlines()
    assert "ipset theirs" in line and "nothing was removed" in line
    assert without_members(kernel_state(topo)) == tampered
    assert "theirs" in topo.run(topo.host, "ipset", "list", "-n").split()


def test_a_lost_state_file_is_found_by_status_and_cleaned_by_revert(
    broken_lab: Topology, state_dir: Path
) -> None:
    """Item 2: `rm` of the record leaves a working fix that no record explains."""
    topo = broken_lab
    before = kernel_state(topo)
    _applied(topo)
    recorded = json.loads(ctfix_fix(topo, "--status", "--json").stdout)["fixes"][0]["steps"]
    _state_file(state_dir).unlink()

    status = ctfix_fix(topo, "--status")
    assert status.returncode == 1, status.stdout
    assert f"ctfix fix --revert {PORT} --netns {topo.host}" in status.stdout
    assert _status_to_a_gone_reader(topo) == 1  # `ctfix fix --status | head -3` (item 9)
    data = json.loads(ctfix_fix(topo, "--status", "--json").stdout)
    assert data["fixes"] == []
    objects = [o["object"] for o in data["unrecorded"]]
    assert {o["port"] for o in data["unrecorded"]} == {PORT}
    if topo.netfilter == "nft":
        assert objects == [f"table inet ctfix_{PORT}"]
    else:
        # Every recorded rule and ipset is found again by its marks.
        assert len(objects) == len(recorded)
        assert sorted(o.removeprefix("ipset ") for o in objects if o.startswith("ipset ")) == (
            sorted(s["step"]["spec"]["name"] for s in recorded
                   if s["step"]["spec"]["kind"] == "ipset")
        )
        assert sum(f"ctfix:{PORT}" in o for o in objects) == len(recorded) - sum(
            o.startswith("ipset ") for o in objects
        )
    for line in objects:
        assert line in status.stdout

    reverted = ctfix_fix(topo, "--revert", str(PORT))
    assert reverted.returncode == 0, reverted.stderr
    for line in objects:
        assert f"removed {line}" in reverted.stdout
    assert "no record" in reverted.stdout
    after = kernel_state(topo)
    if topo.netfilter == "iptables-legacy":
        after = without_loaded_raw(after, before)
    assert after == before
    assert not answered(topo, UPLINK_V4)
    clean = ctfix_fix(topo, "--status")
    assert clean.returncode == 0 and "no fix recorded" in clean.stdout
    assert sorted(p.name for p in state_dir.iterdir()) == []  # QA F22: no lock file left


def test_a_fix_partly_removed_by_hand_reverts_and_says_what_was_missing(
    legacy_lab: Topology,
) -> None:
    """Item 3: the IPv6 rules and ipset deleted by hand before --revert."""
    topo = legacy_lab
    before = kernel_state(topo)
    _applied(topo)
    saved = topo.run(topo.host, "ip6tables-legacy-save")
    for line in saved.splitlines():
        if f"ctfix:{PORT}" in line and line.startswith("-A "):
            table = _table_of(saved, line)
            topo.run(topo.host, "sh", "-c", f"ip6tables-legacy -w -t {table} -D {line[3:]}")
    for name in topo.run(topo.host, "ipset", "list", "-n").split():
        if name.startswith(f"ctfix-{PORT}-v6-"):
            topo.run(topo.host, "ipset", "destroy", name)

    reverted = ctfix_fix(topo, "--revert", str(PORT))
    assert reverted.returncode == 0, reverted.stderr
    assert "Traceback" not in reverted.stderr and "ValueError" not in reverted.stderr
    assert f"missing ipset ctfix-{PORT}-v6-0" in reverted.stdout
    assert f"removed ipset ctfix-{PORT}-v4-0" in reverted.stdout
    assert without_loaded_raw(kernel_state(topo), before) == before
    status = ctfix_fix(topo, "--status")
    assert status.returncode == 0 and "no fix recorded" in status.stdout


def _status_to_a_gone_reader(topo: Topology) -> int:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ctfix", "fix", "--status", "--netns", topo.host],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    return done.returncode


def _table_of(saved: str, rule_line: str) -> str:
    """The `*table` section of iptables-save output that holds rule_line."""
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        if line == rule_line:
            return table
    raise AssertionError(rule_line)
