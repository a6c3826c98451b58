"""guest_memfd accounting (H6): charged to the memcg, unevictable, unreclaimable, unmovable.

The allocation happens in a cgroup v2 child (`orchestrator/host/cgroup.py`) from a
forked process, so a memcg OOM kill never hits the test: `memory.stat` shows it
unevictable, `memory.reclaim` frees none of it, a `memory.max` below it makes the
allocation fail or be OOM-killed, `/proc/kpageflags` flags its PFNs UNEVICTABLE,
and compaction neither moves nor loses the pages. This replaces the old
drop_caches check of gmem_uapi.py, which could not fail (guest_memfd pages are
not clean page cache that drop_caches would take). H8/H9 after every test.

    cvmlab lab --kernel 7.3 -- .venv/bin/avocado run scenarios/gmem_accounting.py
"""

from __future__ import annotations

import errno
import os
import struct

from orchestrator.errors import HostError
from orchestrator.host.cgroup import MemoryCgroup
from orchestrator.host.pagemap import pfns
from orchestrator.host.settle import settle
from orchestrator.invariants.gmem_host import (
    charged_unevictable,
    kpageflags_unevictable,
    limit_refuses,
    pfns_kept,
    reclaim_freed_none,
)
from orchestrator.invariants.gmem_vcpu import values_match
from orchestrator.invariants.verdict import Tolerance
from orchestrator.kvm import uapi
from orchestrator.kvm.device import GuestMemfd
from orchestrator.kvm.mapping import PAGE_SIZE
from orchestrator.kvm_scenario import KvmScenario
from orchestrator.units import KiB, MiB

SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
ALLOC = 64 * MiB
CHARGE = Tolerance(absolute=2 * MiB, relative=0.05)


class GmemAccounting(KvmScenario):
    """guest_memfd pages in a memory cgroup, in kpageflags, under compaction.

    :avocado: enable
    :avocado: tags=gmem,host,H6,tier:gmem
    """

    def cgroup(self) -> MemoryCgroup:
        try:
            return self.own(MemoryCgroup())
        except HostError as error:
            self.cancel(str(error))
            raise  # unreachable: cancel raises

    def unevictable_in(self, group: MemoryCgroup) -> int:
        return settle(lambda: group.stat().get("unevictable", 0), tolerance=64 * KiB).value

    def allocate_inside(self, group: MemoryCgroup, gmem: GuestMemfd) -> str:
        """fallocate ALLOC from a child inside `group`: "ok", the errno name, or the signal."""

        def allocate() -> None:
            try:
                gmem.allocate(0, ALLOC)
            except OSError as exc:
                os._exit(exc.errno or 1)

        outcome = group.run_inside(allocate)
        if outcome.signal_number is not None:
            return outcome.killed_by
        code = outcome.exit_code or 0
        return "ok" if code == 0 else errno.errorcode.get(code, f"exit {code}")

    def charged_gmem(self) -> tuple[MemoryCgroup, GuestMemfd]:
        group = self.cgroup()
        vm = self.own(self.kvm.create_vm())
        gmem = self.gmem(vm, ALLOC)
        # Uncharge before the cgroup goes: punch on every path out of the test.
        self.defer(lambda: gmem.punch_hole(0, ALLOC) if not gmem.closed else None)
        return group, gmem

    def test_allocation_is_charged_unevictable(self) -> None:
        """H6: an allocation inside a memcg grows its memory.stat unevictable by the size.

        :avocado: tags=H6
        """
        group, gmem = self.charged_gmem()
        before = self.unevictable_in(group)
        result = self.allocate_inside(group, gmem)
        if result != "ok":
            self.error(f"fallocate of {ALLOC} bytes inside the cgroup failed: {result}")
        self.check(charged_unevictable(ALLOC, self.unevictable_in(group) - before, CHARGE))

    def test_reclaim_frees_none_of_it(self) -> None:
        """H6: memory.reclaim asking for the whole allocation takes none of it.

        :avocado: tags=H6
        """
        group, gmem = self.charged_gmem()
        if self.allocate_inside(group, gmem) != "ok":
            self.error("fallocate inside the cgroup failed")
        before = self.unevictable_in(group)
        try:
            group.write("memory.reclaim", str(ALLOC))
        except OSError as exc:  # EAGAIN: the kernel could not reclaim the amount (expected)
            self.log.info("memory.reclaim: %s", exc)
        self.check(reclaim_freed_none(before, self.unevictable_in(group), CHARGE, ALLOC))

    def test_memory_max_below_the_allocation_refuses_it(self) -> None:
        """H6: with memory.max at half the allocation, fallocate fails or is OOM-killed and the
        cgroup never holds more than its limit.

        :avocado: tags=H6
        """
        group, gmem = self.charged_gmem()
        limit = ALLOC // 2
        group.write("memory.max", str(limit))
        result = self.allocate_inside(group, gmem)
        self.check(limit_refuses(group.current(), limit, result, group.events().get("oom_kill", 0)))

    def test_kpageflags_mark_the_pages_unevictable(self) -> None:
        """H6: /proc/kpageflags has UNEVICTABLE on the PFN of every allocated page.

        :avocado: tags=H6
        """
        self.require_gmem_flags(SHARED)
        vm = self.own(self.kvm.create_vm())
        size = 4 * MiB
        gmem = self.gmem(vm, size, SHARED)
        gmem.allocate(0, size)
        mapping = self.own(gmem.map())
        for offset in range(0, size, PAGE_SIZE):
            mapping.read(offset, 1)  # map each page, so pagemap names its PFN
        frames = pfns(mapping.address, size // PAGE_SIZE)
        self.check(kpageflags_unevictable(_kpageflags(frames), cpus=os.cpu_count() or 1))

    def test_compaction_neither_moves_nor_loses_pages(self) -> None:
        """H6: after /proc/sys/vm/compact_memory every page has the same PFN and its data.

        :avocado: tags=H6
        """
        self.require_gmem_flags(SHARED)
        vm = self.own(self.kvm.create_vm())
        pages = ALLOC // PAGE_SIZE
        gmem = self.gmem(vm, ALLOC, SHARED)
        mapping = self.own(gmem.map())
        for page in range(pages):
            mapping.write(page * PAGE_SIZE, (page ^ 0x6E6E).to_bytes(4, "little"))
        before = pfns(mapping.address, pages)
        with open("/proc/sys/vm/compact_memory", "w", encoding="ascii") as knob:
            knob.write("1")
        after = pfns(mapping.address, pages)
        self.check(pfns_kept(before, after))
        seen = [int.from_bytes(mapping.read(p * PAGE_SIZE, 4), "little") for p in range(pages)]
        self.check(values_match("H6", "data intact after compaction",
                                [p ^ 0x6E6E for p in range(pages)], seen))  # fmt: skip


def _kpageflags(frames: list[int | None]) -> list[int | None]:
    """The /proc/kpageflags word of each PFN (None for a page not present)."""
    fd = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return [
            None if pfn is None else struct.unpack("<Q", os.pread(fd, 8, pfn * 8))[0]
            for pfn in frames
        ]
    finally:
        os.close(fd)
