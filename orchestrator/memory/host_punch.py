"""Host punch injection: free guest pages under a running guest, the way a host bug would.

"Host userspace punched a hole under a running guest" is reproduced literally: we
take QEMU's own file descriptor of a memory backend (`pidfd_open` + `pidfd_getfd`,
Linux >= 5.6, needs ptrace rights over QEMU: root, or the same user without Yama
restrictions) and call `fallocate(PUNCH_HOLE | KEEP_SIZE)` on it at the offset that
holds the chosen guest physical range. The pages are freed, QEMU's mapping of them
reads zero from then on, and the guest sees zeros there.

Finding the fd: QEMU names every memfd it creates "memory-backend-memfd", so two
memfd backends cannot be told apart by name. We go from the backend's RAMBlock
host address (HMP `info ramblock`) to the mapping that contains it in
/proc/<pid>/maps, whose device and inode identify the file, then to the fd in
/proc/<pid>/fd with the same (st_dev, st_ino). The mapping's file offset also covers
`memory-backend-file,offset=`.

Anonymous RAM (`memory-backend-ram`) has no fd: no other process can free its pages.
`process_madvise(2)` would be the only door, and the kernel refuses MADV_DONTNEED,
MADV_REMOVE and MADV_FREE on another process (EINVAL; it allows only COLD, PAGEOUT,
WILLNEED and COLLAPSE, which keep the contents). `anon_discard_refused()` checks that
claim on the running kernel.

Every punch is validated in full (range, alignment, backend kind, fd found) before
the first `fallocate`, and recorded on the Timeline as {"source": "op", "kind": "punch"}.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from orchestrator.errors import HostError, MemoryOpError
from orchestrator.kvm.libc import fallocate
from orchestrator.memory.layout import (
    GuestMemoryMap,
    Memdev,
    Monitor,
    RamBlockInfo,
    flatview_problems,
    map_from_qmp,
    parse_flatview,
    parse_ramblocks,
)
from orchestrator.timeline import Timeline, now

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PUNCH_MODE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
# Syscall numbers from the unified table (the same on every architecture since 5.1).
SYS_PIDFD_GETFD = 438
SYS_PROCESS_MADVISE = 440
MADV_DONTNEED = 4

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_MAPS_RE = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) \S+ (?P<offset>[0-9a-f]+) "
    r"(?P<major>[0-9a-f]+):(?P<minor>[0-9a-f]+) (?P<inode>\d+)\s*(?P<path>.*)$"
)


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/<pid>/maps."""

    start: int
    end: int
    offset: int  # file offset of `start`
    dev: int  # os.makedev(major, minor)
    inode: int
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """Lines of /proc/<pid>/maps (pure)."""
    mappings: list[Mapping] = []
    for line in text.splitlines():
        match = _MAPS_RE.match(line)
        if match:
            mappings.append(
                Mapping(
                    start=int(match["start"], 16),
                    end=int(match["end"], 16),
                    offset=int(match["offset"], 16),
                    dev=os.makedev(int(match["major"], 16), int(match["minor"], 16)),
                    inode=int(match["inode"]),
                    path=match["path"],
                )
            )
    return mappings


@dataclass(frozen=True)
class QemuBacking:
    """Which of QEMU's fds holds a backend, and where the RAMBlock starts in that file."""

    memdev: str
    kind: str  # "memfd" | "file"
    qemu_pid: int
    qemu_fd: int
    target: str  # readlink of the fd, e.g. "/memfd:memory-backend-memfd (deleted)"
    file_offset: int  # file offset of the RAMBlock's first byte
    ramblock: str


def _anon_error(memdev: Memdev) -> MemoryOpError:
    return MemoryOpError(
        f"backend {memdev.id} is anonymous memory ({memdev.qom_type}): it has no file "
        "descriptor, so no process other than QEMU can free its pages (the kernel refuses "
        "process_madvise MADV_DONTNEED/MADV_REMOVE on another process with EINVAL)",
        "back the guest with memfd (backend=memfd) or a file (backend=file) to inject punches",
    )


def _private_error(memdev: Memdev) -> MemoryOpError:
    return MemoryOpError(
        f"backend {memdev.id} is mapped private (share=off): the pages the guest wrote are "
        "QEMU's copy-on-write copies, which a punch of the file does not reach; it would "
        "report success (and may even free page cache) while the guest keeps its data",
        "use share=on, or pass allow_private=True to demonstrate exactly that",
    )


