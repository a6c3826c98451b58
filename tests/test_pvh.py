"""The PVH entry: a bzImage's ELF kernel, found, unpacked, checked and cached; and who gets it.

Synthetic bzImages (a boot header around a payload in each format kbuild writes) check
the parsing and every refusal; the default image's real kernel is checked against
`readelf -n`, an independent reader of the same ELF notes.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from orchestrator.image import ImageManifest
from orchestrator.image.pvh import (
    ENV,
    XEN_ELFNOTE_PHYS32_ENTRY,
    KernelEntry,
    NotExtractable,
    extract_vmlinux,
    has_pvh_entry,
    kernel_entry,
)
from orchestrator.machine_scenario import direct_entry
from orchestrator.qemu.spec import Firmware, KernelBoot, MachineSpec, SnpGuest


def _note(name: bytes, note_type: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), note_type) + pad(name + b"\0") + pad(desc)


def _elf(notes: bytes, machine: int = 62) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding `notes`."""
    header_size, phentsize = 64, 56
    note_offset = header_size + phentsize
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, header_size, 0, 0, header_size,
                          phentsize, 1, 0, 0, 0)  # fmt: skip
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_offset, 0, 0, len(notes), len(notes), 4)
    return header + phdr + notes


PVH_ELF = _elf(_note(b"Xen", 6, b"linux\0") + _note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, b"\0" * 4))


def _bzimage(payload: bytes, *, version: int = 0x20F, setup_sects: int = 1) -> bytes:
    """A bzImage as the boot protocol lays it out: setup sectors, then the payload
    `payload_offset` bytes into the protected-mode part (Documentation/arch/x86/boot.rst)."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    offset = 0x40
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\0" * offset + payload + b"\0" * 16


def _with_size(compressed: bytes, raw: bytes) -> bytes:
    """kbuild's *_with_size: the unpacked size appended (le32)."""
    return compressed + struct.pack("<I", len(raw))


FORMATS = {
    "gzip": lambda raw: gzip.compress(raw),
    "xz": lambda raw: _with_size(lzma.compress(raw, format=lzma.FORMAT_XZ), raw),
    "lzma": lambda raw: _with_size(lzma.compress(raw, format=lzma.FORMAT_ALONE), raw),
    "bzip2": lambda raw: _with_size(bz2.compress(raw), raw),
}


def _zstd(raw: bytes) -> bytes:
    done = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True)
    return _with_size(done.stdout, raw)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_kbuild_format_unpacks_to_the_elf_it_packed(tmp_path: Path, fmt: str) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(_bzimage(FORMATS[fmt](PVH_ELF)))
    assert extract_vmlinux(image) == PVH_ELF


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")
def test_zstd_payload_unpacks_through_the_zstd_tool(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(_bzimage(_zstd(PVH_ELF)))
    assert extract_vmlinux(image) == PVH_ELF


def test_setup_sects_zero_means_four(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    data = bytearray(_bzimage(gzip.compress(PVH_ELF), setup_sects=4))
    data[0x1F1] = 0
    image.write_bytes(bytes(data))
    assert extract_vmlinux(image) == PVH_ELF


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x7fELF" + b"\0" * 1024, "not a bzImage"),
        (_bzimage(gzip.compress(PVH_ELF), version=0x207), "boot protocol 2.7"),
        (_bzimage(b"\x04\x22\x4d\x18" + b"\0" * 64), "unsupported kernel compression"),
        (_bzimage(gzip.compress(PVH_ELF)[:40]), "does not unpack"),
        (_bzimage(gzip.compress(_elf(_note(b"Xen", 17, b"\0" * 4)))), "no PVH entry note"),
        (_bzimage(gzip.compress(_elf(_note(b"Xen", 18, b"\0" * 4), machine=3))), "no PVH entry"),
    ],
)
def test_what_cannot_be_entered_directly_says_why(tmp_path: Path, data: bytes, why: str) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(data)
    with pytest.raises(NotExtractable, match=why):
        extract_vmlinux(image)


def test_payload_outside_the_file_is_refused(tmp_path: Path) -> None:
    data = bytearray(_bzimage(gzip.compress(PVH_ELF)))
    struct.pack_into("<I", data, 0x24C, len(data))
    image = tmp_path / "vmlinuz"
    image.write_bytes(bytes(data))
    with pytest.raises(NotExtractable, match="outside the file"):
        extract_vmlinux(image)


