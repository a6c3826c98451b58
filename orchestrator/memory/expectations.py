"""What a discard must do to the host, per backend: the table the memory scenarios assert.

Every row cites the QEMU source that decides it (QEMU 10.0; hw/virtio/virtio-balloon.c,
hw/virtio/virtio-mem.c, system/physmem.c `ram_block_discard_range`) and what was
measured on this project's machines (Linux 6.18 host, QEMU 10.0.2, TCG guest 6.12).
A backend that cannot give memory back by design is not skipped: its row says so
(`frees=False`) and the scenario asserts exactly that, with the warning QEMU prints.

Amounts are fractions of the discarded amount X: `file` for the backing fd's
st_blocks, `anonymous` for the `Anonymous` pages of QEMU's mapping, `rss` for the
mapping's Rss, `host` for the host-wide /proc/meminfo counter of the backend
(`BackendInfo.host_counter()`; HugePages_Free rises where the others fall).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from orchestrator.memory.backing import BackendInfo, BackingSample
from orchestrator.qemu.spec import Backend, MachineSpec, MemfdBackend
from orchestrator.units import MiB

Operation = Literal["balloon", "free-page-reporting", "virtio-mem-unplug"]

_DISCARD = "system/physmem.c ram_block_discard_range"
_PRIVATE_WARNING = "Discarding RAM in private file mappings is possibly dangerous"
_HUGE_BALLOON_WARNING = "Balloon used with backing page size > 4kiB, this may not be reliable"


@dataclass(frozen=True)
class DiscardExpectation:
    """How one backend answers one kind of discard."""

    backend: str  # BackendInfo.label
    operation: Operation
    mechanism: str  # what QEMU calls on the host
    frees: bool  # False: the host keeps the memory by design
    file: float | None  # share of X the fd's st_blocks fall by (None: no fd)
    anonymous: float  # share of X the mapping's Anonymous falls by
    host: float  # share of X the host-wide counter moves by
    qemu_warning: str | None  # a line QEMU prints on stderr when it does this
    source: str  # where in QEMU this is decided
    note: str = ""

    @property
    def held(self) -> float:
        """Share of X that `BackingSample.held` falls by (see backing.held_bytes)."""
        if not self.frees:
            return 0.0
        if self.file is None:
            return 1.0  # held is the mapping's Rss, which falls by X
        return self.file + self.anonymous


def expect_discard(info: BackendInfo, operation: Operation) -> DiscardExpectation:
    """The row for backend `info` and `operation` (see the module docstring)."""
    label = info.label
    source = _DISCARD
    if info.hugetlb:
        if operation == "balloon":
            return DiscardExpectation(
                label, operation, "nothing: 4 KiB pieces of a huge page are collected per "
                "request and a request carries at most 1 MiB", frees=False, file=0.0,
                anonymous=0.0, host=0.0, qemu_warning=_HUGE_BALLOON_WARNING,
                source="hw/virtio/virtio-balloon.c balloon_inflate_page (PartiallyBalloonedPage "
                "per element); Linux VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256",
                note="the guest still loses the memory (MemTotal falls); the host keeps it",
            )  # fmt: skip
        return DiscardExpectation(
            label, operation, "fallocate(PUNCH_HOLE) of whole huge pages", frees=True,
            file=1.0, anonymous=0.0, host=1.0, qemu_warning=None,
            source=f"{source} (need_madvise is false for huge pages); reports and virtio-mem "
            "blocks are huge-page aligned",
        )  # fmt: skip
    if info.has_fd and info.share:
        return DiscardExpectation(
            label, operation, "fallocate(PUNCH_HOLE|KEEP_SIZE) on the fd, then MADV_DONTNEED",
            frees=True, file=1.0, anonymous=0.0, host=1.0, qemu_warning=None, source=source,
        )  # fmt: skip
    if info.has_fd:
        return DiscardExpectation(
            label, operation, "fallocate(PUNCH_HOLE) on the file and MADV_DONTNEED on the "
            "private copies", frees=True, file=1.0, anonymous=1.0, host=1.0,
            qemu_warning=_PRIVATE_WARNING, source=source,
            note="share=off holds each touched page twice (the file's page and the private "
            "copy): the host gives back 2X",
        )  # fmt: skip
    if info.share:
        return DiscardExpectation(
            label, operation, "MADV_REMOVE", frees=True, file=None, anonymous=0.0, host=1.0,
            qemu_warning=None, source=source,
        )  # fmt: skip
    return DiscardExpectation(
        label, operation, "MADV_DONTNEED", frees=True, file=None, anonymous=1.0, host=1.0,
        qemu_warning=None, source=source,
        note="with THP on the host, zapping 4 KiB of a huge page splits it; Rss falls at once",
    )  # fmt: skip


# --- observation arithmetic the verdicts use ----------------------------------------------


def expected_host_move(before: BackingSample, after: BackingSample) -> int:
    """Bytes the backend's host-wide counter should have moved by, from the process's view.

    Positive means freed: Shmem/Cached/AnonPages fall, HugePages_Free rises by it.
    """
    info = before.info
    counter = info.host_counter()
    if counter in ("Shmem", "Cached", "HugePages_Free") and before.file_allocated is not None:
        assert after.file_allocated is not None
        return before.file_allocated - after.file_allocated
    if counter == "AnonPages":
        return before.mapping_anonymous - after.mapping_anonymous
    return before.mapping_rss - after.mapping_rss  # anon share=on: shmem pages it maps


def host_move(counter: str, before: int, after: int) -> int:
    """How much a host-wide counter says was freed (HugePages_Free counts up)."""
    return after - before if counter == "HugePages_Free" else before - after


def hugetlb_pages_needed(spec: MachineSpec) -> int:
    """Bytes of hugetlb memory the spec's backends need (0 when none is hugetlb)."""
    needed = 0
    backends: list[tuple[Backend, int]] = [(spec.backend, spec.memory)]
    if spec.virtio_mem is not None:
        backends.append((spec.virtio_mem.backend, spec.virtio_mem.size))
    for backend, size in backends:
        if isinstance(backend, MemfdBackend) and backend.hugetlb:
            needed += size
    return needed


def hugetlb_shortfall(spec: MachineSpec, meminfo: dict[str, int]) -> str | None:
    """Why the host cannot back `spec`'s hugetlb memory (a CANCEL reason), or None.

    `meminfo` is `parse_meminfo` output (HugePages_* are page counts, Hugepagesize bytes).
    Tests never reserve huge pages themselves: that changes the host for everyone.
    """
    needed = hugetlb_pages_needed(spec)
    if not needed:
        return None
    page = meminfo.get("Hugepagesize", 2 * MiB)
    pages = -(-needed // page)
    free = meminfo.get("HugePages_Free", 0)
    if free >= pages:
        return None
    return (
        f"the host has {free} free {page // MiB} MiB huge pages (HugePages_Total "
        f"{meminfo.get('HugePages_Total', 0)}); this variant needs {pages}: reserve them with "
        f"`echo {pages} > /proc/sys/vm/nr_hugepages` (tests never change host settings)"
    )
