"""The GPA -> backend offset map (orchestrator.memory.layout), pure logic.

The HMP texts below are verbatim output of QEMU 10.0.2 on the development machine:
`-machine q35,memory-backend=ram0 -m 3G -object memory-backend-memfd,id=ram0,size=3G`
(and a 512M machine with a 1G virtio-mem memfd), started with -S -nodefaults.
tests/test_host_punch.py checks the same map against a live QEMU.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import MemoryOpError
from orchestrator.memory.host_punch import parse_maps
from orchestrator.memory.layout import (
    BackingRange,
    GuestMemoryMap,
    Memdev,
    RamRange,
    build_map,
    flatview_problems,
    memory_device_ranges,
    parse_flatview,
    parse_ramblocks,
    pc_ram_ranges,
    q35_ram_split,
)
from orchestrator.units import GiB, MiB

RAMBLOCK_3G = """\
              Block Name    PSize              Offset               Used              Total                HVA  RO
                    ram0    4 KiB  0x0000000000000000 0x00000000c0000000 0x00000000c0000000 0x00007fcf7ffff000  rw
    /rom@etc/acpi/tables    4 KiB  0x00000000c0080000 0x0000000000020000 0x0000000000200000 0x00007fd086000000  ro
                 pc.bios    4 KiB  0x00000000c0000000 0x0000000000040000 0x0000000000040000 0x00007fd086600000  ro
"""  # noqa: E501 - verbatim QEMU output

RAMBLOCK_VMEM = """\
              Block Name    PSize              Offset               Used              Total                HVA  RO
      0000:00:01.0/vmem0    2 MiB  0x0000000020000000 0x0000000040000000 0x0000000040000000 0x00007f6fefffe000  rw
                    ram0    4 KiB  0x0000000000000000 0x0000000020000000 0x0000000020000000 0x00007f702ffff000  rw
"""  # noqa: E501 - verbatim QEMU output

MTREE_3G = """\
FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): ram0
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  0000000000100000-000000007fffffff (prio 0, ram): ram0 @0000000000100000
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fed00000-00000000fed003ff (prio 0, i/o): hpet
  00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): ram0 @0000000080000000

FlatView #2
 AS "cpu-smm-0", root: memory
 Root memory region: memory
  0000000000000000-00000000000bffff (prio 0, ram): ram0
