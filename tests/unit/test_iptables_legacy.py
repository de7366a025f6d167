"""python-iptables raises its own XTablesError, not ImportError, while it imports
itself on a host without iptables' extensions (deploy/Dockerfile's image had only
libxtables): `ctfix watch --all-netns` then ended with an internal error as soon as
one namespace held an iptables-legacy table. It is a missing feature now: the NAT
rules' readers say they could not read those tables, and go on."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence

import pytest

from ctfix.errors import MissingFeatureError
from ctfix.platform import iptables_legacy


class XTablesError(Exception):
    """Named as python-iptables names it (iptc.errors)."""


class NoExtensions(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import iptc` fails as python-iptables does without an extensions directory."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        del path, target
        return importlib.machinery.ModuleSpec(name, self) if name == "iptc" else None

    def exec_module(self, module: types.ModuleType) -> None:
        raise XTablesError("can't find directory with extensions; please set XTABLES_LIBDIR")


def test_missing_xtables_extensions_are_a_missing_feature(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "iptc", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NoExtensions(), *sys.meta_path])
    with pytest.raises(MissingFeatureError):
        iptables_legacy.import_iptc()
