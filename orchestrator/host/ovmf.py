"""What an OVMF/TDVF image says about itself: its GUIDed footer table, read without running it.

Why: every x86-64 OVMF since about 2022 carries both the TDX and the SEV markers in
its reset vector (edk2 OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm: the SEV metadata
offset, the SEV hashes block, the SEV-ES reset block; the TDX metadata offset), so the
presence of a GUID proves little. What decides a launch is the content behind them:

- SEV hashes block (GUID 7255371f-3a3b-4b04-927b-1da6efa8d454, data: u32 base, u32 size).
  edk2's AmdSev build (OvmfPkg/AmdSev/AmdSevX64.dsc) reserves a real area there and
  links BlobVerifierLibSevHashes, whose VerifyBlob() returns EFI_ACCESS_DENIED for a
  `-kernel` when no hashes table was installed ("Verifier called but no hashes table
  discoverd in MEMFD"): without `kernel-hashes=on` its guest never reaches the kernel.
  A generic build (OvmfPkgX64.dsc) publishes the block with base 0, size 0, and QEMU
  exits on `kernel-hashes=on` with "SEV: guest firmware hashes table area is invalid
  (base=0x0 size=0x0)" (target/i386/sev.c sev_add_kernel_loader_hashes: base must be
  non-zero and size >= sizeof(PaddedSevHashTable) = 176 bytes).
- SEV metadata (GUID dc886566-984a-4798-a75e-5585a7bf67cc, data: u32 offset from the
  end of the image) points at an "ASEV" descriptor (u32 length, u32 version, u32 count,
  then (u32 base, u32 size, u32 type) sections; OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm).
  QEMU needs it to pre-validate pages for SNP.
- TDX metadata (GUID e47a6535-984a-4798-865e-4685a7bf8ec2, data: u32 offset from the end)
  points at a "TDVF" descriptor (u32 length, u32 version, u32 count, then 32-byte sections:
  u32 data offset, u32 raw size, u64 memory address, u64 memory size, u32 type, u32
  attributes; QEMU hw/i386/tdvf.c). A section whose raw data lies outside the file (a split
  OVMF_CODE image, for instance) cannot be loaded with -bios.

Pure parsing of bytes; `read_firmware(path)` reads a file and never raises for a bad one.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TABLE_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
TDX_METADATA_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")
SEV_METADATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
SEV_HASH_TABLE_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
SEV_SECRET_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
SEV_ES_RESET_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")

# target/i386/sev.c: sizeof(PaddedSevHashTable) = ROUND_UP(18 + 3 * (16 + 2 + 32), 16).
PADDED_SEV_HASH_TABLE_BYTES = 176
# OvmfSevMetadata.asm section types.
SEV_SECTION_NAMES = {1: "SNP_SEC_MEM", 2: "SNP_SECRETS", 3: "CPUID", 4: "SVSM_CAA",
                     0x10: "KERNEL_HASHES"}  # fmt: skip
TAIL_BYTES = 64 * 1024  # the table and both metadata blocks live in the reset vector's last pages


@dataclass(frozen=True)
class FirmwareTable:
    """The footer table of one image and what its entries point at."""

    size: int  # bytes of the whole file
    entries: dict[uuid.UUID, bytes]  # GUID -> entry data
    hashes_area: tuple[int, int] | None = None  # (base, size) of the SEV hashes block
    sev_sections: tuple[tuple[int, int, int], ...] = ()  # (base, size, type) from "ASEV"
    tdvf_sections: tuple[tuple[int, int, int, int, int], ...] = ()  # (off, raw, addr, size, type)
    problems: tuple[str, ...] = field(default=())  # malformed metadata, sections out of file

    @property
    def guids(self) -> set[uuid.UUID]:
        return set(self.entries)

    @property
    def measured_direct_boot(self) -> bool:
        """The image reserves a real SEV hashes area: an AmdSev build that demands
        `kernel-hashes=on` for `-kernel` and accepts it."""
        if self.hashes_area is None:
            return False
        base, size = self.hashes_area
        return base != 0 and size >= PADDED_SEV_HASH_TABLE_BYTES

    @property
    def sev_snp_ready(self) -> bool:
        """An "ASEV" descriptor with sections: QEMU can pre-validate the pages SNP needs."""
        return bool(self.sev_sections)

    @property
    def tdvf_ready(self) -> bool:
        """A "TDVF" descriptor whose sections all lie inside this file."""
        return bool(self.tdvf_sections) and not any("TDVF" in p for p in self.problems)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the probe's evidence and the lab report."""
        area = self.hashes_area
        return {
            "size": self.size,
            "guids": sorted(str(g) for g in self.entries),
            "sev_hashes_area": None if area is None else {"base": hex(area[0]), "size": area[1]},
            "measured_direct_boot": self.measured_direct_boot,
            "sev_sections": [
                {"base": hex(b), "size": s, "type": SEV_SECTION_NAMES.get(t, hex(t))}
                for b, s, t in self.sev_sections
            ],
            "tdvf_sections": len(self.tdvf_sections),
            "problems": list(self.problems),
        }


