"""The base of host-level KVM scenarios (guest_memfd under a vCPU, access, accounting).

Scenario layer: subclasses `orchestrator.scenario.Scenario` (no QEMU, image or
guest layers behind it) and adds what every direct-ioctl test needs:
- the host lock `meminfo`, so parallel tests do not measure each other;
- a `HostBaseline` before the test makes anything, and the finish phase
  after it released everything: H9 (no fd, VM, mapping, child left;
  `Unevictable` back to baseline) and H8 (host log clean) judged after every
  test, without the test asking;
- `own()` to release any resource on every path (exception, timeout, cancel);
- helpers that turn errnos into H4 verdicts and CANCEL on missing flags.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any, TypeVar

from orchestrator.errors import HostError
from orchestrator.host.baseline import HostBaseline
from orchestrator.host.hostlock import HostLock
from orchestrator.host.meminfo import meminfo_field
from orchestrator.host.settle import Settled, settle
from orchestrator.invariants.gmem_vcpu import errno_is
from orchestrator.invariants.teardown import counter_return_verdict
from orchestrator.invariants.verdict import holds
from orchestrator.kvm import uapi
from orchestrator.kvm.device import GuestMemfd, Kvm, Vm
from orchestrator.kvm.facts import KvmFacts, kvm_facts
from orchestrator.kvm.vcpu import TinyVm
from orchestrator.scenario import Scenario
from orchestrator.units import KiB

KERNEL = os.uname().release
_Resource = TypeVar("_Resource", bound=AbstractContextManager[Any])


def errno_of(call: Callable[[], object]) -> tuple[int, str]:
    """(errno, message) that `call` failed with, or (0, "") when it succeeded."""
    try:
        call()
    except OSError as exc:
        return exc.errno or 0, str(exc)
    return 0, ""


class KvmScenario(Scenario):
    """Direct /dev/kvm tests with H8/H9 judged after each one.

    :avocado: disable
    """

    tiers: tuple[str, ...] = ("gmem",)
    timeout = 300  # the lab runs under TCG on a shared machine: set-up alone can take a minute

    facts: KvmFacts
    kvm: Kvm
    baseline: HostBaseline

    def setUp(self) -> None:
        # Before super().setUp(), which may CANCEL: tearDown runs in any case.
        self._infra = ExitStack()
        self._owned = ExitStack()
        super().setUp()
        # The probe's facts (measured once per job, see Scenario.setUp), else measured now.
        self.facts = self.probe.kvm or kvm_facts()
        if not self.facts.usable:
            self.cancel(self.facts.reason)
        try:
            # Shorter than the test timeout, so a hung holder gives a CANCEL, not an interrupt.
            self._infra.enter_context(HostLock("meminfo", timeout=60))
            self.baseline = self._infra.enter_context(HostBaseline())
        except HostError as error:
            self._infra.close()
            self.cancel(str(error))
        self.kvm = self.own(Kvm(self.facts.device))

    def tearDown(self) -> None:
        """Release what is left (a cancelled or broken test never reached `finish`)."""
        try:
            self._owned.close()
            self._infra.close()
        finally:
            super().tearDown()

    def own(self, resource: _Resource) -> _Resource:
        """Release `resource` at the end of the test, whatever happens."""
        self._owned.enter_context(resource)
        return resource

    def defer(self, release: Callable[[], object]) -> None:
        """Run `release` at the end of the test (before H9 is judged), whatever happens."""
        self._owned.callback(release)

    def end_of_test(self) -> None:
        """The finish phase (run by `Scenario` after the test method): release everything
        the test made, then judge H9 here and H8 in the base class."""
        self._owned.close()
        baseline = getattr(self, "baseline", None)
        if baseline is not None:
            report = baseline.report()
            self.record(
                holds(
                    "H9",
                    "no fd, VM, mapping or child process left behind",
                    not report.leftovers,
                    leftovers=list(report.leftovers),
                )
            )
            for counter in report.counters:
                self.record(counter_return_verdict(counter))
        # The base class's finish phase is being renamed finish -> end_of_test: call either.
        parent = getattr(super(), "end_of_test", None) or getattr(super(), "finish")  # noqa: B009
        parent()

    finish = end_of_test

    # --- helpers ----------------------------------------------------------------------

    def require_gmem_flags(self, flags: int) -> None:
        """CANCEL unless a default VM supports guest_memfd `flags` (MMAP needs 6.18)."""
        if self.facts.gmem_flags & flags != flags:
            self.cancel(
                f"KVM_CAP_GUEST_MEMFD_FLAGS on a default VM is {self.facts.gmem_flags:#x}, "
                f"this test needs {uapi.flag_names(flags, uapi.GMEM_FLAG_NAMES)} "
                f"(guest_memfd mmap support arrived in Linux 6.18; kernel {KERNEL})"
            )

    def require_cap(self, name: str) -> int:
        """CANCEL unless /dev/kvm reports capability `name`; its value otherwise."""
        value = self.facts.caps.get(name, 0)
        if not value:
            self.cancel(f"{name} is 0 on this kernel ({KERNEL})")
        return value

    def tiny_vm(self, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> TinyVm:
        """A VM with one vCPU and its code slot, released at the end of the test."""
        return self.own(TinyVm(self.kvm, vm_type))

    def gmem(self, vm: Vm, size: int, flags: int = 0) -> GuestMemfd:
        return self.own(vm.create_guest_memfd(size, flags))

    def expect_errno(self, expected: int, what: str, call: Callable[[], object]) -> None:
        """H4: `call` fails with `expected` (0: succeeds); FAIL with both errnos otherwise."""
        seen, message = errno_of(call)
        self.check(errno_is("H4", what, expected, seen, message))

    def unevictable(self) -> Settled:
        """meminfo Unevictable once it stopped moving (pages reach it through per-CPU batches);
        `.ok` False: it never did, and a delta of it cannot be judged."""
        return settle(lambda: meminfo_field("Unevictable"), tolerance=256 * KiB, interval=0.01)
