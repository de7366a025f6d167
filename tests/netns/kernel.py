"""What `ctfix fix` may touch in a namespace, as the tools print it: compared before
and after a fix to prove a revert restores it exactly."""

from __future__ import annotations

import re

from ctfix.lab.topology import Namespaces


def namespace_state(topo: Namespaces, ns: str) -> dict[str, str]:
    """Rules, routes of all tables, nftables, iptables-legacy and ipsets of ns
    (timestamps and counters removed)."""

    def run(*argv: str) -> str:
        return topo.run(ns, *argv)

    def saved(tool: str) -> str:
        text = run(tool)
        lines = [line for line in text.splitlines(keepends=True) if not line.startswith("#")]
        return re.sub(r"\[\d+:\d+\]", "[0:0]", "".join(lines))

    return {
        "ip -4 rule": run("ip", "-4", "rule"),
        "ip -6 rule": run("ip", "-6", "rule"),
        "ip -4 route": run("ip", "-4", "route", "show", "table", "all"),
        "ip -6 route": run("ip", "-6", "route", "show", "table", "all"),
        "nft": run("nft", "list", "ruleset"),
        "iptables-legacy-save": saved("iptables-legacy-save"),
        "ip6tables-legacy-save": saved("ip6tables-legacy-save"),
        "ipset": run("ipset", "list"),
    }


_EMPTY_TABLE = re.compile(r"\*(\w+)\n(?::[A-Z]+ ACCEPT \[0:0\]\n)+COMMIT\n")


def without_loaded_tables(after: dict[str, str], before: dict[str, str]) -> dict[str, str]:
    """Drop the empty iptables-legacy tables (builtin chains, ACCEPT, no rule) that
    were not there before: the kernel cannot unload a legacy table from a live
    namespace (ctfix/platform/remedy/legacy.py), and the apply says so."""
    cleaned = dict(after)
    for key in ("iptables-legacy-save", "ip6tables-legacy-save"):
        loaded = set(re.findall(r"^\*(\w+)$", before[key], flags=re.MULTILINE))

        def unless_loaded(match: re.Match[str], had: set[str] = loaded) -> str:
            return match.group(0) if match.group(1) in had else ""

        cleaned[key] = _EMPTY_TABLE.sub(unless_loaded, after[key])
    return cleaned