def _u32(data: bytes, offset: int = 0) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def parse_table(tail: bytes, size: int) -> FirmwareTable | None:
    """The table from the last bytes of an image (`tail`, the file being `size` bytes).

    Layout (edk2 ResetVectorVtf0.asm, QEMU hw/i386/pc_sysfw_ovmf.c): the footer GUID
    ends 32 bytes before the end, preceded by the u16 total table length; each entry
    before it is data, u16 length (data + 18), GUID. None without a footer.
    """
    end = len(tail) - 32
    if end < 18 or uuid.UUID(bytes_le=tail[end - 16 : end]) != TABLE_FOOTER_GUID:
        return None
    (total,) = struct.unpack_from("<H", tail, end - 18)
    start = end - total
    if total < 18 or start < 0:
        return None
    entries: dict[uuid.UUID, bytes] = {}
    pos = end - 18  # the footer entry is not a table entry
    while pos - 18 >= start:
        guid = uuid.UUID(bytes_le=tail[pos - 16 : pos])
        (length,) = struct.unpack_from("<H", tail, pos - 18)
        if length < 18 or pos - length < start:
            break
        entries[guid] = tail[pos - length : pos - 18]
        pos -= length
    problems: list[str] = []
    hashes = entries.get(SEV_HASH_TABLE_GUID)
    area = (_u32(hashes), _u32(hashes, 4)) if hashes is not None and len(hashes) >= 8 else None
    sev = _sev_sections(tail, size, entries.get(SEV_METADATA_GUID), problems)
    tdvf = _tdvf_sections(tail, size, entries.get(TDX_METADATA_OFFSET_GUID), problems)
    return FirmwareTable(size, entries, area, sev, tdvf, tuple(problems))


def _descriptor(
    tail: bytes, size: int, offset_entry: bytes | None, signature: bytes, problems: list[str]
) -> tuple[int, bytes] | None:
    """(count, bytes after the 16-byte header) of the descriptor an offset entry names."""
    if offset_entry is None or len(offset_entry) < 4:
        return None
    offset = _u32(offset_entry)
    at = len(tail) - offset  # the offset counts back from the end of the image
    name = signature.decode()
    if offset > size or at < 0 or at + 16 > len(tail):
        problems.append(f"{name} metadata offset {offset:#x} points outside the image's tail")
        return None
    if tail[at : at + 4] != signature:
        problems.append(f"{name} metadata at {offset:#x} from the end has no {name} signature")
        return None
    length, _version, count = struct.unpack_from("<III", tail, at + 4)
    return count, tail[at + 16 : at + max(length, 16)]


def _records(
    tail: bytes,
    size: int,
    entry: bytes | None,
    signature: bytes,
    layout: str,
    problems: list[str],
) -> list[tuple[int, ...]]:
    """The fixed-size section records of the descriptor an offset entry names."""
    found = _descriptor(tail, size, entry, signature, problems)
    if found is None:
        return []
    count, body = found
    width = struct.calcsize(layout)
    if len(body) < width * count:
        name = signature.decode()
        problems.append(
            f"{name} metadata announces {count} sections but holds {len(body) // width}"
        )
        count = len(body) // width
    return [struct.unpack_from(layout, body, width * i) for i in range(count)]


def _sev_sections(
    tail: bytes, size: int, entry: bytes | None, problems: list[str]
) -> tuple[tuple[int, int, int], ...]:
    records = _records(tail, size, entry, b"ASEV", "<III", problems)
    return tuple((base, length, kind) for base, length, kind in records)