"""

MAPS = """\
7f6fefffe000-7f702fffe000 rw-s 00000000 00:01 35                         /memfd:memory-backend-memfd (deleted)
7f7717fff000-7f7737fff000 rw-s 00001000 00:1b 50                         /dev/shm/qemu_back_mem.ram0.SGuyK0 (deleted)
7f7050000000-7f708ffff000 rwxp 00000000 00:00 0 
"""  # noqa: E501, W291 - verbatim; maps lines of anonymous mappings end in a space


def memfd(memdev_id: str, size: int, page_size: int = 4096) -> Memdev:
    return Memdev(memdev_id, "memory-backend-memfd", size, page_size, share=True)


def q35_map(size: int, page_size: int = 4096) -> GuestMemoryMap:
    below, above = q35_ram_split(size)
    return build_map("ram0", below, above, [memfd("ram0", size, page_size)])


# --- QEMU's rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "below", "above"),
    [
        (512 * MiB, 512 * MiB, 0),
        (2815 * MiB, 2815 * MiB, 0),  # just under 2.75 GiB: all of it below 4 GiB
        (2816 * MiB, 2 * GiB, 768 * MiB),  # 0xb0000000: the 2 GiB split starts here
        (3 * GiB, 2 * GiB, 1 * GiB),
        (8 * GiB, 2 * GiB, 6 * GiB),
    ],
)
def test_q35_splits_ram_at_2g_from_2_75g_on(size: int, below: int, above: int) -> None:
    assert q35_ram_split(size) == (below, above)


def test_max_ram_below_4g_caps_the_low_part() -> None:
    assert q35_ram_split(2 * GiB, max_ram_below_4g=1 * GiB) == (1 * GiB, 1 * GiB)


def test_machine_ram_skips_the_legacy_window_and_resumes_at_4g() -> None:
    assert pc_ram_ranges("ram0", 2 * GiB, 1 * GiB) == [
        RamRange(0, 0xA0000, "ram0", 0),
        RamRange(0x100000, 2 * GiB - 0x100000, "ram0", 0x100000),
        RamRange(4 * GiB, 1 * GiB, "ram0", 2 * GiB),
    ]


def test_virtio_mem_maps_its_whole_memdev_at_memaddr() -> None:
    devices = [
        {
            "type": "virtio-mem",
            "data": {"memdev": "/objects/vmem0", "memaddr": 4 * GiB, "max-size": 1 * GiB,
                     "size": 0, "requested-size": 128 * MiB, "block-size": 2 * MiB},
        }
    ]  # fmt: skip
    assert memory_device_ranges(devices) == [RamRange(4 * GiB, 1 * GiB, "vmem0", 0)]


# --- locate -----------------------------------------------------------------------------


def test_low_gpas_map_to_the_same_offset() -> None:
    assert q35_map(3 * GiB).locate(0x200000, 0x3000) == [
        BackingRange(0x200000, 0x3000, "ram0", 0x200000)
    ]


def test_gpas_above_4g_map_past_the_low_part() -> None:
    assert q35_map(3 * GiB).locate(4 * GiB + 0x5000, 0x1000) == [
        BackingRange(4 * GiB + 0x5000, 0x1000, "ram0", 2 * GiB + 0x5000)
    ]


def test_a_small_guest_has_everything_below_4g() -> None:
    memory_map = q35_map(2815 * MiB)
    assert memory_map.locate(2815 * MiB - 0x1000, 0x1000)[0].offset == 2815 * MiB - 0x1000
    with pytest.raises(MemoryOpError, match="outside"):
        memory_map.locate(4 * GiB, 0x1000)


@pytest.mark.parametrize(
    ("gpa", "length", "complaint"),
    [
        (3 * GiB, 0x1000, "outside"),  # the PCI hole
        (5 * GiB, 0x1000, "outside"),  # past the end of RAM
        (2 * GiB - 0x1000, 0x2000, "crosses a hole"),  # into the PCI hole
        (0x9F000, 0x2000, "crosses a hole"),  # into the legacy VGA/ROM window
        (0x200800, 0x1000, "not aligned"),
        (0x200000, 0x800, "not aligned"),
        (0x200000, 0, "empty"),
        (-0x1000, 0x1000, "negative"),
    ],
)
def test_bad_ranges_are_refused_with_the_reason(gpa: int, length: int, complaint: str) -> None:
    with pytest.raises(MemoryOpError, match=complaint):
        q35_map(3 * GiB).locate(gpa, length)


def test_hugetlb_backends_need_huge_page_alignment() -> None:
    memory_map = q35_map(1 * GiB, page_size=2 * MiB)
    assert memory_map.locate(2 * MiB, 2 * MiB)[0].offset == 2 * MiB
    with pytest.raises(MemoryOpError, match="2M pages"):
        memory_map.locate(2 * MiB + 0x1000, 0x1000)


def test_a_range_over_two_adjacent_backends_splits_into_two_pieces() -> None:
    memory_map = GuestMemoryMap(
        (RamRange(0, 0x10000, "a", 0), RamRange(0x10000, 0x10000, "b", 0x4000)),
        (memfd("a", 0x10000), memfd("b", 0x20000)),
        "a",
    )
    assert memory_map.locate(0xF000, 0x2000) == [
        BackingRange(0xF000, 0x1000, "a", 0xF000),
        BackingRange(0x10000, 0x1000, "b", 0x4000),
    ]


def test_overlapping_ranges_are_an_inconsistency() -> None:
    with pytest.raises(MemoryOpError, match="overlap"):
        GuestMemoryMap(
            (RamRange(0, 0x2000, "a", 0), RamRange(0x1000, 0x1000, "a", 0)), (memfd("a", 1),), "a"
        )


def test_ram_of_an_unknown_backend_is_an_inconsistency() -> None:
    with pytest.raises(MemoryOpError, match="query-memdev"):
        build_map("ram9", 1 * GiB, 0, [memfd("ram0", 1 * GiB)])


@given(page=st.integers(min_value=0, max_value=(3 * GiB) // 4096 - 1))
def test_gpa_of_inverts_locate_for_every_backing_page(page: int) -> None:
    memory_map = q35_map(3 * GiB)
    offset = page * 4096
    if 0xA0000 <= offset < 0x100000:
        with pytest.raises(MemoryOpError):
            memory_map.gpa_of("ram0", offset)
        return
    gpa = memory_map.gpa_of("ram0", offset)
    assert memory_map.locate(gpa, 4096) == [BackingRange(gpa, 4096, "ram0", offset)]


# --- HMP parsing and the FlatView cross-check -------------------------------------------


def test_info_ramblock_rows_are_parsed_with_page_size_and_hva() -> None:
    blocks = parse_ramblocks(RAMBLOCK_3G)
    assert [b.name for b in blocks] == ["ram0", "/rom@etc/acpi/tables", "pc.bios"]
    assert (blocks[0].page_size, blocks[0].used, blocks[0].hva) == (4096, 3 * GiB, 0x7FCF7FFFF000)
    assert blocks[2].readonly and not blocks[0].readonly


def test_a_virtio_mem_ramblock_belongs_to_its_memdev() -> None:
    vmem = parse_ramblocks(RAMBLOCK_VMEM)[0]
    assert vmem.page_size == 2 * MiB
    assert vmem.is_memdev("vmem0") and not vmem.is_memdev("mem0")


def test_the_memory_flatview_is_parsed_with_offsets() -> None:
    flat = parse_flatview(MTREE_3G)
    rams = [(f.gpa, f.size, f.region, f.offset) for f in flat if f.kind == "ram"]
    assert rams == [
        (0, 0xC0000, "ram0", 0),
        (0x100000, 2 * GiB - 0x100000, "ram0", 0x100000),
        (4 * GiB, 1 * GiB, "ram0", 2 * GiB),
    ]
    assert len(flat) == 9  # only FlatView #1, not the SMM view after it


def test_the_3g_map_agrees_with_qemus_flatview() -> None:
    assert flatview_problems(q35_map(3 * GiB), parse_flatview(MTREE_3G)) == []


def test_a_wrong_split_disagrees_with_qemus_flatview() -> None:
    wrong = build_map("ram0", 0xB0000000, 3 * GiB - 0xB0000000, [memfd("ram0", 3 * GiB)])
    assert flatview_problems(wrong, parse_flatview(MTREE_3G))


def test_proc_maps_lines_give_device_inode_and_file_offset() -> None:
    maps = parse_maps(MAPS)
    assert (maps[1].dev, maps[1].inode, maps[1].offset) == (0x1B, 50, 0x1000)
    assert maps[0].path == "/memfd:memory-backend-memfd (deleted)"
    assert maps[2].inode == 0 and maps[2].path == ""


# `info mtree -f` of a 512 MiB hugetlb memfd guest under KVM (the 7.3 lab, QEMU 10.0.2):
# KVM marks the regions it maps, and the first and last bytes are no 2 MiB-aligned range.
MTREE_KVM_HUGETLB = """\
FlatView #2
 AS "memory", root: system
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): ram0 KVM
  00000000000c3000-00000000000e3fff (prio 0, rom): ram0 @00000000000c3000 KVM
  00000000000e4000-00000000000effff (prio 0, ram): ram0 @00000000000e4000 KVM
  00000000000f0000-00000000000fffff (prio 0, rom): ram0 @00000000000f0000 KVM
  0000000000100000-000000001fffffff (prio 0, ram): ram0 @0000000000100000 KVM
  00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios KVM
"""


def test_a_hugetlb_guest_under_kvm_agrees_with_its_flatview() -> None:
    flat = parse_flatview(MTREE_KVM_HUGETLB)
    assert [(r.gpa, r.region) for r in flat if r.kind == "ram"][-1] == (0x100000, "ram0")
    assert flatview_problems(q35_map(512 * MiB, page_size=2 * MiB), flat) == []
    # The bug it guards against: a map that puts the RAM at another offset.
    shifted = build_map("ram0", 256 * MiB, 0, [memfd("ram0", 512 * MiB, 2 * MiB)])
    assert flatview_problems(shifted, flat)
