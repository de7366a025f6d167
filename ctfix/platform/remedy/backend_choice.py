"""Which netfilter backend `fix --method snat-zone` uses: the one the namespace already
holds its rules (and its NAT rules) in, unless `--backend` says.
"""

from __future__ import annotations

import re

from ctfix.core.plan import Backend
from ctfix.errors import MissingFeatureError
from ctfix.platform import iptables_legacy

#: tables ctfix makes and choose_backend must not count as the namespace's own rules:
#: `ctfix fix`'s `ctfix_<port>` and `ctfix watch --track`'s `ctfix_watch_<pid>[_<start>_<pidns>]`.
#: (`ctfix_lab` is the lab's own, a real user of netfilter, so it counts.)
_OWN_TABLE = re.compile(r"ctfix_\d+|ctfix_watch_\d+(?:_\d+_\d+)?")


def choose_backend(override: Backend | None) -> tuple[Backend, str]:
    """(backend, why) for snat-zone: the one the namespace already uses."""
    if override:
        return override, f"--backend {override}"
    nft_tables, nft_nat = _nft_usage()
    legacy_rules = legacy_nat = False
    try:
        legacy_in_use = iptables_legacy.in_use()
    except iptables_legacy.Unreadable:
        # Not root: the dry run goes on without them, and says so.
        return (
            "nftables",
            "iptables-legacy tables could not be read (root only); "
            + ("the namespace's rules are in nftables" if nft_tables else "assuming none"),
        )
    if legacy_in_use:
        from ctfix.platform.remedy import legacy

        legacy_rules = legacy.rules_present()
        legacy_nat = legacy_rules and legacy.nat_rules_present()
    if legacy_rules and not nft_tables:
        return "iptables-legacy", "only iptables-legacy tables hold rules in this namespace"
    if legacy_rules and nft_tables:
        if legacy_nat and not nft_nat:
            return (
                "iptables-legacy",
                "both nftables and iptables-legacy hold rules; the NAT rules are in "
                "iptables-legacy",
            )
        return (
            "nftables",
            "both nftables and iptables-legacy hold rules; "
            + ("the NAT rules are in nftables" if nft_nat else "preferring nftables"),
        )
    if nft_tables:
        return "nftables", "the namespace's rules are in nftables"
    return "nftables", "the namespace holds no netfilter rules"


def _nft_usage() -> tuple[bool, bool]:
    """(has tables other than ctfix's, has a nat chain other than ctfix's)."""
    from ctfix.platform import nft

    try:
        objects = nft.ruleset()
    except MissingFeatureError:
        return False, False
    tables = nat = False
    for obj in objects:
        table = obj.get("table")
        if table and not _OWN_TABLE.fullmatch(str(table.get("name", ""))):
            tables = True
        chain = obj.get("chain")
        if chain and not _OWN_TABLE.fullmatch(str(chain.get("table", ""))):
            nat = nat or chain.get("type") == "nat"
    return tables, nat
