"""How much memory a file descriptor of any process holds, and what it is.

`st_blocks * 512` is the allocation of a memfd or a regular file (tmpfs counts
its pages there), but a guest_memfd always reports 0 blocks, so for guest_memfd
the allocation is `None` and callers must use /proc/meminfo (`meminfo.py`).
Works on `/proc/<pid>/fd/<n>` of another process (e.g. QEMU's backing fds),
which `stat` follows to the open file itself.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

# readlink of a guest_memfd fd: "anon_inode:[kvm-gmem]" on 6.18; newer kernels
# use a private "guest_memfd" pseudo-fs, so match the stable substring.
GMEM_MARKER = "kvm-gmem"
MEMFD_PREFIX = "/memfd:"


def classify_target(target: str, mode: int) -> str:
    """ "guest_memfd", "memfd", "file" (regular file) or "other" from readlink and st_mode."""
    if GMEM_MARKER in target:
        return "guest_memfd"
    if target.startswith(MEMFD_PREFIX):
        return "memfd"
    if stat.S_ISREG(mode) and target.startswith("/"):
        return "file"
    return "other"


@dataclass(frozen=True)
class FdAllocation:
    """What an fd refers to and how much of it is backed by memory or disk."""

    target: str  # readlink of the fd, e.g. "anon_inode:[kvm-gmem]", "/memfd:ram (deleted)"
    kind: str  # see classify_target
    size: int  # st_size, bytes
    blocks: int  # st_blocks as the kernel reports it (512-byte units)

    @property
    def blocks_meaningful(self) -> bool:
        """False for guest_memfd, whose st_blocks stays 0 however much is allocated."""
        return self.kind in ("memfd", "file")

    @property
    def allocated(self) -> int | None:
        """Allocated bytes (`st_blocks * 512`), or None where st_blocks means nothing."""
        return self.blocks * 512 if self.blocks_meaningful else None


def fd_path(fd: int, pid: int | str = "self", proc: str = "/proc") -> str:
    return f"{proc}/{pid}/fd/{fd}"


def fd_allocation(fd: int, pid: int | str = "self", proc: str = "/proc") -> FdAllocation:
    """The allocation behind fd `fd` of process `pid` (default: this process)."""
    path = fd_path(fd, pid, proc)
    target = os.readlink(path)
    st = os.stat(path)
    return FdAllocation(target, classify_target(target, st.st_mode), st.st_size, st.st_blocks)


def path_allocation(path: str) -> FdAllocation:
    """The same for a path (a backing file, or a `/proc/<pid>/fd/<n>` link)."""
    st = os.stat(path)
    target = os.readlink(path) if os.path.islink(path) else os.path.realpath(path)
    return FdAllocation(target, classify_target(target, st.st_mode), st.st_size, st.st_blocks)


def open_fds(pid: int | str = "self", proc: str = "/proc") -> dict[int, str]:
    """{fd: readlink target} of process `pid`; fds that vanish while listing are skipped."""
    directory = f"{proc}/{pid}/fd"
    fds: dict[int, str] = {}
    for name in os.listdir(directory):
        try:
            fds[int(name)] = os.readlink(f"{directory}/{name}")
        except FileNotFoundError:
            continue
    return fds
