"""Host access matrix (H1): every host path into a guest_memfd mapping, per flag set.

For a private mapping (MMAP without INIT_SHARED: every host fault is refused,
virt/kvm/guest_memfd.c `kvm_gmem_fault_user_mapping` returns VM_FAULT_SIGBUS for
pages not shared) and an INIT_SHARED one, each path of
`orchestrator/kvm/host_access.py` (CPU read and write, /proc/pid/mem,
process_vm_readv, O_DIRECT read into it, vmsplice, io_uring fixed buffers) is
tried in a child: private refuses every one (SIGBUS or an errno), shared lets
every one through. Then a punch while a vmsplice pin is held (H2/H3). H8 and
H9 after every test (the finish phase of `KvmScenario`).

    cvmlab lab --kernel 7.3 -- .venv/bin/avocado run scenarios/gmem_access.py
"""

from __future__ import annotations

from orchestrator.invariants.gmem_host import (
    access_as_expected,
    pin_survives_punch,
    released_only_when_pin_drops,
)
from orchestrator.invariants.verdict import Tolerance
from orchestrator.kvm import uapi
from orchestrator.kvm.host_access import PATHS, PipePin, try_path
from orchestrator.kvm.mapping import PAGE_SIZE
from orchestrator.kvm_scenario import KvmScenario
from orchestrator.units import MiB

MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
PIN_SIZE = 16 * MiB
RELEASE = Tolerance(absolute=2 * MiB, relative=0.15)


class GmemHostAccess(KvmScenario):
    """Each host access path against private and shared guest_memfd mappings.

    :avocado: enable
    :avocado: tags=gmem,host,access,tier:gmem
    """

    def matrix(self, flags: int, expect_accessible: bool) -> None:
        self.require_gmem_flags(flags)
        vm = self.own(self.kvm.create_vm())
        gmem = self.gmem(vm, 4 * PAGE_SIZE, flags)
        gmem.allocate(0, 4 * PAGE_SIZE)
        mapping = self.own(gmem.map())
        name = uapi.flag_names(flags, uapi.GMEM_FLAG_NAMES)
        for page, path in enumerate(sorted(PATHS)):
            result = try_path(path, mapping, (page % 4) * PAGE_SIZE)
            self.log.info("%s %s: %s", name, path, result.result)
            self.record(access_as_expected(name, path, expect_accessible, result.result))
        # record() does not stop at a failure: every path is tried, then the test fails.
        failed = [v.line() for v in self.verdicts.verdicts if v.failed]
        if failed:
            self.fail(failed[0])

    def test_private_mapping_refuses_every_host_path(self) -> None:
        """H1: MMAP without INIT_SHARED: every host access path is refused.

        :avocado: tags=H1
        """
        self.matrix(MMAP, expect_accessible=False)

    def test_shared_mapping_allows_every_host_path(self) -> None:
        """H1 (control): MMAP|INIT_SHARED: every host access path gets through.

        The control that shows each path works at all, so the private refusals
        above are the kernel's doing and not a broken probe.

        :avocado: tags=H1
        """
        self.matrix(SHARED, expect_accessible=True)

    def test_punch_while_pinned_keeps_pin_and_frees_on_unpin(self) -> None:
        """H2/H3: vmsplice pins 16 MiB of a shared guest_memfd; a punch of it makes the mapping
        read zero while the pipe still holds the old bytes; memory is freed only when the pin drops.

        :avocado: tags=H2,H3,pin
        """
        self.require_gmem_flags(SHARED)
        vm = self.own(self.kvm.create_vm())
        gmem = self.gmem(vm, PIN_SIZE, SHARED)
        mapping = self.own(gmem.map())
        old = b"cvmlab-pinned-old-bytes!" * 4
        for offset in range(0, PIN_SIZE, PAGE_SIZE):
            mapping.write(offset, old)
        pin = self.own(PipePin(mapping, 0, PIN_SIZE))
        before = self.unevictable()
        gmem.punch_hole(0, PIN_SIZE)
        punched = self.unevictable()
        through_mapping = mapping.read(0, len(old))  # faults in one fresh zero page
        held = self.unevictable()
        # Reading the pipe consumes its buffers and so drops their page references: the
        # pin ends with this read, not at close (the 7.3 lab freed all 16 MiB in it).
        through_pin = pin.read_all()
        pin.close()
        unpinned = self.unevictable()
        for verdict in pin_survives_punch(old, through_pin, through_mapping):
            self.check(verdict)
        for verdict in released_only_when_pin_drops(
            PIN_SIZE, before.value - punched.value, held.value - unpinned.value, RELEASE,
            settled=(before.ok and punched.ok, held.ok and unpinned.ok),
        ):  # fmt: skip
            self.check(verdict)
