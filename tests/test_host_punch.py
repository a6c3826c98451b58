"""Host punch injection against a real QEMU with no guest (-S: the CPU never runs).

The check is end to end without a guest: write a pattern into guest RAM through our
own mapping of QEMU's backing fd (taken with pidfd_getfd), punch a GPA range, and read
guest RAM back through QEMU itself (`pmemsave`, which walks QEMU's own GPA -> RAMBlock
translation). Zeros exactly in the punched range and the pattern around it prove the
GPA -> offset mapping and the fd discovery, for memfd and file backends and for a
guest whose RAM straddles the below-4G split (a memfd costs only the pages touched).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from qemu_process import RunningQemu, started_qemu

from orchestrator.errors import MemoryOpError
from orchestrator.kvm.libc import fallocate
from orchestrator.memory.host_punch import (
    PUNCH_MODE,
    HostPuncher,
    PunchRecord,
    anon_discard_refused,
    borrowed_fd,
    range_is_hole,
)
from orchestrator.memory.layout import (
    flatview_problems,
    map_from_qmp,
    parse_flatview,
    q35_ram_split,
)
from orchestrator.timeline import Timeline
from orchestrator.units import GiB, MiB

QEMU = os.environ.get("CVMLAB_QEMU", "qemu-system-x86_64")
PAGE = 4096

pytestmark = [
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd on QEMU needs root here"),
]


class Qemu(RunningQemu):
    """A q35 machine, stopped before its first instruction (-S), with guest RAM ram0."""

    def read_gpa(self, gpa: int, length: int) -> bytes:
        """Guest RAM as QEMU sees it, through its own address translation."""
        out = self.rundir / "pmem.bin"
        self.qmp.execute("pmemsave", {"val": gpa, "size": length, "filename": str(out)})
        data = out.read_bytes()
        out.unlink()
        return data


@contextmanager
def q35(*args: str) -> Iterator[Qemu]:
    machine = ("-machine", "q35,memory-backend=ram0", "-accel", "tcg", "-S", *args)
    with started_qemu(QEMU, *machine) as qemu:
        yield Qemu(qemu.proc, qemu.qmp, qemu.rundir)


@pytest.fixture
def machine(request: pytest.FixtureRequest) -> Iterator[Qemu]:
    with q35(*request.param) as qemu:
        yield qemu


def memfd_machine(size: str) -> list[str]:
    return ["-m", size, "-object", f"memory-backend-memfd,id=ram0,size={size}"]


def write_backing(qemu: Qemu, puncher: HostPuncher, memdev: str, offset: int, data: bytes) -> None:
    """Write `data` at `offset` of the backend through our own shared mapping of QEMU's fd."""
    backing = puncher.backing(memdev)
    with borrowed_fd(qemu.pid, backing.qemu_fd) as fd:
        start = backing.file_offset + offset
        base = start - start % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, start - base + len(data), offset=base) as view:
            view[start - base : start - base + len(data)] = data


def fill_and_punch(
    qemu: Qemu, puncher: HostPuncher, gpa: int, pages: int, hole: tuple[int, int]
) -> tuple[list[PunchRecord], bytes]:
    """Fill `pages` pages from `gpa` with 0xA5, punch pages [hole) of them, read back via QEMU."""
    (piece,) = puncher.memory_map.locate(gpa, pages * PAGE)
    write_backing(qemu, puncher, piece.memdev, piece.offset, b"\xa5" * pages * PAGE)
    assert qemu.read_gpa(gpa, pages * PAGE) == b"\xa5" * pages * PAGE
    first, count = hole
    records = puncher.punch(gpa + first * PAGE, count * PAGE)
    return records, qemu.read_gpa(gpa, pages * PAGE)


def assert_hole_exactly(data: bytes, first: int, count: int) -> None:
    hole = slice(first * PAGE, (first + count) * PAGE)
    assert data[hole] == bytes(count * PAGE)
    assert data[: hole.start] == b"\xa5" * hole.start
    assert data[hole.stop :] == b"\xa5" * (len(data) - hole.stop)


