"""Look for a guest's secret where the host can read guest memory: a QEMU dump, the RAM backing.

The confidentiality check of intel/lkvs (KVM/qemu/tests/tdx_memory_confident.py) and
canonical/tdx (tests/tests/guest/test_guest_memory.py), done without HMP: the guest
writes a random secret, the host asks QEMU for `dump-guest-memory` (QMP, paging=false,
an ELF file of guest physical memory written by QEMU itself) and also reads QEMU's RAM
backing directly. A plain guest's secret is found in both (the control: it shows the
search works); a TDX or SEV-SNP guest's private memory lives in guest_memfd, which the
host cannot map, so neither the dump (QEMU reads the shared half) nor the backing holds
it (H1).

Reading the backing never changes it: a memfd is read with pread() over its data
segments only (SEEK_DATA/SEEK_HOLE). A read fault through a shared mapping of a tmpfs
hole would allocate a page, i.e. populate the shared half of a confidential guest's
private GPA: exactly what H2 forbids. Anonymous RAM (memory-backend-ram) is read through
/proc/<pid>/mem, where unpopulated pages read as zero without being allocated.

Dumps are big (the guest's RAM): they go to a 0700 directory and are deleted after the
search, whatever happens.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from orchestrator.errors import MemoryOpError, QmpError
from orchestrator.timeline import now

CHUNK = 8 * 1024 * 1024
DUMP_TIMEOUT = 300.0


def new_secret() -> str:
    """A secret no memory holds by chance: a prefix and 128 random bits in hex."""
    return f"cvmlab-secret-{secrets.token_hex(16)}"


def _count_stream(read: Any, start: int, end: int, needle: bytes) -> int:
    """Occurrences of `needle` in [start, end) read by `read(offset, length)`, chunkwise,
    with an overlap so a match across a chunk boundary is counted once."""
    count = 0
    carry = b""
    offset = start
    while offset < end:
        data = read(offset, min(CHUNK, end - offset))
        if not data:
            break
        buffer = carry + data
        position = buffer.find(needle)
        while position != -1:
            count += 1
            position = buffer.find(needle, position + 1)
        # Keep the tail that could start a match, but never recount a whole match.
        carry = buffer[-(len(needle) - 1) :] if len(needle) > 1 else b""
        offset += len(data)
    return count


def data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every allocated segment of a file (SEEK_DATA / SEEK_HOLE)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data after offset
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        offset = end


def count_in_fd(fd: int, needle: bytes) -> int:
    """Occurrences of `needle` in the allocated parts of file `fd` (holes are never read)."""
    size = os.fstat(fd).st_size
    return sum(
        _count_stream(lambda off, n: os.pread(fd, n, off), start, end, needle)
        for start, end in data_segments(fd, size)
    )


def count_in_file(path: Path, needle: bytes) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return count_in_fd(fd, needle)
    finally:
        os.close(fd)


def count_in_process_memory(pid: int | str, start: int, length: int, needle: bytes) -> int:
    """Occurrences of `needle` in [start, start + length) of process `pid`'s memory."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return _count_stream(lambda off, n: os.pread(fd, n, off), start, start + length, needle)
    finally:
        os.close(fd)


# --- dump-guest-memory ---------------------------------------------------------------------


class DumpMonitor(Protocol):
    """The parts of `orchestrator.qemu.qmp.QmpSession` a dump needs."""

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any: ...

    def mark(self) -> int: ...

    def wait_event(
        self, name: str, predicate: Any = None, after: int = 0, timeout: float = ...
    ) -> Any: ...


@dataclass(frozen=True)
class DumpResult:
    """One finished dump: where, how big, how long, and QEMU's own status."""

    path: Path
    size: int
    seconds: float
    status: str  # DUMP_COMPLETED result.status: "completed" | "failed"
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size": self.size,
            "seconds": round(self.seconds, 3),
            "status": self.status,
            "error": self.error,
        }


def dump_guest_memory(qmp: DumpMonitor, path: Path, timeout: float = DUMP_TIMEOUT) -> DumpResult:
    """QMP `dump-guest-memory` (paging=false, detached) to `path`; waits for DUMP_COMPLETED.

    The guest is paused while QEMU writes and resumes by itself. Raises QmpError when
    QEMU refuses to start the dump; a dump that failed half-way returns status "failed".
    """
    mark = qmp.mark()
    started = now()
    qmp.execute(
        "dump-guest-memory",
        {"paging": False, "protocol": f"file:{path}", "detach": True},
    )
    event = qmp.wait_event("DUMP_COMPLETED", after=mark, timeout=timeout)
    seconds = now() - started
    result = event.data.get("result", {})
    size = path.stat().st_size if path.exists() else 0
    return DumpResult(path, size, seconds, str(result.get("status", "?")), event.data.get("error"))


@contextlib.contextmanager
def private_dump_dir(prefix: str = "cvmlab-dump-") -> Iterator[Path]:
    """A 0700 directory for a dump, deleted with everything in it on the way out."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        directory.chmod(0o700)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class DumpSearch:
    """A dump searched for a needle: the dump's facts and how often the needle occurred."""

    dump: DumpResult | None  # None: QEMU refused to dump
    found: int
    refused: str | None = None  # QEMU's reason when it refused

    def to_json(self) -> dict[str, Any]:
        return {
            "dump": self.dump.to_json() if self.dump else None,
            "found": self.found,
            "refused": self.refused,
        }


def search_dump(qmp: DumpMonitor, needle: bytes, timeout: float = DUMP_TIMEOUT) -> DumpSearch:
    """Dump guest memory into a private directory, count `needle` in it, delete the dump."""
    with private_dump_dir() as directory:
        path = directory / "guest.elf"
        try:
            dump = dump_guest_memory(qmp, path, timeout)
        except QmpError as error:
            return DumpSearch(None, 0, refused=error.problem)
        if dump.status != "completed":
            raise MemoryOpError(
                f"dump-guest-memory ended with status {dump.status}: {dump.error or 'no reason'}",
                "see qmp.jsonl and qemu.stderr",
            )
        return DumpSearch(dump, count_in_file(path, needle))


__all__ = [
    "DumpResult",
    "DumpSearch",
    "count_in_fd",
    "count_in_file",
    "count_in_process_memory",
    "data_segments",
    "dump_guest_memory",
    "new_secret",
    "private_dump_dir",
    "search_dump",
]
