"""The few libc calls Python's standard library lacks, raising OSError like `os` does.

- `fallocate(2)` with a mode: `os.posix_fallocate` has no mode, and guest_memfd
  needs `FALLOC_FL_KEEP_SIZE` and `FALLOC_FL_PUNCH_HOLE`.
- `mmap(2)`/`munmap(2)` by raw address: the `mmap` module refuses mappings past
  the end of a regular file and hides the address, which memslots need.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

_mmap = _libc.mmap
_mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
)
_mmap.restype = ctypes.c_void_p

_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munmap.restype = ctypes.c_int

MAP_FAILED = ctypes.c_void_p(-1).value


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """`fallocate(fd, mode, offset, length)`; OSError with the kernel's errno on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        _raise_errno(f"fallocate(fd={fd}, mode={mode:#x}, offset={offset}, len={length})")


def mmap(length: int, prot: int, flags: int, fd: int, offset: int = 0) -> int:
    """Map `length` bytes of `fd` at a kernel-chosen address and return the address."""
    address = _mmap(None, length, prot, flags, fd, offset)
    if address is None or address == MAP_FAILED:
        _raise_errno(f"mmap(len={length}, prot={prot:#x}, flags={flags:#x}, fd={fd})")
    assert address is not None
    return int(address)


def munmap(address: int, length: int) -> None:
    """Unmap `[address, address + length)`."""
    if _munmap(address, length) != 0:
        _raise_errno(f"munmap({address:#x}, {length})")
