"""Guest physical addresses -> (memory backend, offset in its backing): the GPA map of a PC guest.

To punch "GPA X" from the host we must know which backend holds X and at which
offset of its RAMBlock (= of its memfd or file). QEMU lays guest RAM out like this
on x86 PC machines (hw/i386/pc_q35.c `pc_q35_init`, hw/i386/pc.c `pc_memory_init`):

- The machine RAM (`-machine memory-backend=ram0`, size S) is split at `lowmem`:
  q35 uses lowmem = 0x80000000 (2 GiB) when S >= 0xb0000000 (2.75 GiB), else
  0xb0000000, capped by `max-ram-below-4g`; below = min(S, lowmem), above = S - below.
- GPA [0, below) is the alias "ram-below-4g" = offset [0, below).
- GPA [above_start, above_start + above) is "ram-above-4g" = offset [below, S).
  above_start is 4 GiB, except on AMD vCPUs whose highest GPA would reach the
  HyperTransport hole (0xfd00000000): then QEMU moves it to 1 TiB. That needs
  close to 1 TiB of RAM, so we take 4 GiB and the FlatView check catches the rest.
- [0xa0000, 0x100000) is the legacy VGA window, option ROMs and BIOS shadow; ROM
  regions overlay RAM there (`info mtree -f`: pc.rom at 0xc0000, pc.bios at 0xe0000)
  and no OS uses it as RAM, so this map treats it as a hole.
- Memory devices (virtio-mem, pc-dimm, virtio-pmem) map their whole memdev
  linearly at their `memaddr`/`addr` (offset = gpa - memaddr).

`map_from_qmp` builds the map from QMP answers: `qom-get /machine memory-backend`,
`qom-get /machine/q35 below-4g-mem-size|above-4g-mem-size` (properties of the PCI
host bridge, set by pc_q35_init; `/machine/i440fx` on "pc"), `query-memdev`,
`qom-get /objects/<id> type`, `query-memory-devices`. QMP has no answer for a
RAMBlock's page size or host address, so those come from HMP `info ramblock`
(through `human-monitor-command`); `info mtree -f` is parsed only to cross-check
the map against the FlatView the guest really sees (`flatview_problems`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.errors import MemoryOpError, QmpError
from orchestrator.units import GiB, format_size

FOUR_GIB = 4 * GiB
#: q35: RAM of at least this size gets the 2 GiB split (pc_q35_init).
Q35_SPLIT_THRESHOLD = 0xB0000000
Q35_LOWMEM_LARGE = 0x80000000
Q35_LOWMEM_SMALL = 0xB0000000
#: VGA window + option ROMs + BIOS shadow: never plain RAM to a guest OS.
LEGACY_HOLE = (0xA0000, 0x100000)
HOST_PAGE = 4096


@dataclass(frozen=True)
class Memdev:
    """A memory backend object as QMP describes it, plus its RAMBlock's page size."""

    id: str
    qom_type: str  # "memory-backend-memfd" | "memory-backend-file" | "memory-backend-ram" | ...
    size: int
    page_size: int = HOST_PAGE
    share: bool = False

    @property
    def kind(self) -> str:
        """ "memfd", "file", "anon" (memory-backend-ram) or the QOM type for anything else."""
        return {
            "memory-backend-memfd": "memfd",
            "memory-backend-file": "file",
            "memory-backend-ram": "anon",
        }.get(self.qom_type, self.qom_type)


@dataclass(frozen=True)
class RamRange:
    """GPA [gpa, gpa + size) is bytes [offset, offset + size) of memdev `memdev`."""

    gpa: int
    size: int
    memdev: str
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class BackingRange:
    """One piece of a located GPA range: `length` bytes at `offset` of `memdev`."""

    gpa: int
    length: int
    memdev: str
    offset: int


def _hex(value: int) -> str:
    return f"{value:#x}"


def q35_ram_split(ram_size: int, max_ram_below_4g: int = FOUR_GIB) -> tuple[int, int]:
    """(below_4g, above_4g) bytes of machine RAM on q35, as pc_q35_init computes them."""
    lowmem = Q35_LOWMEM_LARGE if ram_size >= Q35_SPLIT_THRESHOLD else Q35_LOWMEM_SMALL
    lowmem = min(lowmem, max_ram_below_4g or FOUR_GIB)
    below = min(ram_size, lowmem)
    return below, ram_size - below


