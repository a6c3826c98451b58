"""What a process holds (fds, mappings, child processes), to prove teardown released it (H9).

Take a `ResourceSnapshot` before a test step and compare a later one with
`leftovers()`. By default only resources a memory test can leak are compared
(KVM and guest_memfd fds, memfds, their mappings, pidfds, and every child
process), so the interpreter's own files and heap mappings do not count.
Works for any pid (e.g. QEMU) as long as /proc/<pid> is readable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from orchestrator.host.fdalloc import open_fds
from orchestrator.host.smaps import mapped_ranges

# Substrings of fd targets and mapping names that count as test resources.
DEFAULT_MARKERS: tuple[str, ...] = ("kvm", "memfd:", "[pidfd]")


def children(pid: int | str = "self", proc: str = "/proc") -> frozenset[int]:
    """Direct children of every thread of `pid` (from /proc/<pid>/task/*/children)."""
    found: set[int] = set()
    task_dir = f"{proc}/{pid}/task"
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/children", encoding="ascii") as handle:
                found.update(int(child) for child in handle.read().split())
        except FileNotFoundError:  # the thread exited while we listed
            continue
    return frozenset(found)


@dataclass(frozen=True)
class ResourceSnapshot:
    """Matching fds, matching mappings and all children of one process at one moment."""

    pid: int | str
    fds: dict[int, str]
    mappings: frozenset[tuple[int, int, str]]
    children: frozenset[int]

    @classmethod
    def take(
        cls,
        pid: int | str = "self",
        markers: tuple[str, ...] = DEFAULT_MARKERS,
        proc: str = "/proc",
    ) -> ResourceSnapshot:
        fds = {
            fd: target
            for fd, target in open_fds(pid, proc).items()
            if any(marker in target for marker in markers)
        }
        mappings = frozenset(mapped_ranges(pid, proc, markers))
        return cls(pid, fds, mappings, children(pid, proc))


def leftovers(before: ResourceSnapshot, after: ResourceSnapshot) -> list[str]:
    """Human-readable list of what `after` holds that `before` did not (empty = clean)."""
    found: list[str] = []
    for fd, target in sorted(after.fds.items()):
        if before.fds.get(fd) != target:
            found.append(f"fd {fd} -> {target}")
    for start, end, name in sorted(after.mappings - before.mappings):
        found.append(f"mapping {start:#x}-{end:#x} {name}")
    for child in sorted(after.children - before.children):
        found.append(f"child process {child}")
    return found
