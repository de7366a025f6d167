"""`ctfix explain` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse

from ctfix.errors import NotImplementedYet


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    raise NotImplementedYet("explain")
