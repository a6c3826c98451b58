"""guest_memfd on the host: uAPI refusals, host access, accounting and lifetime, end to end.

Direct ioctls on /dev/kvm, no QEMU (tier `gmem`). Every test checks one
behaviour, tagged and documented with its invariant ID (DESIGN.md section 4),
and before it ends also checks that the host kernel log stayed clean (H8) and
that everything it made was released (H9): no fd, mapping or child process
left, meminfo `Unevictable` back to its baseline.

Measured counters are host-wide, so every test holds the host lock
`meminfo` (`orchestrator/host/hostlock.py`) for its whole run: parallel
tests of this file wait for each other instead of measuring each other.

    avocado run scenarios/gmem_uapi.py --job-results-dir /tmp/cvmlab-results
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from orchestrator.errors import HostError
from orchestrator.host.baseline import HostBaseline
from orchestrator.host.fdalloc import fd_allocation
from orchestrator.host.meminfo import TRACKED, format_delta, meminfo_field, sample_meminfo
from orchestrator.host.settle import settle
from orchestrator.invariants.host_log import host_log_verdict
from orchestrator.invariants.host_memory import counter_move_verdict
from orchestrator.invariants.teardown import counter_return_verdict
from orchestrator.invariants.verdict import Tolerance, Verdict, holds, within
from orchestrator.kvm import libc, uapi
from orchestrator.kvm.child import ChildOutcome, run_in_child
from orchestrator.kvm.device import GuestMemfd, Kvm, Vm, errno_name
from orchestrator.kvm.facts import KvmFacts, kvm_facts, private_memory_types
from orchestrator.kvm.mapping import PAGE_SIZE, Mapping
from orchestrator.scenario import Scenario
from orchestrator.units import KiB, MiB

KERNEL = os.uname().release
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE

# Host-wide accounting: the signal (128 MiB, allocated in ~10 ms) is far above
# the noise of a shared machine over the few ms a step takes.
ALLOC = 128 * MiB
ACCOUNTING = Tolerance(absolute=4 * MiB, relative=0.10)
# A counter that must not move for this kind of file (e.g. Shmem for guest_memfd).
STILL = Tolerance(absolute=4 * MiB)
# Noise from the rest of the machine can spoil one measurement; a real
# accounting bug spoils every one. All attempts are kept as evidence.
ATTEMPTS = 3
SMALL = 4 * MiB  # files whose size does not matter
SIGBUS_DEADLINE = 10.0
RACE_SECONDS = 1.0
RACE_PUNCHES = 300
RACE_FAULTERS = 3

_Resource = TypeVar("_Resource", bound=AbstractContextManager[Any])


def overlapping_binding_errno(release: str) -> int:
    """The errno kvm_gmem_bind() gives a binding over an already bound file range.

    virt/kvm/guest_memfd.c, kvm_gmem_bind(): EINVAL through 6.18 (6.12 source; measured
    on a 6.18 host), EEXIST from 7.2 (7.2 and 7.3 sources; measured in the lab on 7.3).
    7.0 and 7.1 were not checked: they are expected as 7.2.
    """
    match = re.match(r"(\d+)\.(\d+)", release)
    version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    return errno.EEXIST if version >= (7, 0) else errno.EINVAL


def _errno_of(call: Callable[[], object]) -> tuple[int, str]:
    """(errno, message) that `call` failed with, or (0, "") when it succeeded."""
    try:
        call()
    except OSError as exc:
        return exc.errno or 0, str(exc)
    return 0, ""


@dataclass(frozen=True)
class StepDelta:
    """meminfo deltas (bytes) around one step, and whether Unevictable settled after it."""

    delta: dict[str, int]
    settled: bool

    def describe(self) -> str:
        text = format_delta(self.delta)
        return text if self.settled else text + " (Unevictable still moving)"


class GmemUapi(Scenario):
    """guest_memfd uAPI and host-side invariants on a default VM, through direct ioctls.

    :avocado: enable
    :avocado: tags=gmem,host,tier:gmem
    """

    tiers = ("gmem",)
    timeout = 60

    facts: KvmFacts
    kvm: Kvm
    vm: Vm
    baseline: HostBaseline

    # --- set-up, tear-down, H8/H9 ---------------------------------------------------

    def setUp(self) -> None:
        # Before super().setUp(), which may CANCEL: tearDown runs in any case.
        self._infra = ExitStack()
        self._owned = ExitStack()
        self._finished = False
        super().setUp()
        # The probe's facts (measured once per job, see Scenario.setUp), else measured now.
        self.facts = self.probe.kvm or kvm_facts()
        if not self.facts.usable:
            self.cancel(self.facts.reason)
        # Shorter than the test timeout, so a hung holder gives a CANCEL, not an interrupt.
        self.take_host_lock(45)
        try:
            self.baseline = self._infra.enter_context(HostBaseline())
        except HostError as error:
            self._infra.close()
            self.cancel(str(error))
        self.kvm = self.own(Kvm(self.facts.device))
        self.vm = self.own(self.kvm.create_vm())

    def tearDown(self) -> None:
        try:
            self._owned.close()
            if not self._finished and hasattr(self, "baseline"):
                self._save_host_log()
            self._infra.close()
        finally:
            super().tearDown()

    def own(self, resource: _Resource) -> _Resource:
        """Release `resource` (a context manager) at the end of the test, whatever happens."""
        self._owned.enter_context(resource)
        return resource

    def _save_host_log(self) -> None:
        delta = self.baseline.log.delta()
        (self.evidence_dir / "host-dmesg.txt").write_text(delta.text())

    def end_of_test(self) -> None:
        """The base class's finish phase: this file's H8/H9 first (once), then the base's."""
        if hasattr(self, "baseline"):
            self.finish()
        super().end_of_test()

    def finish(self) -> None:
        """Release everything the test made, then check H8 and H9 (once per test)."""
        if self._finished:
            return
        self._owned.close()
        report = self.baseline.report()
        self._finished = True
        (self.evidence_dir / "host-dmesg.txt").write_text(report.log.text())
        # Incomplete log with nothing found: recorded, never a pass (the test WARNs).
        self.record(host_log_verdict(report.log, "host kernel log has no bug signature"))
        self.record(
            holds(
                "H9",
                "no fd, mapping or child process left behind",
                not report.leftovers,
                leftovers=list(report.leftovers),
            )
        )
        for counter in report.counters:
            self.record(counter_return_verdict(counter))

    # --- helpers ----------------------------------------------------------------------

    def require_gmem_flags(self, flags: int) -> None:
        """CANCEL unless a default VM supports guest_memfd `flags` (MMAP needs 6.18)."""
        if self.facts.gmem_flags & flags != flags:
            self.cancel(
                f"KVM_CAP_GUEST_MEMFD_FLAGS on a default VM is {self.facts.gmem_flags:#x}, "
                f"this test needs {uapi.flag_names(flags, uapi.GMEM_FLAG_NAMES)} "
                f"(guest_memfd mmap support arrived in Linux 6.18; kernel {KERNEL})"
            )

    def require_default_vm_binding(self) -> None:
        """CANCEL unless a default VM takes guest_memfd memslots (KVM_MEM_GUEST_MEMFD).

        Before 6.18 only VM types with private memory may bind a guest_memfd
        (virt/kvm/kvm_main.c: check_memory_region_flags allows KVM_MEM_GUEST_MEMFD only
        when kvm_arch_has_private_mem(), and KVM_CAP_GUEST_MEMFD on such a VM fd is 0);
        6.12 gives EINVAL. From 6.18 a default VM binds one (its flags then include MMAP).
        """
        if self.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD) == 0 and not self.facts.gmem_flags:
            self.cancel(
                f"a default VM of kernel {KERNEL} cannot bind a guest_memfd memslot "
                "(KVM_CAP_GUEST_MEMFD on its VM fd is 0, no guest_memfd flags): binding "
                "needs a VM type with private memory before Linux 6.18"
            )

    def _create_and_close(self, size: int, flags: int) -> None:
        self.vm.create_guest_memfd(size, flags).close()

    def gmem(self, size: int = SMALL, flags: int = 0, vm: Vm | None = None) -> GuestMemfd:
        return self.own((vm or self.vm).create_guest_memfd(size, flags))

    def expect_errno(self, expected: int, what: str, call: Callable[[], object]) -> None:
        """H4: `call` fails with `expected`; else FAIL with expected and seen errno and kernel."""
        seen, message = _errno_of(call)
        self.check(
            Verdict(
                "H4",
                "pass" if seen == expected else "fail",
                f"{what} is refused with {errno_name(expected)} (kernel {KERNEL})",
                expected=errno_name(expected),
                seen=errno_name(seen) if seen else "success",
                evidence={"kernel": KERNEL, "error": message},
            )
        )

    def expect_success(self, invariant: str, what: str, call: Callable[[], object]) -> None:
        seen, message = _errno_of(call)
        self.check(
            Verdict(
                invariant,
                "pass" if seen == 0 else "fail",
                f"{what} is accepted (kernel {KERNEL})",
                expected="success",
                seen=errno_name(seen) if seen else "success",
                evidence={"kernel": KERNEL, "error": message},
            )
        )

    def expect_sigbus(self, invariant: str, what: str, outcome: ChildOutcome) -> None:
        """`what` ran in a child: the child must have died of SIGBUS, before the deadline."""
        ok = outcome.signal_number == signal.SIGBUS and not outcome.timed_out
        self.check(
            Verdict(
                invariant,
                "pass" if ok else "fail",
                f"{what} is answered with SIGBUS (kernel {KERNEL})",
                expected="child killed by SIGBUS",
                seen=outcome.describe(),
                evidence={"kernel": KERNEL},
            )
        )

    def scratch_memory(self, size: int) -> Mapping:
        """Anonymous memory for a memslot's `userspace_addr`."""
        return self.own(Mapping.anonymous(size))

    def bind(
        self,
        slot: int,
        gmem: GuestMemfd,
        *,
        gpa: int,
        size: int,
        offset: int,
        vm: Vm | None = None,
    ) -> None:
        memory = self.scratch_memory(size)
        (vm or self.vm).set_user_memory_region2(
            slot,
            guest_phys_addr=gpa,
            memory_size=size,
            userspace_addr=memory.address,
            guest_memfd=gmem,
            guest_memfd_offset=offset,
        )

    def step(self, action: Callable[[], object]) -> StepDelta:
        """Run `action` between two meminfo samples; the deltas of TRACKED fields in bytes.

        The second sample waits until `Unevictable` stops moving, since pages
        reach the LRU counters through per-CPU batches; whether it did is kept
        (an unsettled step is judged incomplete, never a pass).
        """
        before = sample_meminfo()
        action()
        settled = settle(lambda: meminfo_field("Unevictable"), tolerance=256 * KiB, interval=0.01)
        return StepDelta(sample_meminfo().delta(before, TRACKED), settled.ok)

    def accounting(
        self,
        kind: str,
        moves: tuple[str, ...],
        still: tuple[str, ...],
        run_once: Callable[[], tuple[list[StepDelta], dict[str, Any]]],
    ) -> dict[str, Any]:
        """H2: allocate ALLOC, punch half, close; `moves` follow each step, `still` stay put.

        `run_once` performs the three steps on a fresh file and returns their
        meminfo deltas (see `step`) and extra observations. A step spoiled by
        noise from the rest of the machine is measured again on a new file, up
        to ATTEMPTS times; verdicts come from the last attempt and carry the
        earlier ones as evidence. Returns the last attempt's extras.
        """
        half = ALLOC // 2
        plan = (("allocate 128 MiB", ALLOC), ("punch 64 MiB", -half), ("close", -half))
        history: list[list[str]] = []
        for attempt in range(1, ATTEMPTS + 1):
            steps, extras = run_once()
            history.append([s.describe() for s in steps])
            judged = [
                (label, name, amount if name in moves else 0, step, name in moves)
                for (label, amount), step in zip(plan, steps, strict=True)
                for name in (*moves, *still)
            ]
            ok = all(
                step.settled
                and (ACCOUNTING if moving else STILL).allows(expected, step.delta[name])
                for _, name, expected, step, moving in judged
            )
            if ok:
                break
            self.log.info("%s accounting off in attempt %d: %s", kind, attempt, history[-1])
        for label, name, expected, step, moving in judged:
            self.check(
                counter_move_verdict(
                    "H2",
                    f"{kind}: {label} moves {name} by {expected // MiB:+d} MiB",
                    expected,
                    step.delta[name],
                    ACCOUNTING if moving else STILL,
                    step.settled,
                    unit="bytes",
                    all_fields=step.describe(),
                    attempt=f"{attempt} of {ATTEMPTS}",
                    earlier_attempts=history[:-1],
                )
            )
        return extras

    # --- H4: refused requests ---------------------------------------------------------

    def test_create_refuses_size_zero(self) -> None:
        """H4: KVM_CREATE_GUEST_MEMFD with size 0 fails with EINVAL.

        :avocado: tags=H4
        """
        self.expect_errno(
            errno.EINVAL, "guest_memfd of size 0", lambda: self.vm.create_guest_memfd(0).close()
        )
        self.finish()

    def test_create_refuses_unaligned_size(self) -> None:
        """H4: KVM_CREATE_GUEST_MEMFD with a size that is not page aligned fails with EINVAL.

        :avocado: tags=H4
        """
        self.expect_errno(
            errno.EINVAL,
            f"guest_memfd of size {PAGE_SIZE + 1}",
            lambda: self.vm.create_guest_memfd(PAGE_SIZE + 1).close(),
        )
        self.finish()

    def test_create_refuses_every_unsupported_flag(self) -> None:
        """H4: each flag bit outside KVM_CAP_GUEST_MEMFD_FLAGS fails with EINVAL.

        :avocado: tags=H4
        """
        supported = self.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        wrong: dict[str, str] = {}
        tried = 0
        for bit in range(64):
            if supported & (1 << bit):
                continue
            tried += 1
            seen, _ = _errno_of(partial(self._create_and_close, SMALL, 1 << bit))
            if seen != errno.EINVAL:
                wrong[f"bit {bit}"] = errno_name(seen) if seen else "success"
        self.check(
            Verdict(
                "H4",
                "pass" if not wrong else "fail",
                f"each of the {tried} flag bits outside KVM_CAP_GUEST_MEMFD_FLAGS="
                f"{supported:#x} is refused with EINVAL (kernel {KERNEL})",
                expected="EINVAL for every bit",
                seen=wrong or "EINVAL for every bit",
                evidence={"kernel": KERNEL, "supported": supported},
            )
        )
        self.finish()

    def test_fallocate_without_keep_size_is_refused(self) -> None:
        """H4: fallocate without FALLOC_FL_KEEP_SIZE fails with EOPNOTSUPP.

        :avocado: tags=H4
        """
        gmem = self.gmem()
        self.expect_errno(
            errno.EOPNOTSUPP, "fallocate mode 0 (allocate)", lambda: gmem.fallocate(0, 0, PAGE_SIZE)
        )
        self.expect_errno(
            errno.EOPNOTSUPP,
            "fallocate PUNCH_HOLE without KEEP_SIZE",
            lambda: gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE, 0, PAGE_SIZE),
        )
        self.finish()

    def test_fallocate_zero_range_is_refused(self) -> None:
        """H4: fallocate modes other than KEEP_SIZE[|PUNCH_HOLE] fail with EOPNOTSUPP.

        :avocado: tags=H4
        """
        gmem = self.gmem()
        mode = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_ZERO_RANGE
        self.expect_errno(
            errno.EOPNOTSUPP,
            "fallocate KEEP_SIZE|ZERO_RANGE",
            lambda: gmem.fallocate(mode, 0, PAGE_SIZE),
        )
        self.finish()

    def test_unaligned_punch_is_refused(self) -> None:
        """H4: a hole punch with an unaligned offset or length fails with EINVAL.

        :avocado: tags=H4
        """
        gmem = self.gmem()
        self.expect_errno(errno.EINVAL, "punch at offset 1", lambda: gmem.punch_hole(1, PAGE_SIZE))
        self.expect_errno(errno.EINVAL, "punch of length 100", lambda: gmem.punch_hole(0, 100))
        self.finish()

    def test_unaligned_allocate_is_refused(self) -> None:
        """H4: an allocation with an unaligned offset or length fails with EINVAL.

        :avocado: tags=H4
        """
        gmem = self.gmem()
        self.expect_errno(errno.EINVAL, "allocate at offset 1", lambda: gmem.allocate(1, PAGE_SIZE))
        self.expect_errno(
            errno.EINVAL, "allocate of length 4095", lambda: gmem.allocate(0, PAGE_SIZE - 1)
        )
        self.finish()

    def test_allocate_past_eof_is_refused(self) -> None:
        """H4: an allocation that reaches past the end of the file fails with EINVAL.

        :avocado: tags=H4
        """
        gmem = self.gmem(SMALL)
        self.expect_errno(
            errno.EINVAL,
            "allocate straddling EOF",
            lambda: gmem.allocate(SMALL - PAGE_SIZE, 2 * PAGE_SIZE),
        )
        self.expect_errno(
            errno.EINVAL, "allocate starting at EOF", lambda: gmem.allocate(SMALL, PAGE_SIZE)
        )
        self.finish()

    def test_read_is_refused(self) -> None:
        """H4/H1: read() fails with EINVAL and pread() with ESPIPE: no read path to gmem.

        :avocado: tags=H4,H1
        """
        gmem = self.gmem()
        self.expect_errno(errno.EINVAL, "read()", lambda: os.read(gmem.fd, PAGE_SIZE))
        self.expect_errno(errno.ESPIPE, "pread()", lambda: os.pread(gmem.fd, PAGE_SIZE, 0))
        self.finish()

    def test_write_is_refused(self) -> None:
        """H4/H1: write() fails with EINVAL and pwrite() with ESPIPE: no write path to gmem.

        :avocado: tags=H4,H1
        """
        gmem = self.gmem()
        data = b"\xa5" * PAGE_SIZE
        self.expect_errno(errno.EINVAL, "write()", lambda: os.write(gmem.fd, data))
        self.expect_errno(errno.ESPIPE, "pwrite()", lambda: os.pwrite(gmem.fd, data, 0))
        self.finish()

    def test_mmap_without_mmap_flag_is_refused(self) -> None:
        """H4/H1: mmap of a guest_memfd created without GUEST_MEMFD_FLAG_MMAP fails with ENODEV.

        :avocado: tags=H4,H1
        """
        gmem = self.gmem(flags=0)
        self.expect_errno(errno.ENODEV, "mmap without MMAP", lambda: gmem.map().close())
        self.finish()

    def test_mmap_private_is_refused(self) -> None:
        """H4: MAP_PRIVATE (copy-on-write) of a guest_memfd fails with EINVAL.

        :avocado: tags=H4
        """
        self.require_gmem_flags(SHARED)
        gmem = self.gmem(flags=SHARED)
        self.expect_errno(errno.EINVAL, "MAP_PRIVATE", lambda: gmem.map(shared=False).close())
        self.finish()

    def test_ftruncate_is_refused(self) -> None:
        """H4: a guest_memfd's size is fixed: ftruncate fails with EINVAL.

        :avocado: tags=H4
        """
        gmem = self.gmem(SMALL)
        self.expect_errno(
            errno.EINVAL, "ftruncate to twice the size", lambda: os.ftruncate(gmem.fd, 2 * SMALL)
        )
        self.check(holds("H4", "the size is unchanged", os.fstat(gmem.fd).st_size == SMALL))
        self.finish()

    def test_bind_past_end_of_file_is_refused(self) -> None:
        """H4: a memslot whose guest_memfd range reaches past EOF fails with EINVAL.

        :avocado: tags=H4
        """
        gmem = self.gmem(SMALL)
        self.expect_errno(
            errno.EINVAL,
            "binding 2 MiB at offset size-1MiB",
            lambda: self.bind(1, gmem, gpa=0, size=2 * MiB, offset=SMALL - MiB),
        )
        self.finish()

    def test_bind_at_unaligned_offset_is_refused(self) -> None:
        """H4: a memslot at an unaligned guest_memfd offset fails with EINVAL.

        :avocado: tags=H4
        """
        gmem = self.gmem(SMALL)
        self.expect_errno(
            errno.EINVAL,
            "binding at guest_memfd offset 0x800",
            lambda: self.bind(1, gmem, gpa=0, size=MiB, offset=2 * KiB),
        )
        self.finish()

    def test_bind_overlapping_range_is_refused(self) -> None:
        """H4: a second memslot on a bound guest_memfd range fails (EINVAL; EEXIST from 7.x).

        The two slots have disjoint guest physical ranges, so only the
        overlap inside the file can be the reason.

        :avocado: tags=H4
        """
        self.require_default_vm_binding()
        gmem = self.gmem(SMALL)
        self.bind(1, gmem, gpa=0, size=2 * MiB, offset=0)
        self.expect_errno(
            overlapping_binding_errno(KERNEL),
            "binding file range [1 MiB, 3 MiB) over a binding of [0, 2 MiB)",
            lambda: self.bind(2, gmem, gpa=0x10000000, size=2 * MiB, offset=MiB),
        )
        self.finish()

    def test_bind_guest_memfd_of_another_vm_is_refused(self) -> None:
        """H4: a memslot of one VM on another VM's guest_memfd fails with EINVAL.

        :avocado: tags=H4
        """
        other = self.own(self.kvm.create_vm())
        foreign = self.gmem(SMALL, vm=other)
        self.expect_errno(
            errno.EINVAL,
            "binding a guest_memfd created by another VM",
            lambda: self.bind(1, foreign, gpa=0, size=MiB, offset=0),
        )
        self.finish()

    def test_bind_of_an_fd_that_is_no_guest_memfd_is_refused(self) -> None:
        """H4: a memslot on a regular memfd, on the VM fd or on the kvm fd fails with EINVAL
        (kvm_gmem_bind: the file's f_op is not kvm_gmem_fops; 7.3 source).

        :avocado: tags=H4
        """
        self.require_default_vm_binding()
        memfd = os.memfd_create("cvmlab-not-a-guest-memfd", os.MFD_CLOEXEC)
        self._owned.callback(os.close, memfd)
        os.ftruncate(memfd, SMALL)
        memory = self.scratch_memory(MiB)
        for name, fd in (("a regular memfd", memfd), ("the VM fd", self.vm.fd),
                         ("the kvm fd", self.kvm.fd)):  # fmt: skip
            self.expect_errno(
                errno.EINVAL,
                f"binding {name} as a guest_memfd",
                partial(
                    self.vm.set_user_memory_region2, 1, guest_phys_addr=0, memory_size=MiB,
                    userspace_addr=memory.address, guest_memfd=fd, guest_memfd_offset=0,
                ),
            )  # fmt: skip
        self.finish()

    def test_rebinding_after_the_memslot_is_deleted_is_accepted(self) -> None:
        """H4: deleting a memslot unbinds its guest_memfd range (kvm_gmem_unbind): the same
        range binds again to a new slot.

        :avocado: tags=H4
        """
        self.require_default_vm_binding()
        gmem = self.gmem(SMALL)
        self.bind(1, gmem, gpa=0, size=2 * MiB, offset=0)
        self.vm.delete_memslot(1)
        self.expect_success(
            "H4",
            "binding [0, 2 MiB) again after its memslot was deleted",
            lambda: self.bind(2, gmem, gpa=0x10000000, size=2 * MiB, offset=0),
        )
        self.finish()

    def test_two_non_overlapping_bindings_are_accepted(self) -> None:
        """H4: one guest_memfd may back two memslots on disjoint file ranges.

        :avocado: tags=H4
        """
        self.require_default_vm_binding()
        gmem = self.gmem(SMALL)
        self.expect_success(
            "H4", "binding [0, 2 MiB)", lambda: self.bind(1, gmem, gpa=0, size=2 * MiB, offset=0)
        )
        self.expect_success(
            "H4",
            "binding [2 MiB, 4 MiB) to another slot",
            lambda: self.bind(2, gmem, gpa=0x10000000, size=2 * MiB, offset=2 * MiB),
        )
        self.finish()

    # --- H1, H3: host access through the mapping ------------------------------------

    def test_host_read_without_init_shared_is_sigbus(self) -> None:
        """H1: with MMAP but not INIT_SHARED the memory is private: a host read is SIGBUS.

        :avocado: tags=H1
        """
        self.require_gmem_flags(MMAP)
        gmem = self.gmem(SMALL, flags=MMAP)
        gmem.allocate(0, SMALL)
        mapping = self.own(gmem.map())
        outcome = run_in_child(lambda: mapping.touch(0), timeout=SIGBUS_DEADLINE)
        self.expect_sigbus("H1", "host read of private guest_memfd memory", outcome)
        self.finish()

    def test_init_shared_pages_read_zero_at_first(self) -> None:
        """H3: a fresh MMAP|INIT_SHARED guest_memfd reads as zeros everywhere.

        :avocado: tags=H3
        """
        self.require_gmem_flags(SHARED)
        gmem = self.gmem(SMALL, flags=SHARED)
        mapping = self.own(gmem.map())
        nonzero = [
            page
            for page in range(SMALL // PAGE_SIZE)
            if mapping.read(page * PAGE_SIZE, PAGE_SIZE).count(0) != PAGE_SIZE
        ]
        self.check(
            holds(
                "H3",
                "every page of a new guest_memfd reads zero",
                not nonzero,
                nonzero_pages=nonzero[:16],
            )
        )
        self.finish()

    def test_punched_page_reads_zero_and_neighbours_keep_pattern(self) -> None:
        """H3: after a pattern and a punch of one middle page, it reads zero, the rest keep it.

        :avocado: tags=H3
        """
        self.require_gmem_flags(SHARED)
        pages = 16
        gmem = self.gmem(pages * PAGE_SIZE, flags=SHARED)
        mapping = self.own(gmem.map())

        def pattern(page: int) -> bytes:
            return bytes([(page * 37 + 11) & 0xFF or 1]) * PAGE_SIZE

        for page in range(pages):
            mapping.write(page * PAGE_SIZE, pattern(page))
        hole = pages // 2
        gmem.punch_hole(hole * PAGE_SIZE, PAGE_SIZE)
        punched = mapping.read(hole * PAGE_SIZE, PAGE_SIZE)
        self.check(holds("H3", f"punched page {hole} reads zero", punched.count(0) == PAGE_SIZE))
        changed = [
            page
            for page in range(pages)
            if page != hole and mapping.read(page * PAGE_SIZE, PAGE_SIZE) != pattern(page)
        ]
        self.check(
            holds("H3", "every other page keeps its pattern", not changed, changed_pages=changed)
        )
        self.finish()

    def test_access_past_eof_is_sigbus(self) -> None:
        """H3: a mapping longer than the file faults with SIGBUS past EOF, not before.

        :avocado: tags=H3
        """
        self.require_gmem_flags(SHARED)
        gmem = self.gmem(SMALL, flags=SHARED)
        mapping = self.own(gmem.map(2 * SMALL))
        inside = run_in_child(lambda: mapping.touch(SMALL - 1), timeout=SIGBUS_DEADLINE)
        self.check(
            holds(
                "H3",
                f"a read before EOF works ({inside.describe()})",
                inside.exit_code == 0,
                seen=inside.describe(),
            )
        )
        outside = run_in_child(lambda: mapping.touch(SMALL), timeout=SIGBUS_DEADLINE)
        self.expect_sigbus("H3", "a read of the first page past EOF", outside)
        self.finish()

    # --- H2, H9: accounting -----------------------------------------------------------

    def test_gmem_allocation_moves_unevictable_and_cached(self) -> None:
        """H2/H9: allocate, punch half, close: Unevictable, Cached follow; Shmem, st_blocks don't.

        The suite's smoke test: it needs no guest_memfd flag, so it runs on every kernel.

        :avocado: tags=H2,H9,smoke
        """

        def run_once() -> tuple[list[StepDelta], dict[str, Any]]:
            gmem = self.vm.create_guest_memfd(ALLOC, 0)
            try:
                allocated = self.step(partial(gmem.allocate, 0, ALLOC))
                blocks = fd_allocation(gmem.fd).blocks
                punched = self.step(partial(gmem.punch_hole, 0, ALLOC // 2))
            finally:
                closed = self.step(gmem.close)
            return [allocated, punched, closed], {"st_blocks": blocks}

        extras = self.accounting(
            "guest_memfd", ("Unevictable", "Cached"), ("Shmem", "Mlocked"), run_once
        )
        self.check(
            holds(
                "H2",
                "st_blocks of a guest_memfd stays 0 with 128 MiB allocated",
                extras["st_blocks"] == 0,
                st_blocks=extras["st_blocks"],
            )
        )
        self.finish()

    def test_memfd_allocation_moves_shmem_and_st_blocks(self) -> None:
        """H2/H9: the same steps on a memfd move Shmem, Cached and st_blocks; not Unevictable.

        The side-by-side counterpart of the guest_memfd accounting test.

        :avocado: tags=H2,H9
        """

        def run_once() -> tuple[list[StepDelta], dict[str, Any]]:
            fd = os.memfd_create("cvmlab-h2", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, ALLOC)
                allocated = self.step(partial(libc.fallocate, fd, 0, 0, ALLOC))
                full = fd_allocation(fd).allocated
                punched = self.step(partial(libc.fallocate, fd, PUNCH, 0, ALLOC // 2))
                half = fd_allocation(fd).allocated
            finally:
                closed = self.step(partial(os.close, fd))
            return [allocated, punched, closed], {"full": full or 0, "half": half or 0}

        extras = self.accounting("memfd", ("Shmem", "Cached"), ("Unevictable", "Mlocked"), run_once)
        self.check(
            within(
                "H2",
                "memfd st_blocks*512 equals the 128 MiB allocated",
                ALLOC,
                extras["full"],
                Tolerance(),
                unit="bytes",
            )
        )
        self.check(
            within(
                "H2",
                "memfd st_blocks*512 is 64 MiB after punching half",
                ALLOC // 2,
                extras["half"],
                Tolerance(),
                unit="bytes",
            )
        )
        self.finish()

    # --- H5: lifetime -----------------------------------------------------------------

    def test_guest_memfd_outlives_its_vm(self) -> None:
        """H5: with the VM fd closed first, allocate, punch and close still work, log clean.

        The guest_memfd is bound to a memslot before the VM fd goes, so its
        release also walks a binding of a VM that userspace no longer holds.

        :avocado: tags=H5
        """
        self.require_default_vm_binding()
        vm = self.own(self.kvm.create_vm())
        gmem = self.gmem(ALLOC, vm=vm)
        self.bind(1, gmem, gpa=0, size=2 * MiB, offset=0, vm=vm)
        vm.close()
        self.expect_success(
            "H5", "allocate 128 MiB after the VM fd is closed", lambda: gmem.allocate(0, ALLOC)
        )
        self.expect_success("H5", "punch all of it", lambda: gmem.punch_hole(0, ALLOC))
        # All of it again, so that a close that leaks the folios leaves far more than
        # H9's tolerance (4 MiB) behind in Unevictable.
        self.expect_success(
            "H5", "allocate 128 MiB again", lambda: gmem.allocate(0, ALLOC)
        )
        self.expect_success("H5", "close the guest_memfd", gmem.close)
        self.finish()

    # --- H6: unmovable, unevictable -----------------------------------------------------
    # Judged in scenarios/gmem_accounting.py (memcg unevictable charge, memory.reclaim,
    # memory.max, /proc/kpageflags, compaction): the drop_caches check that stood here
    # could not fail, since guest_memfd pages are never clean page cache.

    # --- race: faults against punches -------------------------------------------------

    def test_fault_and_punch_race(self) -> None:
        """H3/H8/H9: threads faulting pages while another punches them: no crash, zeros after.

        The race runs in a child process, so a crash there becomes a FAIL
        naming the signal here; it is bounded by RACE_SECONDS and RACE_PUNCHES.

        :avocado: tags=H3,H8,H9,race,stress
        """
        self.require_gmem_flags(SHARED)
        size = 16 * MiB
        pages = size // PAGE_SIZE
        gmem = self.gmem(size, flags=SHARED)
        mapping = self.own(gmem.map())
        read_end, write_end = os.pipe()

        def race() -> None:
            stop = threading.Event()
            faults = [0] * RACE_FAULTERS
            errors: list[str] = []

            def fault(index: int) -> None:
                try:
                    page = index
                    while not stop.is_set():
                        mapping.write((page % pages) * PAGE_SIZE, b"\x5a")
                        faults[index] += 1
                        page += RACE_FAULTERS
                except Exception as exc:  # reported to the parent through the pipe
                    errors.append(repr(exc))

            threads = [threading.Thread(target=fault, args=(i,)) for i in range(RACE_FAULTERS)]
            for thread in threads:
                thread.start()
            punches = 0
            deadline = time.monotonic() + RACE_SECONDS
            try:
                while punches < RACE_PUNCHES and time.monotonic() < deadline:
                    gmem.punch_hole(0, size)
                    punches += 1
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
            gmem.punch_hole(0, size)
            report = {"punches": punches, "faults": faults, "errors": errors}
            os.write(write_end, json.dumps(report).encode())
            if errors:
                raise RuntimeError(errors[0])

        try:
            outcome = run_in_child(race, timeout=RACE_SECONDS + 20)
            os.close(write_end)
            write_end = -1
            raw = os.read(read_end, 65536)
        finally:
            if write_end >= 0:
                os.close(write_end)
            os.close(read_end)
        report = json.loads(raw) if raw else {}
        self.check(
            holds(
                "H8",
                f"the racing child finished cleanly ({outcome.describe()})",
                outcome.exit_code == 0,
                **report,
            )
        )
        self.check(
            holds(
                "H3",
                "punches and faults both happened",
                report.get("punches", 0) > 0 and sum(report.get("faults", [0])) > 0,
                **report,
            )
        )
        nonzero = [
            page
            for page in range(pages)
            if mapping.read(page * PAGE_SIZE, PAGE_SIZE).count(0) != PAGE_SIZE
        ]
        self.check(
            holds(
                "H3",
                "after the final punch every page reads zero",
                not nonzero,
                nonzero_pages=nonzero[:16],
            )
        )
        self.finish()

    # --- conversions (private-memory VM types only) --------------------------------------

    def private_vm(self) -> Vm:
        """A VM of a type with private memory, or CANCEL saying why there is none."""
        types = private_memory_types(self.facts)
        if not types:
            attrs = ", ".join(
                f"{uapi.VM_TYPE_NAMES.get(t, t)}={a:#x}"
                for t, a in self.facts.memory_attributes.items()
            )
            self.cancel(
                f"no VM type with private memory: KVM_CAP_VM_TYPES={self.facts.vm_types:#x}, "
                f"KVM_CAP_MEMORY_ATTRIBUTES per type: {attrs} (needs KVM_X86_SW_PROTECTED_VM, "
                f"SNP or TDX; kernel {KERNEL})"
            )
        return self.own(self.kvm.create_vm(types[0]))

    def test_memory_attributes_convert_to_private_and_back(self) -> None:
        """H4: KVM_SET_MEMORY_ATTRIBUTES sets PRIVATE on ranges and clears it again.

        Lab-only on x86: needs a private-memory VM type (sw-protected, SNP, TDX).

        :avocado: tags=H4,conversion,tier:sw-protected
        """
        vm = self.private_vm()
        private = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
        for what, address, size, attributes in (
            ("[0, 2 MiB) to private", 0, 2 * MiB, private),
            ("one page [4 MiB, +4 KiB) to private", 4 * MiB, PAGE_SIZE, private),
            ("[1 MiB, +4 KiB) inside a private range back to shared", MiB, PAGE_SIZE, 0),
            ("[0, 2 MiB) back to shared", 0, 2 * MiB, 0),
            ("[4 MiB, +4 KiB) back to shared", 4 * MiB, PAGE_SIZE, 0),
        ):
            self.expect_success(
                "H4",
                f"KVM_SET_MEMORY_ATTRIBUTES {what}",
                partial(vm.set_memory_attributes, address, size, attributes),
            )
        self.finish()

    def test_memory_attributes_refuse_invalid_ranges_and_flags(self) -> None:
        """H4: KVM_SET_MEMORY_ATTRIBUTES refuses bad flags, attributes and ranges with EINVAL.

        Lab-only on x86: needs a private-memory VM type (sw-protected, SNP, TDX).

        :avocado: tags=H4,conversion,tier:sw-protected
        """
        vm = self.private_vm()
        private = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
        for what, address, size, attributes, flags in (
            ("non-zero flags", 0, PAGE_SIZE, private, 1),
            ("an unsupported attribute bit", 0, PAGE_SIZE, 1 << 0, 0),
            ("size 0", 0, 0, private, 0),
            ("an unaligned address", 1, PAGE_SIZE, private, 0),
            ("an unaligned size", 0, PAGE_SIZE + 1, private, 0),
            ("a range that wraps around", 2**64 - PAGE_SIZE, 2 * PAGE_SIZE, private, 0),
        ):
            self.expect_errno(
                errno.EINVAL,
                f"KVM_SET_MEMORY_ATTRIBUTES with {what}",
                partial(vm.set_memory_attributes, address, size, attributes, flags),
            )
        self.finish()