def pc_ram_ranges(
    memdev: str, below_4g: int, above_4g: int, above_start: int = FOUR_GIB
) -> list[RamRange]:
    """The machine RAM's GPA ranges on x86 PC machines, without the legacy hole."""
    ranges: list[RamRange] = []
    hole_start, hole_end = LEGACY_HOLE
    if below_4g > 0:
        first = min(below_4g, hole_start)
        ranges.append(RamRange(0, first, memdev, 0))
        if below_4g > hole_end:
            ranges.append(RamRange(hole_end, below_4g - hole_end, memdev, hole_end))
    if above_4g > 0:
        ranges.append(RamRange(above_start, above_4g, memdev, below_4g))
    return ranges


def _object_id(path: str) -> str:
    """'/objects/ram0' -> 'ram0' (QMP names memdevs by QOM path in some answers)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def memory_device_ranges(devices: Iterable[dict[str, Any]]) -> list[RamRange]:
    """RAM ranges of memory devices from `query-memory-devices`.

    virtio-mem reports `memaddr` and `max-size` (its memdev's size; only plugged blocks
    are usable by the guest, but the mapping is linear over the whole memdev);
    pc-dimm/nvdimm ("dimm"/"nvdimm") report `addr` and `size`; virtio-pmem `memaddr`, `size`.
    """
    ranges: list[RamRange] = []
    for device in devices:
        data = device.get("data", {})
        memdev = data.get("memdev")
        base = data.get("memaddr", data.get("addr"))
        size = data.get("max-size", data.get("size"))
        if memdev is None or base is None or not size:
            continue
        ranges.append(RamRange(int(base), int(size), _object_id(str(memdev)), 0))
    return ranges


@dataclass(frozen=True)
class GuestMemoryMap:
    """Where each guest physical range lives; `locate` turns a GPA range into backing ranges."""

    ranges: tuple[RamRange, ...]
    memdevs: tuple[Memdev, ...]
    machine_memdev: str

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.ranges, key=lambda r: r.gpa))
        for before, after in itertools.pairwise(ordered):
            if after.gpa < before.end:
                raise MemoryOpError(
                    f"guest RAM ranges overlap: {before} and {after}",
                    "the QMP answers are inconsistent; report this with qmp.jsonl",
                )
        object.__setattr__(self, "ranges", ordered)

    def memdev(self, memdev_id: str) -> Memdev:
        for memdev in self.memdevs:
            if memdev.id == memdev_id:
                return memdev
        known = ", ".join(m.id for m in self.memdevs)
        raise MemoryOpError(f"no memory backend {memdev_id!r}", f"known backends: {known}")

    def describe(self) -> str:
        """One line per range, for error messages and logs."""
        return "; ".join(
            f"{_hex(r.gpa)}-{_hex(r.end - 1)} -> {r.memdev}@{_hex(r.offset)}" for r in self.ranges
        )

    def locate(self, gpa: int, length: int) -> list[BackingRange]:
        """The backing ranges of GPA [gpa, gpa + length): one per RAM range it spans.

        MemoryOpError when the range is empty, not aligned to the backing's page size,
        outside guest RAM, or crosses a hole (e.g. the PCI hole below 4 GiB).
        """
        if length <= 0 or gpa < 0:
            raise MemoryOpError(
                f"GPA range {_hex(gpa)}+{length} is empty or negative",
                "give a start >= 0 and a length > 0",
            )
        end = gpa + length
        pieces: list[BackingRange] = []
        cursor = gpa
        for ram in self.ranges:
            if ram.end <= cursor or ram.gpa >= end:
                continue
            if ram.gpa > cursor:
                break  # a hole between cursor and this range
            piece_end = min(end, ram.end)
            pieces.append(
                BackingRange(cursor, piece_end - cursor, ram.memdev, ram.offset + cursor - ram.gpa)
            )
            cursor = piece_end
            if cursor == end:
                break
        if cursor != end:
            where = "crosses a hole in" if pieces else "is outside"
            raise MemoryOpError(
                f"GPA range {_hex(gpa)}-{_hex(end - 1)} {where} guest RAM "
                f"(no RAM at {_hex(cursor)})",
                f"pick a range inside one of: {self.describe()}",
            )
        for piece in pieces:
            page = self.memdev(piece.memdev).page_size
            if piece.gpa % page or piece.length % page:
                raise MemoryOpError(
                    f"GPA range {_hex(gpa)}+{_hex(length)} is not aligned to the "
                    f"{format_size(page)} pages of backend {piece.memdev}",
                    f"start and length must be multiples of {page}",
                )
        return pieces

    def gpa_of(self, memdev: str, offset: int) -> int:
        """The GPA at which byte `offset` of `memdev` appears (the inverse of `locate`)."""
        for ram in self.ranges:
            if ram.memdev == memdev and ram.offset <= offset < ram.offset + ram.size:
                return ram.gpa + offset - ram.offset
        raise MemoryOpError(
            f"offset {_hex(offset)} of {memdev} is not visible to the guest",
            f"the guest sees: {self.describe()}",
        )


def build_map(
    machine_memdev: str,
    below_4g: int,
    above_4g: int,
    memdevs: Sequence[Memdev],
    devices: Iterable[dict[str, Any]] = (),
    above_start: int = FOUR_GIB,
) -> GuestMemoryMap:
    """The map of a PC machine from its RAM split, backends and memory devices (pure)."""
    ranges = pc_ram_ranges(machine_memdev, below_4g, above_4g, above_start)
    ranges += memory_device_ranges(devices)
    known = {m.id for m in memdevs}
    for ram in ranges:
        if ram.memdev not in known:
            raise MemoryOpError(
                f"guest RAM at {_hex(ram.gpa)} belongs to backend {ram.memdev!r}, "
                "which query-memdev does not list",
                "the QMP answers are inconsistent; report this with qmp.jsonl",
            )
    return GuestMemoryMap(tuple(ranges), tuple(memdevs), machine_memdev)


# --- HMP text: `info ramblock` and `info mtree -f` ------------------------------------------

_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_RAMBLOCK_RE = re.compile(
    r"^\s*(?P<name>\S+)\s+(?P<psize>\d+)\s+(?P<unit>[KMGT]?i?B)\s+0x(?P<offset>[0-9a-fA-F]+)"
    r"\s+0x(?P<used>[0-9a-fA-F]+)\s+0x(?P<total>[0-9a-fA-F]+)\s+0x(?P<hva>[0-9a-fA-F]+)"
    r"(?:\s+(?P<ro>r[wo]))?\s*$"
)
_FLAT_RE = re.compile(
    r"^\s*(?P<start>[0-9a-fA-F]+)-(?P<last>[0-9a-fA-F]+) \(prio -?\d+, (?P<kind>[^)]+)\): "
    r"(?P<name>\S+)(?: @(?P<offset>[0-9a-fA-F]+))?"
)


@dataclass(frozen=True)
class RamBlockInfo:
    """One row of HMP `info ramblock`."""

    name: str  # RAMBlock idstr: "ram0", "0000:00:01.0/vmem0", "pc.bios", ...
    page_size: int
    offset: int  # in QEMU's ram_addr_t space (not a file offset)
    used: int
    total: int
    hva: int  # QEMU's host virtual address of the block's start
    readonly: bool = False

    def is_memdev(self, memdev_id: str) -> bool:
        """True if this block belongs to backend `memdev_id` (device blocks carry a qdev prefix)."""
        return self.name == memdev_id or self.name.endswith("/" + memdev_id)


def parse_ramblocks(text: str) -> list[RamBlockInfo]:
    """Rows of `info ramblock` (QEMU >= 4; the RO column appeared later and is optional)."""
    blocks: list[RamBlockInfo] = []
    for line in text.splitlines():
        match = _RAMBLOCK_RE.match(line)
        if match is None:
            continue
        blocks.append(
            RamBlockInfo(
                name=match["name"],
                page_size=int(match["psize"]) * _SIZE_UNITS[match["unit"]],
                offset=int(match["offset"], 16),
                used=int(match["used"], 16),
                total=int(match["total"], 16),
                hva=int(match["hva"], 16),
                readonly=match["ro"] == "ro",
            )
        )
    return blocks


@dataclass(frozen=True)
class FlatRange:
    """One line of a FlatView in `info mtree -f`: what the guest sees at [gpa, gpa + size)."""

    gpa: int
    size: int
    kind: str  # "ram", "rom", "i/o", "romd", ...
    region: str  # the terminal MemoryRegion's name ("ram0", "pc.bios", "ioapic")
    offset: int  # offset within that region


def parse_flatview(text: str, address_space: str = "memory") -> list[FlatRange]:
    """The FlatView that address space `address_space` renders, from `info mtree -f`."""
    ranges: list[FlatRange] = []
    in_view = False
    wanted = f'AS "{address_space}",'
    for line in text.splitlines():
        if line.startswith("FlatView #"):
            if ranges:
                break
            in_view = False
            continue
        if line.strip().startswith(wanted):
            in_view = True
            continue
        if not in_view:
            continue
        match = _FLAT_RE.match(line)
        if match:
            start, last = int(match["start"], 16), int(match["last"], 16)
            ranges.append(
                FlatRange(
                    gpa=start,
                    size=last - start + 1,
                    kind=match["kind"],
                    region=_object_id(match["name"]),
                    offset=int(match["offset"] or "0", 16),
                )
            )
    return ranges


def flatview_problems(memory_map: GuestMemoryMap, flat: Sequence[FlatRange]) -> list[str]:
    """Where the map and QEMU's FlatView disagree (empty: they agree).

    Checked both ways: every FlatView RAM range of a known backend must sit at the
    offset the map predicts, and every machine-RAM range of the map must be RAM of that
    backend in the FlatView. (Memory devices may show only their plugged part.)
    """
    problems: list[str] = []
    known = {m.id for m in memory_map.memdevs}
    for seg in flat:
        if seg.kind != "ram" or seg.region not in known:
            continue
        for gpa in (seg.gpa, seg.gpa + seg.size - 1):
            # A point lookup, not locate(): a 4 KiB range of a 2 MiB-page backend is no
            # punchable range, but its bytes still sit at one offset (hugetlb under KVM).
            ram = next((r for r in memory_map.ranges if r.gpa <= gpa < r.end), None)
            if ram is None:
                if LEGACY_HOLE[0] <= gpa < LEGACY_HOLE[1]:
                    continue  # RAM in the legacy window: the map avoids it on purpose
                problems.append(f"FlatView has {seg.region} RAM at {_hex(gpa)}; the map has none")
                continue
            expected = seg.offset + gpa - seg.gpa
            offset = ram.offset + gpa - ram.gpa
            if ram.memdev != seg.region or offset != expected:
                problems.append(
                    f"GPA {_hex(gpa)}: FlatView says {seg.region}@{_hex(expected)}, "
                    f"the map says {ram.memdev}@{_hex(offset)}"
                )
    for ram in memory_map.ranges:
        if ram.memdev != memory_map.machine_memdev:
            continue
        covered = sum(
            min(ram.end, s.gpa + s.size) - max(ram.gpa, s.gpa)
            for s in flat
            if s.kind == "ram"
            and s.region == ram.memdev
            and s.gpa < ram.end
            and ram.gpa < s.gpa + s.size
        )
        if covered != ram.size:
            problems.append(
                f"map range {_hex(ram.gpa)}-{_hex(ram.end - 1)} of {ram.memdev} is only "
                f"{covered} of {ram.size} bytes RAM in the FlatView"
            )
    return problems


# --- from a live QEMU -----------------------------------------------------------------------


class Monitor(Protocol):
    """What `map_from_qmp` needs of a QMP session (`orchestrator.qemu.qmp.QmpSession`)."""

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...

    def human_monitor(self, command_line: str) -> str: ...


_PCI_HOSTS = ("/machine/q35", "/machine/i440fx")


def _ram_split(qmp: Monitor, machine_size: int) -> tuple[int, int]:
    for host in _PCI_HOSTS:
        try:
            below = int(qmp.execute("qom-get", {"path": host, "property": "below-4g-mem-size"}))
            above = int(qmp.execute("qom-get", {"path": host, "property": "above-4g-mem-size"}))
        except QmpError:  # no such host bridge on this machine type: try the next one
            continue
        if below + above != machine_size:
            raise MemoryOpError(
                f"{host} reports {below} + {above} bytes of RAM, the backend has {machine_size}",
                "the QMP answers are inconsistent; report this with qmp.jsonl",
            )
        return below, above
    raise MemoryOpError(
        "this machine has no q35 or i440fx host bridge: its RAM layout is unknown to cvmlab",
        "use -machine q35 (or pc) for host punch injection",
    )


def map_from_qmp(qmp: Monitor) -> GuestMemoryMap:
    """Build the GPA map of a running (or -S paused) x86 PC QEMU from its monitor."""
    backend_path = qmp.execute("qom-get", {"path": "/machine", "property": "memory-backend"})
    if not backend_path:
        raise MemoryOpError(
            "the machine has no memory-backend object (plain -m RAM)",
            "start QEMU with -machine memory-backend=<id> (cvmlab's argv builder does)",
        )
    machine_memdev = _object_id(str(backend_path))
    blocks = parse_ramblocks(qmp.human_monitor("info ramblock"))
    memdevs: list[Memdev] = []
    for entry in qmp.execute("query-memdev"):
        memdev_id = _object_id(str(entry.get("id", "")))
        qom_type = str(
            qmp.execute("qom-get", {"path": f"/objects/{memdev_id}", "property": "type"})
        )
        block = next((b for b in blocks if b.is_memdev(memdev_id)), None)
        memdevs.append(
            Memdev(
                id=memdev_id,
                qom_type=qom_type,
                size=int(entry["size"]),
                page_size=block.page_size if block else HOST_PAGE,
                share=bool(entry.get("share", False)),
            )
        )
    machine = next((m for m in memdevs if m.id == machine_memdev), None)
    if machine is None:
        raise MemoryOpError(f"machine backend {machine_memdev!r} is not in query-memdev", "")
    below, above = _ram_split(qmp, machine.size)
    devices = qmp.execute("query-memory-devices")
    return build_map(machine_memdev, below, above, memdevs, devices)
