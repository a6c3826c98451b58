"""A bzImage's kernel as the ELF `vmlinux` QEMU enters directly (PVH), to skip its decompression.

Why: a direct `-kernel vmlinuz` boot runs SeaBIOS's linuxboot ROM, the kernel's real-mode
setup and then its decompressor, all emulated under TCG: about 2.2 s of every cold boot
of the default image (6.12, zstd, 57 MB unpacked) on this 2-core machine, 8.4-8.9 s ->
6.2-6.8 s to the readiness marker. QEMU (>= 4.0) loads an uncompressed ELF kernel that
carries the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, `CONFIG_PVH=y`, as in
Debian's kernels) straight into guest memory and starts it at that entry with the same
command line, initrd and memory map. The kernel and everything after its entry are the
same; only the bzImage's own boot path (setup code and decompressor) is not run.

The payload is found from the boot protocol's header (Documentation/arch/x86/boot.rst:
`payload_offset` and `payload_length`, protocol >= 2.08), decompressed by its format's
magic, checked to be an x86-64 ELF with the PVH note, and cached as
`<cache>/pvh/<key>.vmlinux`, keyed by the bzImage's resolved path, size and mtime (not
its content: hashing 11 MB per test costs seconds under TCG in the lab; the cache is
shared with the lab over 9p, which keeps paths, sizes and mtimes). Anything unusual is
not an error: the caller boots the bzImage as before and records why.

`CVMLAB_BOOT_ENTRY=bzimage` turns this off (to test a kernel's own boot path).
Confidential guests never use it: their firmware boots the bzImage's EFI stub.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.image import elf

ENV = "CVMLAB_BOOT_ENTRY"
#: The ELF note QEMU looks for (Xen's public elfnote.h): the 32-bit PVH entry point.
XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclass(frozen=True)
class KernelEntry:
    """How a guest kernel is entered: `path` is what `-kernel` gets, `pvh` whether that
    is the extracted ELF (else the bzImage itself), `reason` why, for the evidence."""

    path: Path
    pvh: bool
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"kernel": str(self.path), "entry": "pvh" if self.pvh else "bzimage",
                "reason": self.reason}  # fmt: skip


class NotExtractable(Exception):
    """Why a bzImage's kernel cannot be entered through PVH (the bzImage boots instead)."""


def _payload(image: bytes) -> bytes:
    """The compressed kernel inside a bzImage, located by its boot protocol header."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise NotExtractable("not a bzImage (no HdrS boot header)")
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise NotExtractable(f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(image):
        raise NotExtractable("the header's payload lies outside the file")
    return image[start : start + length]


def _unzstd(payload: bytes) -> bytes:
    zstd = shutil.which("zstd")
    if zstd is None:
        raise NotExtractable("the kernel is zstd-compressed and `zstd` is not installed")
    # kbuild appends the unpacked size (4 bytes) after the zstd frame.
    done = subprocess.run(
        [zstd, "-d", "-c", "-q"], input=payload[:-4], capture_output=True, check=False
    )
    if done.returncode != 0:
        raise NotExtractable(f"zstd could not unpack the kernel: {done.stderr.decode().strip()}")
    return done.stdout


def _decompress(payload: bytes) -> bytes:
    """The unpacked kernel, by the payload's magic (kbuild's formats but lzo and lz4)."""
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        return _unzstd(payload)
    decompressor: Any
    if payload.startswith(b"\x1f\x8b"):
        decompressor = zlib.decompressobj(wbits=31)
    elif payload.startswith(b"\xfd7zXZ\x00"):
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elif payload.startswith(b"\x5d\x00\x00"):
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    elif payload.startswith(b"BZh"):
        decompressor = bz2.BZ2Decompressor()
    else:
        raise NotExtractable(f"unsupported kernel compression (magic {payload[:4].hex()})")
    try:
        unpacked: bytes = decompressor.decompress(payload)
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as err:
        raise NotExtractable(f"the kernel's payload does not unpack: {err}") from None
    # A stream that stops before its end marker unpacks without an error: a cut-off file.
    if not decompressor.eof:
        raise NotExtractable("the kernel's payload does not unpack: the stream is cut short")
    return unpacked


def has_pvh_entry(data: bytes) -> bool:
    """Whether `data` is an x86-64 ELF with Xen's PHYS32_ENTRY note in a PT_NOTE segment."""
    if not elf.is_elf64_le(data) or elf.machine(data) != elf.EM_X86_64:
        return False
    try:
        notes = [h for h in elf.program_headers(data) if h.p_type == elf.PT_NOTE]
    except elf.CutOff:
        return False
    for header in notes:
        cursor, end = header.offset, min(header.offset + header.filesz, len(data))
        while cursor + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", data, cursor)
            name = data[cursor + 12 : cursor + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            cursor += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(vmlinuz: Path) -> bytes:
    """The ELF kernel inside `vmlinuz`, checked for the PVH entry; NotExtractable if not."""
    unpacked = _decompress(_payload(vmlinuz.read_bytes()))
    if not has_pvh_entry(unpacked):
        raise NotExtractable("the unpacked kernel has no PVH entry note (CONFIG_PVH is off)")
    return unpacked


def _cache_key(vmlinuz: Path) -> str:
    stat = vmlinuz.stat()
    identity = f"{vmlinuz.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def kernel_entry(vmlinuz: Path, cache: Path | None = None) -> KernelEntry:
    """How to boot `vmlinuz`: its PVH ELF (unpacked once into `cache`/pvh; by default
    cvmlab's cache, shared with the lab) or the bzImage itself, with the reason either
    way."""
    if cache is None:
        from orchestrator.image.builder import cache_root

        cache = cache_root()
    if os.environ.get(ENV, "").strip().lower() == "bzimage":
        return KernelEntry(vmlinuz, False, f"{ENV}=bzimage")
    try:
        target = cache / "pvh" / f"{_cache_key(vmlinuz)}.vmlinux"
    except OSError as err:
        return KernelEntry(vmlinuz, False, f"cannot read {vmlinuz}: {err.strerror}")
    reason = f"PVH entry of the ELF kernel unpacked from {vmlinuz.name}"
    if target.is_file():
        return KernelEntry(target, True, reason)
    try:
        elf = extract_vmlinux(vmlinuz)
    except NotExtractable as why:
        return KernelEntry(vmlinuz, False, f"bzImage boot: {why}")
    except OSError as err:
        return KernelEntry(vmlinuz, False, f"bzImage boot: cannot read {vmlinuz}: {err.strerror}")
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Parallel tests may unpack the same kernel: each writes its own temp file
        # and renames it into place, so a reader never sees a partial one.
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".unpacking-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(elf)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as err:
        return KernelEntry(vmlinuz, False, f"bzImage boot: cannot cache the ELF kernel: {err}")
    return KernelEntry(target, True, reason)