def _tdvf_sections(
    tail: bytes, size: int, entry: bytes | None, problems: list[str]
) -> tuple[tuple[int, int, int, int, int], ...]:
    sections = []
    for i, fields in enumerate(_records(tail, size, entry, b"TDVF", "<IIQQII", problems)):
        data_offset, raw, address, memory, kind = fields[:5]
        if data_offset + raw > size:
            problems.append(
                f"TDVF section {i} (type {kind}) holds bytes {data_offset:#x}+{raw:#x}, beyond "
                f"the file's {size:#x}: not a whole -bios image (a split OVMF_CODE?)"
            )
        sections.append((data_offset, raw, address, memory, kind))
    return tuple(sections)


def read_firmware(path: Path) -> FirmwareTable | None:
    """The table of the image at `path`; None when unreadable or without a footer table."""
    try:
        with path.open("rb") as image:
            size = image.seek(0, os.SEEK_END)
            if size < 50:
                return None
            tail_len = min(size, TAIL_BYTES)
            image.seek(size - tail_len)
            tail = image.read(tail_len)
    except OSError:
        return None
    return parse_table(tail, size)


# --- building images (tests and lab rehearsal fixtures describe firmware with these) -----------


def table_entry(guid: uuid.UUID, data: bytes) -> bytes:
    """One table entry as the reset vector lays it out: data, u16 length, GUID."""
    return data + struct.pack("<H", len(data) + 18) + guid.bytes_le


def build_image(
    entries: list[tuple[uuid.UUID, bytes]],
    size: int = 16 * 1024,
    blobs: dict[int, bytes] | None = None,
) -> bytes:
    """An image of `size` bytes whose footer table holds `entries`; `blobs` puts bytes at
    offsets counted back from the end of the image (where metadata offsets point)."""
    table = b"".join(table_entry(g, d) for g, d in entries)
    table += struct.pack("<H", len(table) + 18) + TABLE_FOOTER_GUID.bytes_le
    image = bytearray(b"\xff" * (size - 32 - len(table)) + table + b"\0" * 32)
    for back, blob in (blobs or {}).items():
        image[size - back : size - back + len(blob)] = blob
    return bytes(image)


def sev_metadata(sections: list[tuple[int, int, int]]) -> bytes:
    """An "ASEV" descriptor (OvmfSevMetadata.asm layout)."""
    body = b"".join(struct.pack("<III", *s) for s in sections)
    return b"ASEV" + struct.pack("<III", 16 + len(body), 1, len(sections)) + body


def tdvf_metadata(sections: list[tuple[int, int, int, int, int]]) -> bytes:
    """A "TDVF" descriptor (QEMU hw/i386/tdvf.c layout; attributes 0)."""
    body = b"".join(struct.pack("<IIQQII", *s, 0) for s in sections)
    return b"TDVF" + struct.pack("<III", 16 + len(body), 1, len(sections)) + body


def ovmf_like(
    *,
    hashes_area: tuple[int, int] = (0, 0),
    sev: bool = True,
    tdx: bool = True,
    size: int = 16 * 1024,
    tdvf_beyond_file: bool = False,
) -> bytes:
    """An image shaped like an x86-64 OVMF: both markers, the hashes block with `hashes_area`
    ((0, 0) = generic OvmfPkgX64; a real area = AmdSevX64), SEV and TDVF metadata."""
    entries: list[tuple[uuid.UUID, bytes]] = []
    blobs: dict[int, bytes] = {}
    if tdx:
        blobs[0x1000] = tdvf_metadata(
            [(0, size // 2, 0xFFC00000, size // 2, 0),
             (0 if not tdvf_beyond_file else size * 4, 0x1000, 0x800000, 0x1000, 1)]
        )  # fmt: skip
        entries.append((TDX_METADATA_OFFSET_GUID, struct.pack("<I", 0x1000)))
    if sev:
        blobs[0x800] = sev_metadata([(0x800000, 0x9000, 1), (0x809000, 0x1000, 2),
                                     (0x80A000, 0x1000, 3)])  # fmt: skip
        entries.append((SEV_METADATA_GUID, struct.pack("<I", 0x800)))
    entries.append((SEV_HASH_TABLE_GUID, struct.pack("<II", *hashes_area)))
    entries.append((SEV_SECRET_GUID, struct.pack("<II", 0x80B000, 0x1000)))
    entries.append((SEV_ES_RESET_GUID, struct.pack("<I", 0xF000B000)))
    return build_image(entries, size, blobs)


AMDSEV_HASHES_AREA = (0x80C000, 0x400)  # AmdSevX64.fdf reserves a page-sized area (example)
