"""The little of ELF64 the image layer reads: the header's machine and the program headers.

Shared by the static-binary check (no PT_INTERP) and the PVH entry (a PT_NOTE segment).
Offsets are the System V gABI's for ELFCLASS64, little-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

PT_INTERP = 3
PT_NOTE = 4
EM_X86_64 = 62
_PHDR_SIZE = 56


@dataclass(frozen=True)
class ProgramHeader:
    p_type: int
    offset: int
    filesz: int


def is_elf64_le(data: bytes) -> bool:
    return len(data) >= 64 and data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1


def machine(data: bytes) -> int:
    """e_machine of an ELF64 (check is_elf64_le first)."""
    (value,) = struct.unpack_from("<H", data, 18)
    return int(value)


class CutOff(ValueError):
    """The program header table runs past the end of the data."""


def program_headers(data: bytes) -> Iterator[ProgramHeader]:
    """The program headers of an ELF64 (check is_elf64_le first); CutOff at a cut-off table."""
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        start = phoff + index * phentsize
        if start + _PHDR_SIZE > len(data):
            raise CutOff(f"program header {index} of {phnum} lies past the end")
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", data, start)
        yield ProgramHeader(p_type, offset, filesz)