# --- the map of a live QEMU ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "size"),
    [
        (memfd_machine("512M"), 512 * MiB),
        (memfd_machine("2815M"), 2815 * MiB),
        (memfd_machine("2816M"), 2816 * MiB),
        (memfd_machine("3G"), 3 * GiB),
    ],
    indirect=["machine"],
)
def test_the_qmp_map_matches_qemus_split_and_flatview(machine: Qemu, size: int) -> None:
    memory_map = map_from_qmp(machine.qmp)
    below, above = q35_ram_split(size)
    ram = [r for r in memory_map.ranges if r.memdev == "ram0"]
    assert ram[-1].end == (4 * GiB + above if above else below)
    flat = parse_flatview(machine.qmp.human_monitor("info mtree -f"))
    assert flatview_problems(memory_map, flat) == []


# --- punching ----------------------------------------------------------------------------------


@pytest.mark.parametrize("machine", [memfd_machine("3G")], indirect=True)
@pytest.mark.parametrize("gpa", [0x10000000, 4 * GiB + 0x200000], ids=["below-4g", "above-4g"])
def test_a_memfd_punch_zeroes_exactly_the_range_and_frees_it(machine: Qemu, gpa: int) -> None:
    puncher = HostPuncher(machine.qmp, machine.pid)
    (record,), data = fill_and_punch(machine, puncher, gpa, pages=8, hole=(3, 2))
    assert_hole_exactly(data, 3, 2)
    assert record.freed == 2 * PAGE and record.hole_after
    assert record.target.startswith("/memfd:")
    assert record.offset == puncher.memory_map.locate(gpa + 3 * PAGE, PAGE)[0].offset


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cvmlab-punch-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path)


def test_a_file_backend_punch_zeroes_exactly_the_range(shm_dir: Path) -> None:
    with q35(
        "-m", "256M", "-object",
        f"memory-backend-file,id=ram0,size=256M,mem-path={shm_dir},share=on",
    ) as qemu:  # fmt: skip
        puncher = HostPuncher(qemu.qmp, qemu.pid)
        (record,), data = fill_and_punch(qemu, puncher, 0x4000000, pages=4, hole=(1, 1))
        assert_hole_exactly(data, 1, 1)
        assert record.freed == PAGE and record.hole_after
        assert record.target.startswith(str(shm_dir))


@pytest.mark.parametrize(
    "machine",
    [
        [
            "-m", "512M,maxmem=1536M",
            "-object", "memory-backend-memfd,id=ram0,size=512M",
            "-object", "memory-backend-memfd,id=vmem0,size=1G",
            "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0",
        ]
    ],
    indirect=True,
)  # fmt: skip
def test_two_memfd_backends_are_told_apart_by_their_mappings(machine: Qemu) -> None:
    puncher = HostPuncher(machine.qmp, machine.pid)
    ram0, vmem0 = puncher.backing("ram0"), puncher.backing("vmem0")
    assert ram0.qemu_fd != vmem0.qemu_fd
    assert ram0.target == vmem0.target  # QEMU names every memfd the same
    (piece,) = puncher.memory_map.locate(4 * GiB + 0x100000, PAGE)
    assert piece.memdev == "vmem0" and piece.offset == 0x100000
    write_backing(machine, puncher, "vmem0", piece.offset, b"\xa5" * PAGE)
    (record,) = puncher.punch(piece.gpa, PAGE)
    assert (record.memdev, record.qemu_fd, record.freed) == ("vmem0", vmem0.qemu_fd, PAGE)