def test_pvh_note_is_found_only_under_its_owner_and_type() -> None:
    assert has_pvh_entry(PVH_ELF)
    assert not has_pvh_entry(_elf(_note(b"Xen", 17, b"\0" * 4)))
    assert not has_pvh_entry(_elf(_note(b"GNU", XEN_ELFNOTE_PHYS32_ENTRY, b"\0" * 4)))
    assert not has_pvh_entry(b"not an elf")


def test_entry_is_unpacked_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(_bzimage(gzip.compress(PVH_ELF)))
    first = kernel_entry(image, tmp_path / "cache")
    assert first.pvh and first.path.read_bytes() == PVH_ELF
    assert first.path.parent.stat().st_mode & 0o777 == 0o700

    def unpack_again(_path: Path) -> bytes:
        raise AssertionError("unpacked again")

    monkeypatch.setattr("orchestrator.image.pvh.extract_vmlinux", unpack_again)
    assert kernel_entry(image, tmp_path / "cache") == first
    # A rebuilt kernel (new mtime) is a new key: the old ELF is never booted for it.
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="unpacked again"):
        kernel_entry(image, tmp_path / "cache")


def test_unusable_kernel_boots_as_bzimage_with_the_reason(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(_bzimage(gzip.compress(_elf(b""))))
    entry = kernel_entry(image, tmp_path / "cache")
    assert entry == KernelEntry(image, False, entry.reason)
    assert "no PVH entry note" in entry.reason
    assert not (tmp_path / "cache" / "pvh").exists() or not any((tmp_path / "cache/pvh").iterdir())


def test_environment_turns_the_pvh_entry_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(_bzimage(gzip.compress(PVH_ELF)))
    monkeypatch.setenv(ENV, "bzimage")
    entry = kernel_entry(image, tmp_path / "cache")
    assert (entry.path, entry.pvh) == (image, False) and ENV in entry.reason


def test_default_image_kernel_has_the_note_readelf_sees(
    guest_image: ImageManifest, tmp_path: Path
) -> None:
    """Our parser against binutils' on the real kernel: both find Xen's PHYS32_ENTRY."""
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    entry = kernel_entry(guest_image.kernel, tmp_path)
    assert entry.pvh, entry.reason
    notes = subprocess.run(["readelf", "-n", str(entry.path)], capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    xen = [line for line in notes.splitlines() if line.strip().startswith("Xen")]
    assert any("0x00000012" in line or "PHYS32_ENTRY" in line for line in xen), notes


# --- who is entered directly (orchestrator.machine_scenario.direct_entry) ----------------------

KERNEL = Path("/images/minimal/vmlinuz")
ELF = KernelEntry(Path("/cache/pvh/k.vmlinux"), True, "PVH entry")


def _spec(**boot: object) -> MachineSpec:
    return MachineSpec(boot=KernelBoot(**{"kernel": str(KERNEL), "initrd": "/i", **boot}))  # type: ignore[arg-type]


def test_plain_guest_of_the_image_enters_its_elf_kernel() -> None:
    spec, entry = direct_entry(_spec(), KERNEL, lambda _k: ELF)
    assert entry == ELF
    assert isinstance(spec.boot, KernelBoot) and spec.boot.kernel == str(ELF.path)
    assert spec.boot.initrd == "/i"


def test_plain_guest_keeps_the_bzimage_when_it_cannot_be_entered_directly() -> None:
    refused = KernelEntry(KERNEL, False, "bzImage boot: no PVH entry note")
    spec, entry = direct_entry(_spec(), KERNEL, lambda _k: refused)
    assert entry == refused and spec == _spec()


def test_confidential_guest_boots_the_bzimage() -> None:
    snp = MachineSpec(boot=KernelBoot(kernel=str(KERNEL)), confidential=SnpGuest())
    spec, entry = direct_entry(snp, KERNEL, lambda _k: ELF)
    assert spec == snp
    assert entry is not None and not entry.pvh and "confidential" in entry.reason


def test_firmware_boot_boots_the_bzimage() -> None:
    fw = _spec(firmware=Firmware("/fw.bin"))
    spec, entry = direct_entry(fw, KERNEL, lambda _k: ELF)
    assert spec == fw and entry is not None and not entry.pvh


def test_kernel_given_by_the_user_is_booted_as_given() -> None:
    own = MachineSpec(boot=KernelBoot(kernel="/home/dev/linux/arch/x86/boot/bzImage"))
    assert direct_entry(own, KERNEL, lambda _k: ELF) == (own, None)