def find_backing(pid: int, memdev: Memdev, block: RamBlockInfo, proc: str = "/proc") -> QemuBacking:
    """QEMU's fd for `memdev`, found through the mapping at its RAMBlock's host address."""
    if memdev.kind == "anon":
        raise _anon_error(memdev)
    with open(f"{proc}/{pid}/maps", encoding="utf-8") as maps_file:
        maps = parse_maps(maps_file.read())
    mapping = next((m for m in maps if m.start <= block.hva < m.end), None)
    if mapping is None or mapping.inode == 0:
        raise MemoryOpError(
            f"backend {memdev.id}: QEMU's RAMBlock {block.name} at {block.hva:#x} is not a "
            f"file mapping in /proc/{pid}/maps",
            "only memfd and file backends can be punched from outside QEMU",
        )
    fd_dir = f"{proc}/{pid}/fd"
    for name in sorted(os.listdir(fd_dir), key=int):
        path = f"{fd_dir}/{name}"
        try:
            st = os.stat(path)
            target = os.readlink(path)
        except FileNotFoundError:
            continue  # closed while we looked
        if st.st_ino == mapping.inode and st.st_dev == mapping.dev:
            return QemuBacking(
                memdev=memdev.id,
                kind=memdev.kind,
                qemu_pid=pid,
                qemu_fd=int(name),
                target=target,
                file_offset=mapping.offset + (block.hva - mapping.start),
                ramblock=block.name,
            )
    raise MemoryOpError(
        f"backend {memdev.id}: QEMU maps {mapping.path!r} but holds no fd to it",
        "QEMU closed the backing fd (e.g. a file backend without share); it cannot be punched",
    )


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate of process `pidfd`'s fd `target_fd` in this process (close-on-exec)."""
    fd = _syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES):
            raise HostError(
                f"pidfd_getfd refused ({os.strerror(err)}): no ptrace rights over QEMU",
                "run as root, or as QEMU's user with kernel.yama.ptrace_scope <= 1",
            )
        if err == errno.ENOSYS:
            raise HostError("pidfd_getfd is missing (Linux < 5.6)", "use a newer host kernel")
        raise OSError(err, f"pidfd_getfd({target_fd}): {os.strerror(err)}")
    return int(fd)


