"""Benchmarks: one home for every `cvmlab bench` figure.

`cli` registers the command and names the benches; `core` has the comparison every
bench with a target returns; `guest` boots the default image as the benches do; one
module per bench (`boot`, `report`, `repro`, `punch`, `warm`, `lab`). Benches sit
above the layers they time (qemu, guest, memory, report, repro) and nothing below
imports them.
"""

from __future__ import annotations

from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register `cvmlab bench` (imported late: the benches pull in QEMU and the report)."""
    from orchestrator.bench.cli import add_parser as add

    add(subparsers)
