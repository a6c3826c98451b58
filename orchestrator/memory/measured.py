"""A running guest's memory as a memory test measures it, without avocado.

What `orchestrator.machine_scenario.MemoryScenario` does around its test, as plain code that
pytest, `cvmlab repro` and scripts can use too (the scenario is a thin wrapper):

- Before the guest exists: host-wide meminfo counters move by hundreds of MiB when a
  guest boots next door, so a test that judges them holds the host lock `meminfo`
  (`orchestrator.host.hostlock`) from before its boot; a hugetlb variant on a host
  with too few free huge pages cannot run at all. `host_shortfall(spec)` says why
  (a CANCEL reason), `claim_host(spec, timeout)` raises it as a HostError or returns
  the held lock.
- Once the guest runs: `MeasuredMemory` follows one memory backend of QEMU on the host
  (`backing`, a `BackingProbe`; `counter`, the host-wide counter that backend moves),
  drives the guest memory helper (`helper`) and follows QEMU's memory trace events
  (`trace`); `settled_backing()` and `settled_host()` are the readings the H2 checks
  are judged on. A reading that never settled says so (`BackingSample.settled`,
  `Settled.ok`): the checks in `orchestrator.invariants.host_memory` then give an
  incomplete verdict, never a pass.

        with claim_host(spec, timeout=200):
            ...                                   # boot the guest, connect SSH
            with MeasuredMemory(machine.qmp, machine.pid, shell, RAM_ID, trace_path) as mem:
                before = mem.settled_backing("before")
                ...                               # balloon, unplug, punch
                after = mem.settled_backing("after")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import HostError
from orchestrator.guest.memhelper import MemHelper, ssh_runner
from orchestrator.host.hostlock import HostLock
from orchestrator.host.meminfo import sample_meminfo
from orchestrator.host.settle import Settled, settle
from orchestrator.memory.backing import BackingProbe, BackingSample, host_meminfo
from orchestrator.memory.expectations import hugetlb_pages_needed, hugetlb_shortfall
from orchestrator.qemu.qmp import QmpSession
from orchestrator.qemu.spec import MachineSpec
from orchestrator.qemu.trace import TraceCollector, TraceTotals, set_trace_events
from orchestrator.timeline import Timeline
from orchestrator.units import MiB

if TYPE_CHECKING:
    from orchestrator.guest.ssh import GuestShell

#: The host lock every test that judges host-wide memory counters holds.
HOST_LOCK = "meminfo"


def host_shortfall(spec: MachineSpec, meminfo: str = "/proc/meminfo") -> str | None:
    """Why this host cannot back `spec`'s memory (a CANCEL reason), or None.

    Only hugetlb can be short: tests never reserve huge pages (that changes the host for
    everyone), so a variant that needs more than are free cannot run here."""
    return hugetlb_shortfall(spec, dict(sample_meminfo(meminfo).values))


def judges_host_counter(spec: MachineSpec) -> bool:
    """Whether a memory test of `spec` judges a host-wide counter, so needs the host lock.

    Only huge pages: HugePages_Free moves for nobody but huge-page users, and they all
    hold the lock. The counters of other backends (AnonPages, Shmem, Cached) move with
    every process on the host: recorded beside QEMU's own backing, which is the judge.
    """
    return hugetlb_pages_needed(spec) > 0


def claim_host(spec: MachineSpec, timeout: float, meminfo: str = "/proc/meminfo") -> HostLock:
    """The host lock `meminfo`, held, once the host can back `spec` (release it after).

    HostError with the reason when it cannot (see `host_shortfall`) or when another
    holder keeps the lock past `timeout` seconds."""
    short = host_shortfall(spec, meminfo)
    if short:
        raise HostError(short)
    lock = HostLock(HOST_LOCK, timeout=timeout)
    lock.acquire()
    return lock


class MeasuredMemory:
    """One backend of a running QEMU, its guest's memory helper and QEMU's memory trace.

    `start()` switches QEMU's memory trace events on and follows them; `stop()` (also
    on leaving a `with` block) stops following, idempotently, so a test's teardown can
    call it on every path before H9 counts the runner's fds.
    """

    def __init__(
        self,
        qmp: QmpSession,
        pid: int,
        guest: GuestShell,
        memdev: str,
        trace_path: Path,
        timeline: Timeline | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.qmp = qmp
        self.memdev = memdev
        self.log = log
        self.backing = BackingProbe(qmp, pid, memdev, timeline=timeline)
        #: The host-wide /proc/meminfo counter this backend's pages count in.
        self.counter = self.backing.info.host_counter()
        self.helper = MemHelper(ssh_runner(guest))
        self.trace = TraceCollector(trace_path, timeline)
        self._following = False

    def start(self) -> MeasuredMemory:
        """Switch QEMU's memory trace events on and follow what QEMU writes from now on."""
        set_trace_events(self.qmp)
        self.trace.start()
        self._following = True
        return self

    def stop(self) -> TraceTotals | None:
        """Stop following the trace; its totals, or None when it was not followed."""
        if not self._following:
            return None
        self._following = False
        totals = self.trace.stop()
        self._say(f"trace totals: {totals.to_json()}")
        return totals

    def __enter__(self) -> MeasuredMemory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def settled_backing(
        self,
        what: str,
        *,
        window: int = 3,
        interval: float = 0.1,
        timeout: float = 10.0,
    ) -> BackingSample:
        """What the host holds for the backend once it stops moving (within 1 MiB).

        The sample says whether it settled before `timeout` (`BackingSample.settled`)."""
        settled, sample = self.backing.settle(
            tolerance=MiB, window=window, interval=interval, timeout=timeout
        )
        self._say(
            f"{what}: {self.memdev} holds {sample.held // MiB} MiB (settled {settled.ok} "
            f"after {settled.elapsed:.2f} s, {len(settled.samples)} samples)"
        )
        return sample

    def settled_host(self) -> Settled:
        """The backend's host-wide counter, once three readings agree within 2 MiB."""
        counter = self.counter
        return settle(
            lambda: host_meminfo([counter])[counter],
            tolerance=2 * MiB,
            window=3,
            interval=0.2,
            timeout=15,
        )

    def _say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)
