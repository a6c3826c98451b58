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

from orchestrator.host.settle import Settled
from orchestrator.invariants.verdict import Tolerance, Verdict, within
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


# --- judging: the verdict arithmetic the scenarios share ------------------------------------

#: H2 tolerance on host drops: 10% (tp-qemu's balloon_check) or 4 MiB, whichever is larger.
#: Both in KiB, the unit of every memory verdict here.
DROP_TOLERANCE = Tolerance(absolute=4 * 1024, relative=0.10)
#: Host-wide counters also carry the rest of QEMU and of the host: 8 MiB more slack.
HOST_TOLERANCE = Tolerance(absolute=8 * 1024, relative=0.10)


def kib(nbytes: float) -> int:
    """Bytes -> KiB, rounded (verdicts speak KiB like /proc/meminfo)."""
    return round(nbytes / 1024)


def discard_verdict(
    summary: str, expected: int, discarded: int, failed: int, **evidence: object
) -> Verdict:
    """H2 from QEMU's own trace: the RAM discards that succeeded add up to exactly
    `expected` bytes (the trace counts what QEMU did, not what it was asked)."""
    return within(
        "H2",
        summary,
        expected=kib(expected),
        seen=kib(discarded),
        tolerance=Tolerance(),
        unit="KiB",
        failed_discards=failed,
        **evidence,
    )


def drop_verdicts(
    invariant: str,
    what: str,
    expect: DiscardExpectation,
    amount: int,
    before: BackingSample,
    after: BackingSample,
    tolerance: Tolerance = DROP_TOLERANCE,
) -> list[Verdict]:
    """H2 verdicts for a discard of `amount` bytes between two samples of one backend.

    One for what the host holds in total (`held`), one per part that can be read on
    its own (the fd's st_blocks; the private copies; QEMU's mapping's Rss), each
    with expected and seen in KiB.
    """
    info = before.info
    context = {
        "unit": "KiB",
        "backend": info.label,
        "mechanism": expect.mechanism,
        "source": expect.source,
        "note": expect.note,
        "before": before.to_json(),
        "after": after.to_json(),
    }
    size = f"{amount // MiB} MiB"
    summary = (
        f"{what} of {size}: the host's hold on {info.memdev} ({info.label}) fell by "
        f"{expect.held:g} x {size}"
        if expect.frees
        else f"{what} of {size}: by design the host keeps {info.memdev} ({info.label})"
    )
    verdicts = [
        within(invariant, summary, kib(expect.held * amount), kib(before.held - after.held),
               tolerance, **context)
    ]  # fmt: skip
    if before.file_allocated is not None and after.file_allocated is not None:
        verdicts.append(
            within(invariant, f"{what}: st_blocks of the backing fd fell by "
                   f"{expect.file or 0:g} x {size}", kib((expect.file or 0) * amount),
                   kib(before.file_allocated - after.file_allocated), tolerance, unit="KiB")
        )  # fmt: skip
        if not info.share and not info.hugetlb:
            verdicts.append(
                within(invariant, f"{what}: the private copies (Anonymous) fell by "
                       f"{expect.anonymous:g} x {size}", kib(expect.anonymous * amount),
                       kib(before.mapping_anonymous - after.mapping_anonymous), tolerance,
                       unit="KiB")
            )  # fmt: skip
        elif not info.hugetlb:
            verdicts.append(
                within(invariant, f"{what}: QEMU's mapping no longer maps the pages (Rss fell "
                       f"by {expect.held:g} x {size})", kib(expect.held * amount),
                       kib(before.mapping_rss - after.mapping_rss), tolerance, unit="KiB")
            )  # fmt: skip
    return verdicts


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


# Host-wide counters other work on the host moves by tens or hundreds of MiB at any time
# (a Python test runner's heap, a developer's own VM booting on a memfd): they corroborate,
# they cannot judge; QEMU's own backing (fd st_blocks, mapping Rss) is the judge. Huge
# pages are reserved and handed out only to those who ask, so HugePages_Free is judged.
SHARED_HOST_COUNTERS = frozenset({"AnonPages", "Shmem", "Cached"})


def host_verdict(
    invariant: str,
    what: str,
    counter: str,
    expected: int,
    host_before: Settled,
    host_after: Settled,
    tolerance: Tolerance = HOST_TOLERANCE,
) -> Verdict:
    """H2 on a host-wide counter: judged only when both readings settled.

    A counter that kept moving (another guest booting on the host) cannot be judged:
    the verdict is then not-applicable, with the samples, never a guess.
    """
    seen = kib(host_move(counter, host_before.value, host_after.value))
    if counter in SHARED_HOST_COUNTERS:
        return Verdict(
            invariant,
            "not-applicable",
            f"{what}: host-wide {counter} moves with every process on the host, so it is"
            " recorded, not judged (QEMU's own backing above is the judge)",
            expected=kib(expected),
            seen=seen,
            evidence={"unit": "KiB", "before": host_before.value, "after": host_after.value},
        )
    if not (host_before.ok and host_after.ok):
        return Verdict(
            invariant,
            "not-applicable",
            f"{what}: host-wide {counter} did not settle (other work on the host moved it)",
            evidence={"before": list(host_before.samples), "after": list(host_after.samples)},
        )
    return within(
        invariant,
        f"{what}: host-wide {counter} moved by what QEMU's backing gave back",
        kib(expected),
        seen,
        tolerance,
        unit="KiB",
        counter=counter,
        before=host_before.value,
        after=host_after.value,
    )


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