@contextlib.contextmanager
def borrowed_fd(pid: int, fd: int) -> Iterator[int]:
    """Process `pid`'s fd `fd`, duplicated into this process for the `with` block."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise MemoryOpError(
            f"QEMU (pid {pid}) is gone", "the guest exited; see qemu.stderr"
        ) from None
    try:
        local = pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    try:
        yield local
    finally:
        os.close(local)


def allocated_bytes(fd: int) -> int:
    """Bytes of a memfd or file backed by memory or disk (st_blocks is in 512-byte units)."""
    return os.fstat(fd).st_blocks * 512


def range_is_hole(fd: int, offset: int, length: int) -> bool:
    """True when no byte of [offset, offset + length) of `fd` is backed (lseek SEEK_DATA).

    Exact per range, unlike st_blocks, which other writers to the same file move too.
    tmpfs/shmem (memfd) and most disk file systems answer; one without SEEK_HOLE
    support reports the whole file as data, so the answer is then False.
    """
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as error:
        if error.errno == errno.ENXIO:  # no data at or after offset
            return True
        raise
    return data >= offset + length


@dataclass(frozen=True)
class PunchRecord:
    """One fallocate(PUNCH_HOLE) on one backend, with the allocation around it."""

    gpa: int
    length: int
    memdev: str
    offset: int  # in the backing file/memfd
    target: str
    qemu_pid: int
    qemu_fd: int
    t_start: float  # now() just before fallocate
    t_end: float  # now() right after it returned
    allocated_before: int  # bytes (st_blocks * 512) of the whole backing
    allocated_after: int
    hole_after: bool  # the range read as a hole (SEEK_DATA) right after the punch

    @property
    def freed(self) -> int:
        return self.allocated_before - self.allocated_after

    @property
    def seconds(self) -> float:
        return self.t_end - self.t_start


class HostPuncher:
    """Punches guest physical ranges of one running QEMU from the host.

    The GPA map is built from QMP once and checked against QEMU's FlatView (`info mtree
    -f`); a disagreement is an error before anything is punched.
    """

    def __init__(
        self,
        monitor: Monitor,
        qemu_pid: int,
        timeline: Timeline | None = None,
        memory_map: GuestMemoryMap | None = None,
        check_flatview: bool = True,
    ) -> None:
        self._monitor = monitor
        self.qemu_pid = qemu_pid
        self._timeline = timeline
        self.memory_map = memory_map if memory_map is not None else map_from_qmp(monitor)
        if check_flatview:
            flat = parse_flatview(monitor.human_monitor("info mtree -f"))
            problems = flatview_problems(self.memory_map, flat)
            if problems:
                raise MemoryOpError(
                    "cvmlab's GPA map disagrees with QEMU's FlatView: " + "; ".join(problems[:3]),
                    "this machine layout is not supported for punching; report it with "
                    "the output of `info mtree -f`",
                )
        self._blocks: list[RamBlockInfo] | None = None
        self._backings: dict[str, QemuBacking] = {}
        self.records: list[PunchRecord] = []

    def backing(self, memdev_id: str) -> QemuBacking:
        """QEMU's fd for backend `memdev_id` (MemoryOpError for anonymous RAM)."""
        memdev = self.memory_map.memdev(memdev_id)
        if memdev.kind == "anon":
            raise _anon_error(memdev)
        if memdev_id in self._backings:
            return self._backings[memdev_id]
        if self._blocks is None:
            self._blocks = parse_ramblocks(self._monitor.human_monitor("info ramblock"))
        block = next((b for b in self._blocks if b.is_memdev(memdev_id)), None)
        if block is None:
            raise MemoryOpError(f"no RAMBlock for backend {memdev_id} in `info ramblock`", "")
        found = find_backing(self.qemu_pid, memdev, block)
        self._backings[memdev_id] = found
        return found

    def plan(
        self, gpa: int, length: int, allow_private: bool = False
    ) -> list[tuple[int, int, int, QemuBacking]]:
        """(gpa, length, file offset, backing) per piece; every check, no side effect."""
        planned = []
        for piece in self.memory_map.locate(gpa, length):
            backing = self.backing(piece.memdev)
            if not self.memory_map.memdev(piece.memdev).share and not allow_private:
                raise _private_error(self.memory_map.memdev(piece.memdev))
            planned.append((piece.gpa, piece.length, backing.file_offset + piece.offset, backing))
        return planned

    def punch(self, gpa: int, length: int, allow_private: bool = False) -> list[PunchRecord]:
        """Punch GPA [gpa, gpa + length) out of its backing; one record per backend piece.

        Backends mapped private (share=off) are refused unless `allow_private`: see
        `_private_error` for why such a punch does not reach the guest's data.
        """
        planned = self.plan(gpa, length, allow_private)
        records: list[PunchRecord] = []
        for piece_gpa, piece_length, offset, backing in planned:
            with borrowed_fd(backing.qemu_pid, backing.qemu_fd) as fd:
                before = allocated_bytes(fd)
                t_start = now()
                fallocate(fd, PUNCH_MODE, offset, piece_length)
                t_end = now()
                after = allocated_bytes(fd)
                hole = range_is_hole(fd, offset, piece_length)
            record = PunchRecord(
                gpa=piece_gpa,
                length=piece_length,
                memdev=backing.memdev,
                offset=offset,
                target=backing.target,
                qemu_pid=backing.qemu_pid,
                qemu_fd=backing.qemu_fd,
                t_start=t_start,
                t_end=t_end,
                allocated_before=before,
                allocated_after=after,
                hole_after=hole,
            )
            records.append(record)
            if self._timeline is not None:
                data = asdict(record)
                del data["t_start"]
                self._timeline.record("op", "punch", t=t_start, **data)
        self.records.extend(records)
        return records

    def punch_pages(
        self, gpas: Sequence[int], page_size: int = 4096, allow_private: bool = False
    ) -> list[PunchRecord]:
        """Punch single pages at `gpas` (merging adjacent ones); all validated before any punch."""
        runs: list[tuple[int, int]] = []
        for gpa in sorted(set(gpas)):
            if runs and runs[-1][0] + runs[-1][1] == gpa:
                runs[-1] = (runs[-1][0], runs[-1][1] + page_size)
            else:
                runs.append((gpa, page_size))
        for gpa, length in runs:
            self.plan(gpa, length, allow_private)
        return [record for gpa, length in runs for record in self.punch(gpa, length, allow_private)]


_ANON_CHILD = """
import mmap, ctypes, sys
page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
page[0] = 0x5A
print(ctypes.addressof(ctypes.c_char.from_buffer(page)), flush=True)
sys.stdin.readline()
print("kept" if page[0] == 0x5A else "lost", flush=True)
"""


def anon_discard_refused(timeout: float = 30.0) -> bool:
    """Does this kernel refuse process_madvise(MADV_DONTNEED) on another process (EINVAL)?

    Starts a child that maps and touches one anonymous page, asks the kernel to drop it
    from outside, and reports whether the kernel said EINVAL and the child kept its data.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _ANON_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        address = int(child.stdout.readline())
        iov = (ctypes.c_size_t * 2)(address, mmap.PAGESIZE)
        pidfd = os.pidfd_open(child.pid)
        try:
            ret = _syscall(SYS_PROCESS_MADVISE, pidfd, ctypes.byref(iov), 1, MADV_DONTNEED, 0)
            err = ctypes.get_errno() if ret < 0 else 0
        finally:
            os.close(pidfd)
        answer, _ = child.communicate("\n", timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return ret < 0 and err == errno.EINVAL and answer.strip() == "kept"
