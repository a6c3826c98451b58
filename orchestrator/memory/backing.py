"""How much of a memory backend the host holds right now, read from the host's own books.

A discard (balloon inflation, free page reporting, virtio-mem unplug, a conversion)
must show on the host, not only in "the command succeeded" (a madvise can be a
silent no-op: Firecracker issue #6167). Per backend kind QEMU discards differently
(`ram_block_discard_range`, system/physmem.c), so "held" is read differently:

| backend                 | QEMU's discard                          | held =                     |
|-------------------------|-----------------------------------------|----------------------------|
| memfd/file, share=on    | fallocate(PUNCH_HOLE) + MADV_DONTNEED   | st_blocks * 512 of the fd  |
| memfd/file, share=off   | fallocate on the file + MADV_DONTNEED   | st_blocks*512 + Anonymous  |
| memfd, hugetlb          | fallocate only (no madvise, huge pages) | st_blocks * 512 (hugetlbfs)|
| anon (memory-backend-ram) | MADV_DONTNEED                         | Rss of QEMU's mapping      |
| anon, share=on          | MADV_REMOVE                             | Rss of QEMU's mapping      |

share=off on a memfd or file costs twice (measured on 6.18): a guest write faults the
file page in (shmem allocates it) and then copies it to a private anonymous page, so
both the file's blocks and the mapping's `Anonymous` grow, and a discard must free both.

The mapping is found by the RAMBlock's host address (HMP `info ramblock`) in
/proc/<pid>/smaps; the fd by the same address through /proc/<pid>/maps
(`orchestrator.memory.host_punch.find_backing`). Host-wide counters
(/proc/meminfo `Shmem`, `AnonPages`, `Cached`, `HugePages_Free`) are read only when
asked: they move with everything else on the host, so callers hold
`HostLock("meminfo")` and settle them.

Samples go to the timeline as `{"source": "host", "kind": "sample", "memdev": ...,
"counters": {name: KiB}}`: every counter in **KiB** (the report plots them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from orchestrator.errors import MemoryOpError
from orchestrator.host.meminfo import sample_meminfo
from orchestrator.host.settle import Settled, converge, settle
from orchestrator.host.smaps import SmapsEntry, smaps
from orchestrator.memory.host_punch import QemuBacking, find_backing
from orchestrator.memory.layout import Memdev, RamBlockInfo, parse_ramblocks
from orchestrator.timeline import Timeline, now

KIB = 1024
#: tmpfs-like file systems whose pages count in /proc/meminfo `Shmem`.
_SHMEM_FS = frozenset({"tmpfs", "shmem", "ramfs", "devtmpfs"})


class Monitor(Protocol):
    """The part of `orchestrator.qemu.qmp.QmpSession` this module needs."""

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any: ...

    def human_monitor(self, command_line: str) -> str: ...


@dataclass(frozen=True)
class BackendInfo:
    """What a memory backend is, from QMP: kind, sharing, page size, where QEMU maps it."""

    memdev: str
    kind: str  # "anon" | "memfd" | "file" | another QOM type
    share: bool
    hugetlb: bool
    size: int  # bytes
    page_size: int  # the RAMBlock's page size
    hva: int  # QEMU's address of the RAMBlock's first byte
    used: int  # bytes of the RAMBlock in use
    mem_path: str | None = None  # file backends

    @property
    def has_fd(self) -> bool:
        return self.kind in ("memfd", "file")

    @property
    def label(self) -> str:
        """ "memfd", "memfd-private", "memfd-hugetlb", "file", "anon", "anon-shared"."""
        if self.hugetlb:
            return f"{self.kind}-hugetlb"
        if self.has_fd:
            return self.kind if self.share else f"{self.kind}-private"
        return f"{self.kind}-shared" if self.share else self.kind

    def host_counter(self) -> str:
        """The /proc/meminfo counter that holds this backend's pages host-wide.

        `HugePages_Free` rises when pages are freed; the others fall.
        """
        if self.hugetlb:
            return "HugePages_Free"
        if self.kind == "memfd" or (self.kind == "anon" and self.share):
            return "Shmem"
        if self.kind == "file":
            return "Shmem" if self.mem_path and _on_shmem(self.mem_path) else "Cached"
        return "AnonPages"


def _on_shmem(path: str, mounts: str = "/proc/self/mounts") -> bool:
    """True when `path` lives on tmpfs (its pages are Shmem), by the longest mount prefix."""
    best, fstype = "", ""
    real = os.path.realpath(path)
    with open(mounts, encoding="utf-8") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) < 3:
                continue
            point = parts[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, parts[2]
    return fstype in _SHMEM_FS


@dataclass(frozen=True)
class BackingSample:
    """One reading of how much of `info.memdev` the host holds, at now() time `at` (bytes)."""

    at: float
    info: BackendInfo
    mapping_rss: int  # smaps Rss of QEMU's mapping(s) of the RAMBlock
    mapping_anonymous: int  # smaps Anonymous (private copies) of those mappings
    mapping_anon_huge: int  # smaps AnonHugePages (THP) of those mappings
    file_allocated: int | None  # st_blocks * 512 of the backing fd; None without an fd
    host: Mapping[str, int] = field(default_factory=dict)  # host-wide meminfo, bytes
    #: None: one reading; True: read once `held` had stopped moving (BackingProbe.settle);
    #: False: `held` was still moving at the deadline, so this reading cannot be judged.
    settled: bool | None = None

    @property
    def held(self) -> int:
        """Bytes of the backend the host holds, by the rule of its kind (module docstring)."""
        return held_bytes(self.info, self.mapping_rss, self.mapping_anonymous, self.file_allocated)

    def counters_kib(self) -> dict[str, int]:
        """Counters for the timeline, in KiB, named `<memdev>.<what>` or the meminfo name."""
        prefix = self.info.memdev
        counters = {f"{prefix}.held": self.held // KIB, f"{prefix}.rss": self.mapping_rss // KIB}
        if self.file_allocated is not None:
            counters[f"{prefix}.file"] = self.file_allocated // KIB
        if self.mapping_anonymous and self.info.has_fd:
            counters[f"{prefix}.anonymous"] = self.mapping_anonymous // KIB
        if self.mapping_anon_huge:
            counters[f"{prefix}.anon_huge"] = self.mapping_anon_huge // KIB
        counters.update({name: value // KIB for name, value in self.host.items()})
        return counters

    def record(self, timeline: Timeline | None) -> None:
        if timeline is not None:
            timeline.record(
                "host", "sample", t=self.at, memdev=self.info.memdev,
                backend=self.info.label, counters=self.counters_kib(),
            )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 6),
            "memdev": self.info.memdev,
            "backend": self.info.label,
            "held": self.held,
            "mapping_rss": self.mapping_rss,
            "mapping_anonymous": self.mapping_anonymous,
            "mapping_anon_huge": self.mapping_anon_huge,
            "file_allocated": self.file_allocated,
            "host": dict(self.host),
            "settled": self.settled,
        }


def held_bytes(
    info: BackendInfo, mapping_rss: int, mapping_anonymous: int, file_allocated: int | None
) -> int:
    """The arithmetic of `BackingSample.held` (pure, for tests)."""
    if info.has_fd:
        if file_allocated is None:
            raise MemoryOpError(
                f"backend {info.memdev} ({info.label}) has no readable fd allocation",
                "the backing fd was not found; see /proc/<qemu pid>/fd",
            )
        if info.share or info.hugetlb:
            return file_allocated
        return file_allocated + mapping_anonymous
    return mapping_rss


def host_meminfo(counters: Sequence[str], path: str = "/proc/meminfo") -> dict[str, int]:
    """Host-wide counters in bytes; `HugePages_Free` (a page count) times `Hugepagesize`."""
    sample = sample_meminfo(path)
    values: dict[str, int] = {}
    for name in counters:
        value = sample[name]
        if name.startswith("HugePages_"):
            value *= sample["Hugepagesize"]
        values[name] = value
    return values


def mappings_of(entries: Sequence[SmapsEntry], start: int, length: int) -> list[SmapsEntry]:
    """The VMAs overlapping [start, start + length) (pure)."""
    end = start + length
    return [e for e in entries if e.start < end and start < e.end]


class BackingProbe:
    """Samples one backend of one running QEMU.

    probe = BackingProbe(machine.qmp, machine.pid, "ram0", timeline=timeline)
    before = probe.sample()
    ...
    settled, after = probe.settle(tolerance=MiB)
    """

    def __init__(
        self,
        qmp: Monitor,
        pid: int,
        memdev: str,
        *,
        timeline: Timeline | None = None,
        host_counters: Sequence[str] | None = None,
        proc: str = "/proc",
    ) -> None:
        self.pid = pid
        self.timeline = timeline
        self.proc = proc
        self.info = backend_info(qmp, memdev)
        #: Host-wide counters `sample(host=True)` adds; by default the backend's own.
        self.host_counters = (
            (self.info.host_counter(),) if host_counters is None else tuple(host_counters)
        )
        self.backing: QemuBacking | None = None
        if self.info.has_fd:
            memdev_obj = Memdev(
                id=memdev,
                qom_type=f"memory-backend-{self.info.kind}",
                size=self.info.size,
                page_size=self.info.page_size,
                share=self.info.share,
            )
            block = RamBlockInfo(memdev, self.info.page_size, 0, self.info.used,
                                 self.info.used, self.info.hva)  # fmt: skip
            self.backing = find_backing(pid, memdev_obj, block, proc)

    def _file_allocated(self) -> int | None:
        if self.backing is None:
            return None
        try:
            return os.stat(f"{self.proc}/{self.pid}/fd/{self.backing.qemu_fd}").st_blocks * 512
        except FileNotFoundError:
            raise MemoryOpError(
                f"QEMU (pid {self.pid}) no longer holds fd {self.backing.qemu_fd} of "
                f"{self.info.memdev}",
                "QEMU exited or closed the backing; see qemu.stderr",
            ) from None

    def sample(self, host: bool = False, record: bool = True) -> BackingSample:
        """Read the backend now; `host` adds the host-wide counters given at construction."""
        at = now()
        try:
            entries = mappings_of(smaps(self.pid, self.proc), self.info.hva, self.info.used)
        except FileNotFoundError:
            raise MemoryOpError(
                f"QEMU (pid {self.pid}) is gone", "the guest exited; see qemu.stderr"
            ) from None
        sample = BackingSample(
            at=at,
            info=self.info,
            mapping_rss=sum(e.rss for e in entries),
            mapping_anonymous=sum(e.fields.get("Anonymous", 0) for e in entries),
            mapping_anon_huge=sum(e.fields.get("AnonHugePages", 0) for e in entries),
            file_allocated=self._file_allocated(),
            host=host_meminfo(self.host_counters) if host and self.host_counters else {},
        )
        if record:
            sample.record(self.timeline)
        return sample

    def held(self) -> int:
        """Bytes held now (a `read` callable for `settle`/`converge`)."""
        return self.sample().held

    def settle(
        self,
        tolerance: int,
        *,
        window: int = 3,
        interval: float = 0.1,
        timeout: float = 10.0,
    ) -> tuple[Settled, BackingSample]:
        """Sample until `window` readings of `held` agree within `tolerance` bytes.

        The sample read after it says whether that happened (`BackingSample.settled`):
        a verdict judged on a reading that never settled is incomplete, never a pass."""
        settled = settle(
            self.held, tolerance=tolerance, window=window, interval=interval, timeout=timeout
        )
        return settled, replace(self.sample(host=True), settled=settled.ok)

    def converge(
        self,
        target: int,
        tolerance: int,
        *,
        window: int = 2,
        interval: float = 0.1,
        timeout: float = 30.0,
    ) -> tuple[Settled, BackingSample]:
        """Sample until `window` readings of `held` lie within `tolerance` of `target`."""
        settled = converge(
            self.held,
            target,
            tolerance=tolerance,
            window=window,
            interval=interval,
            timeout=timeout,
        )
        return settled, self.sample(host=True)


def backend_info(qmp: Monitor, memdev: str) -> BackendInfo:
    """Describe backend `memdev` of a running QEMU from QMP (and HMP `info ramblock`)."""
    entries = {str(e.get("id", "")).rsplit("/", 1)[-1]: e for e in qmp.execute("query-memdev")}
    entry = entries.get(memdev)
    if entry is None:
        raise MemoryOpError(
            f"QEMU has no memory backend {memdev!r}", f"known backends: {', '.join(entries)}"
        )
    path = f"/objects/{memdev}"
    qom_type = str(qmp.execute("qom-get", {"path": path, "property": "type"}))
    kind = {
        "memory-backend-memfd": "memfd",
        "memory-backend-file": "file",
        "memory-backend-ram": "anon",
    }.get(qom_type, qom_type)
    hugetlb = False
    mem_path = None
    if kind == "memfd":
        hugetlb = bool(qmp.execute("qom-get", {"path": path, "property": "hugetlb"}))
    elif kind == "file":
        mem_path = str(qmp.execute("qom-get", {"path": path, "property": "mem-path"}))
    blocks = parse_ramblocks(qmp.human_monitor("info ramblock"))
    block = next((b for b in blocks if b.is_memdev(memdev)), None)
    if block is None:
        raise MemoryOpError(
            f"backend {memdev} has no RAMBlock in `info ramblock`",
            "is it used by the machine or a memory device?",
            detail="\n".join(b.name for b in blocks),
        )
    if kind == "file" and not hugetlb:
        hugetlb = block.page_size > 4096  # a file on hugetlbfs
    return BackendInfo(
        memdev=memdev,
        kind=kind,
        share=bool(entry.get("share", False)),
        hugetlb=hugetlb,
        size=int(entry["size"]),
        page_size=block.page_size,
        hva=block.hva,
        used=block.used,
        mem_path=mem_path,
    )
