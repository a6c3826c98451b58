"""guest_memfd, the private half, as the host sees it: QEMU's kvm-gmem fds and host counters.

To shared, QEMU punches the private half with `ram_block_discard_guest_memfd_range()`
(fallocate(PUNCH_HOLE) on the guest_memfd), which has **no trace event**: it is seen
only in the host's accounting (guest_memfd folios count in /proc/meminfo `Unevictable`,
never in QEMU's RSS; research/interfaces.md section 6) and per fd nowhere (st_blocks
is 0, SEEK_DATA is ESPIPE). So a sample is QEMU's fds (their sizes) plus the host-wide
counters; those move with the rest of the host, so callers settle them under the host
lock before judging them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.host.fdalloc import GMEM_MARKER, open_fds
from orchestrator.host.meminfo import sample_meminfo
from orchestrator.timeline import Timeline, now


@dataclass(frozen=True)
class GmemFd:
    """One guest_memfd QEMU holds: its fd number and size (st_size; st_blocks is always 0)."""

    fd: int
    size: int
    target: str


def gmem_fds(pid: int, proc: str = "/proc") -> list[GmemFd]:
    """QEMU's guest_memfd fds (`anon_inode:[kvm-gmem]`; newer kernels: a `kvm-gmem` name)."""
    found = []
    for fd, target in sorted(open_fds(pid, proc).items()):
        if GMEM_MARKER not in target:
            continue
        try:
            size = os.stat(f"{proc}/{pid}/fd/{fd}").st_size
        except FileNotFoundError:
            continue
        found.append(GmemFd(fd, size, target))
    return found


@dataclass(frozen=True)
class GmemSample:
    """guest_memfd as the host sees it at now() time `at`: QEMU's fds, host-wide counters."""

    at: float
    fds: tuple[GmemFd, ...]
    unevictable: int  # /proc/meminfo Unevictable, bytes (guest_memfd folios count here)
    cached: int
    meminfo: Mapping[str, int] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        """Bytes of guest physical memory QEMU can back privately (sum of st_size)."""
        return sum(f.size for f in self.fds)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 6),
            "fds": [dataclasses.asdict(f) for f in self.fds],
            "total_size": self.total_size,
            "unevictable": self.unevictable,
            "cached": self.cached,
        }

    def record(self, timeline: Timeline | None) -> None:
        if timeline is not None:
            timeline.record(
                "host", "sample", t=self.at,
                counters={"gmem.size": self.total_size // 1024,
                          "Unevictable": self.unevictable // 1024,
                          "Cached": self.cached // 1024},
            )  # fmt: skip


def sample_gmem(pid: int, proc: str = "/proc", meminfo: str = "/proc/meminfo") -> GmemSample:
    """QEMU's guest_memfd fds and the host's Unevictable and Cached, read now."""
    at = now()
    fds = tuple(gmem_fds(pid, proc))
    info = sample_meminfo(meminfo)
    return GmemSample(at, fds, info["Unevictable"], info["Cached"])