@pytest.mark.parametrize("machine", [memfd_machine("3G")], indirect=True)
def test_each_punch_is_recorded_on_the_timeline(machine: Qemu, tmp_path: Path) -> None:
    with Timeline(tmp_path / "timeline.jsonl") as timeline:
        puncher = HostPuncher(machine.qmp, machine.pid, timeline=timeline)
        puncher.punch(0x1000000, 2 * PAGE)
    (line,) = (tmp_path / "timeline.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert (record["source"], record["kind"]) == ("op", "punch")
    assert (record["gpa"], record["length"], record["offset"]) == (0x1000000, 2 * PAGE, 0x1000000)
    assert record["memdev"] == "ram0" and record["t_end"] >= record["t"]


@pytest.mark.parametrize("machine", [memfd_machine("3G")], indirect=True)
@pytest.mark.parametrize(
    ("gpa", "length", "complaint"),
    [
        (3 * GiB, PAGE, "outside"),
        (2 * GiB - PAGE, 2 * PAGE, "crosses a hole"),
        (0x1000800, PAGE, "not aligned"),
        (6 * GiB, PAGE, "outside"),
    ],
)
def test_a_bad_range_is_refused_before_anything_is_punched(
    machine: Qemu, gpa: int, length: int, complaint: str
) -> None:
    puncher = HostPuncher(machine.qmp, machine.pid)
    write_backing(machine, puncher, "ram0", 0x1000000, b"\xa5" * PAGE)
    with borrowed_fd(machine.pid, puncher.backing("ram0").qemu_fd) as fd:
        before = os.fstat(fd).st_blocks
        with pytest.raises(MemoryOpError, match=complaint):
            puncher.punch(gpa, length)
        assert os.fstat(fd).st_blocks == before
    assert puncher.records == []


def test_pages_of_one_call_are_all_checked_before_the_first_punch() -> None:
    with q35(*memfd_machine("1G")) as qemu:
        puncher = HostPuncher(qemu.qmp, qemu.pid)
        write_backing(qemu, puncher, "ram0", 0x1000000, b"\xa5" * PAGE)
        with pytest.raises(MemoryOpError, match="outside"):
            puncher.punch_pages([0x1000000, 2 * GiB])
        assert qemu.read_gpa(0x1000000, PAGE) == b"\xa5" * PAGE


@pytest.mark.parametrize(
    "machine", [["-m", "256M", "-object", "memory-backend-ram,id=ram0,size=256M"]], indirect=True
)
def test_anonymous_ram_cannot_be_punched_from_outside(machine: Qemu) -> None:
    puncher = HostPuncher(machine.qmp, machine.pid)
    with pytest.raises(MemoryOpError, match="anonymous memory") as info:
        puncher.punch(0x1000000, PAGE)
    assert "backend=memfd" in info.value.fix


def test_this_kernel_refuses_madv_dontneed_on_another_process() -> None:
    # The claim the anonymous-RAM error makes, checked on the running kernel.
    assert anon_discard_refused()


@pytest.fixture
def private_machine(tmp_path: Path) -> Iterator[Qemu]:
    """share=off memfd; QEMU's loader writes 0x5A at 16 MiB, i.e. through its private mapping."""
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x5a" * 4 * PAGE)
    with q35(
        "-m", "256M", "-object", "memory-backend-memfd,id=ram0,size=256M,share=off",
        "-device", f"loader,file={blob},addr=0x1000000,force-raw=on",
    ) as qemu:  # fmt: skip
        yield qemu


def test_a_private_backend_is_refused_by_default(private_machine: Qemu) -> None:
    puncher = HostPuncher(private_machine.qmp, private_machine.pid)
    with pytest.raises(MemoryOpError, match="mapped private"):
        puncher.punch(0x1000000, PAGE)
    assert puncher.records == []


def test_a_private_punch_frees_page_cache_but_not_what_the_guest_wrote(
    private_machine: Qemu,
) -> None:
    # The failure mode a host-side counter alone would miss: success, memory freed,
    # and the guest still reads its old data.
    assert private_machine.read_gpa(0x1000000, 4 * PAGE) == b"\x5a" * 4 * PAGE
    puncher = HostPuncher(private_machine.qmp, private_machine.pid)
    (record,) = puncher.punch(0x1000000, 2 * PAGE, allow_private=True)
    assert record.freed == 2 * PAGE
    assert private_machine.read_gpa(0x1000000, 4 * PAGE) == b"\x5a" * 4 * PAGE


def test_seek_data_tells_a_punched_range_from_data() -> None:
    fd = os.memfd_create("cvmlab-hole-test")
    try:
        os.write(fd, b"\xa5" * 4 * PAGE)
        fallocate(fd, PUNCH_MODE, PAGE, 2 * PAGE)
        assert range_is_hole(fd, PAGE, 2 * PAGE)
        assert not range_is_hole(fd, 0, PAGE)
        assert not range_is_hole(fd, PAGE, 3 * PAGE)  # runs into data
    finally:
        os.close(fd)
