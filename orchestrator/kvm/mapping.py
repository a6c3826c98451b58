"""A shared file mapping with a known address, released deterministically.

Used to touch guest_memfd memory from the host (faults, patterns, zero checks)
and to give memslots a `userspace_addr`. Reads and writes go through ctypes,
so a fault the kernel answers with SIGBUS kills the calling process: touch
memory that may be inaccessible only in a child process (see `child.py`).
"""

from __future__ import annotations

import ctypes
import mmap as _mmap_module
from types import TracebackType

from orchestrator.kvm import libc

PAGE_SIZE = _mmap_module.PAGESIZE


class Mapping:
    """`length` bytes of `fd` from `offset`, mapped shared (or as asked) until `close()`."""

    def __init__(
        self,
        fd: int,
        length: int,
        offset: int = 0,
        *,
        shared: bool = True,
        prot: int = _mmap_module.PROT_READ | _mmap_module.PROT_WRITE,
        flags: int = 0,
    ) -> None:
        flags |= _mmap_module.MAP_SHARED if shared else _mmap_module.MAP_PRIVATE
        self.length = length
        self.address = libc.mmap(length, prot, flags, fd, offset)
        self._closed = False

    @classmethod
    def anonymous(cls, length: int) -> Mapping:
        """Private anonymous memory, e.g. a `userspace_addr` for a memslot."""
        return cls(
            -1,
            length,
            shared=False,
            flags=_mmap_module.MAP_ANONYMOUS,
        )

    def _check(self, offset: int, size: int) -> None:
        if self._closed:
            raise ValueError("mapping is closed")
        if offset < 0 or size < 0 or offset + size > self.length:
            raise IndexError(f"[{offset}, {offset + size}) outside a mapping of {self.length}")

    def read(self, offset: int, size: int) -> bytes:
        """Copy `size` bytes at `offset` (faults them in)."""
        self._check(offset, size)
        return ctypes.string_at(self.address + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        """Copy `data` to `offset` (faults the pages in for writing)."""
        self._check(offset, len(data))
        ctypes.memmove(self.address + offset, data, len(data))

    def touch(self, offset: int) -> int:
        """Read one byte at `offset` of the mapping, which may lie past the end of the file.

        Past EOF, or on an inaccessible page, the kernel answers with SIGBUS: call
        this only in a child process.
        """
        self._check(offset, 1)
        return ctypes.c_uint8.from_address(self.address + offset).value

    def close(self) -> None:
        """Unmap; idempotent."""
        if not self._closed:
            self._closed = True
            libc.munmap(self.address, self.length)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Mapping:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
