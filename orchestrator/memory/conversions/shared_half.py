"""The shared half: is QEMU's shared backing a hole where the guest's memory is private?

To private, QEMU must discard the shared half (`ram_block_discard_range()` on the memfd or
file: fallocate(PUNCH_HOLE)); a range whose last conversion went to private and still
holds data on the shared backing is backed twice (H2). Checked per page with SEEK_DATA
on QEMU's own fd, borrowed with pidfd_getfd (`orchestrator.memory.host_punch`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.errors import MemoryOpError
from orchestrator.memory.host_punch import borrowed_fd, range_is_hole
from orchestrator.units import PAGE


@dataclass(frozen=True)
class HoleReport:
    """SEEK_DATA over QEMU's shared backing for GPA ranges whose last conversion was to private."""

    checked: int  # bytes of RAM looked at
    backed: tuple[tuple[int, int], ...]  # (gpa, length) pieces that still hold data
    outside_ram: int  # bytes of the ranges that are not RAM (MMIO: nothing to check)

    @property
    def clean(self) -> bool:
        return not self.backed

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "backed": [[hex(g), n] for g, n in self.backed[:20]],
            "backed_pieces": len(self.backed),
            "outside_ram": self.outside_ram,
        }


class Planner(Protocol):
    """`orchestrator.memory.host_punch.HostPuncher.plan` (gpa, length -> pieces)."""

    def plan(
        self, gpa: int, length: int, allow_private: bool = False
    ) -> list[tuple[int, int, int, Any]]: ...


def shared_half_holes(
    planner: Planner, ranges: Sequence[tuple[int, int]], page: int = PAGE
) -> HoleReport:
    """For each (gpa, size): is the shared backing a hole there (page by page, SEEK_DATA)?

    Needs a memfd or file backend mapped shared (what QEMU discards with fallocate);
    ranges outside guest RAM are counted, not checked.
    """
    checked = 0
    outside = 0
    backed: list[tuple[int, int]] = []
    fds: dict[tuple[int, int], int] = {}
    with contextlib.ExitStack() as stack:
        for gpa, size in ranges:
            try:
                pieces = planner.plan(gpa, size)
            except MemoryOpError:
                outside += size
                continue
            for piece_gpa, length, offset, backing in pieces:
                key = (backing.qemu_pid, backing.qemu_fd)
                if key not in fds:
                    fds[key] = stack.enter_context(borrowed_fd(*key))
                fd = fds[key]
                checked += length
                if range_is_hole(fd, offset, length):
                    continue
                # Name the exact pages that hold data.
                for at in range(0, length, page):
                    if not range_is_hole(fd, offset + at, page):
                        if backed and backed[-1][0] + backed[-1][1] == piece_gpa + at:
                            backed[-1] = (backed[-1][0], backed[-1][1] + page)
                        else:
                            backed.append((piece_gpa + at, page))
    return HoleReport(checked, tuple(backed), outside)
