"""Physical frame numbers behind virtual pages of any process, from /proc/<pid>/pagemap.

Used to show that guest_memfd pages are unmovable (H6): the same PFNs before
and after compaction. Each virtual page has a 64-bit entry
(Documentation/admin-guide/mm/pagemap.rst): bit 63 "present", bits 0-54 the
PFN. Without CAP_SYS_ADMIN the kernel reports PFN 0, so `pfns` needs root.
"""

from __future__ import annotations

import mmap
import os
import struct

PAGE_SIZE = mmap.PAGESIZE
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1


def decode_entry(entry: int) -> int | None:
    """The PFN of one pagemap entry, or None if the page is not present in RAM."""
    return entry & _PFN_MASK if entry & _PRESENT else None


def pfns(
    address: int, npages: int, pid: int | str = "self", proc: str = "/proc"
) -> list[int | None]:
    """PFN (or None when not present) of each of the `npages` pages from `address`."""
    if address % PAGE_SIZE:
        raise ValueError(f"address {address:#x} is not page aligned")
    fd = os.open(f"{proc}/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, 8 * npages, (address // PAGE_SIZE) * 8)
    finally:
        os.close(fd)
    return [decode_entry(entry) for entry in struct.unpack(f"<{len(raw) // 8}Q", raw)]
