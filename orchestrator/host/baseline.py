"""A baseline of host health taken before a test step, and what changed since (H8, H9).

    with HostBaseline() as baseline:          # before the test creates anything
        ...                                   # the test; it releases what it made
        report = baseline.report()            # after the release
        report.log.clean, report.leftovers, report.counters

`HostBaseline` combines three observers: the kernel log since the baseline
(`kernel_log.HostLogWatch`, H8), the fds, mappings and child processes of one
process (`resources.ResourceSnapshot`, H9), and chosen /proc/meminfo counters,
which `report()` waits to see back within a tolerance of their baseline
(`settle.converge`, H9). It judges nothing itself: scenarios turn the report
into verdicts (orchestrator.invariants). The rule for counters: judge one only
when both readings settled. A baseline that did not settle is marked
(`baseline_settled`); an after-reading that never held still within the tolerance
(`converge` gave up) yet whose last samples average inside it flapped around its
baseline. Neither can be judged (`judgeable` is False: the verdict is incomplete,
never a pass); a counter that stayed outside the tolerance did not come back (a fail).

`TeardownWatch` is the same idea for a QEMU scenario's teardown (H9): taken
before the guest is launched, `observe()` after it was shut down returns a
`TeardownObservation` (QEMU gone, run dir gone, no new fd/mapping/child in the
runner, counters back). Pick quiet counters for the baseline check (`Unevictable`);
counters that the rest of the machine moves all the time (`Cached`, `Shmem`)
are better judged by deltas measured right around an operation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from orchestrator.host.kernel_log import KMSG, HostLogWatch, LogDelta
from orchestrator.host.meminfo import meminfo_field
from orchestrator.host.resources import ResourceSnapshot, leftovers
from orchestrator.host.settle import Settled, converge, settle

MiB = 1 << 20


@dataclass(frozen=True)
class CounterReturn:
    """Whether a meminfo counter came back to its baseline within `tolerance` bytes."""

    name: str
    baseline: int
    settled: Settled
    tolerance: int
    baseline_settled: bool = True

    @property
    def ok(self) -> bool:
        return self.settled.ok and self.baseline_settled

    @property
    def judgeable(self) -> bool:
        """Both readings settled: the baseline did, and the counter either held within
        the tolerance or stayed outside it (see the module docstring)."""
        return self.baseline_settled and _settled_after(
            self.settled.ok, self.settled.value, self.baseline, self.tolerance
        )

    @property
    def difference(self) -> int:
        return self.settled.value - self.baseline


def _settled_after(returned: bool, seen: int, baseline: int, tolerance: int) -> bool:
    """An after-reading can be judged: it held within `tolerance` of `baseline` (converge
    succeeded), or it ended outside (it did not come back). A converge that gave up with
    its last samples averaging inside the tolerance flapped: that cannot be judged."""
    return returned or abs(seen - baseline) > tolerance


@dataclass(frozen=True)
class HostReport:
    """What changed on the host since the baseline."""

    log: LogDelta
    leftovers: tuple[str, ...]
    counters: tuple[CounterReturn, ...]

    @property
    def clean(self) -> bool:
        return self.log.clean and not self.leftovers and all(c.ok for c in self.counters)


class HostBaseline:
    """Kernel log position, process resources and meminfo counters at construction."""

    def __init__(
        self,
        pid: int | str = "self",
        counters: tuple[str, ...] = ("Unevictable",),
        tolerance: int = 4 * MiB,
        kmsg: str = KMSG,
        meminfo: str = "/proc/meminfo",
    ) -> None:
        self.pid = pid
        self.tolerance = tolerance
        self._meminfo = meminfo
        self.log = HostLogWatch(kmsg)
        try:
            self.resources = ResourceSnapshot.take(pid)
            # A baseline taken while a counter is still moving would be off: say so.
            settled = {
                name: settle(self._reader(name), tolerance=tolerance // 8, interval=0.02)
                for name in counters
            }
            self.counters = {name: s.value for name, s in settled.items()}
            self.settled = {name: s.ok for name, s in settled.items()}
        except BaseException:
            self.log.close()
            raise

    def _reader(self, name: str) -> Callable[[], int]:
        return lambda: meminfo_field(name, self._meminfo)

    def report(self, timeout: float = 5.0) -> HostReport:
        """Compare now with the baseline; waits up to `timeout` s for counters to return."""
        counters = tuple(
            CounterReturn(
                name,
                baseline,
                converge(
                    self._reader(name),
                    baseline,
                    tolerance=self.tolerance,
                    interval=0.02,
                    timeout=timeout,
                ),
                self.tolerance,
                self.settled[name],
            )
            for name, baseline in self.counters.items()
        )
        left = tuple(leftovers(self.resources, ResourceSnapshot.take(self.pid)))
        return HostReport(self.log.delta(), left, counters)

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> HostBaseline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- H9 for a QEMU scenario -------------------------------------------------------------------

#: Fd targets and mapping names a QEMU scenario's runner may leak: KVM and guest_memfd
#: fds, memfds, pidfds (borrowed QEMU fds), sockets (QMP, SSH), and files under the
#: test's evidence or run directories (added per watch).
TEARDOWN_MARKERS: tuple[str, ...] = ("kvm", "memfd:", "[pidfd]", "socket:")
#: Quiet host counters judged back at baseline, with their tolerance in bytes.
#: Unevictable (guest_memfd folios, mlocked QEMU memory) moves only with such memory;
#: Shmem/Cached/AnonPages move with every other tenant's work and are not judged here.
TEARDOWN_COUNTERS: dict[str, int] = {"Unevictable": 8 * MiB}


@dataclass(frozen=True)
class CounterBack:
    """A host counter: its baseline, the value it settled at after teardown, the tolerance."""

    name: str
    baseline: int
    seen: int
    tolerance: int
    settled: bool = True  # the baseline settled
    returned: bool = True  # converge held the counter within the tolerance after teardown

    @property
    def ok(self) -> bool:
        return abs(self.seen - self.baseline) <= self.tolerance

    @property
    def judgeable(self) -> bool:
        """Both readings settled (else it cannot be judged: see the module docstring)."""
        return self.settled and _settled_after(
            self.returned, self.seen, self.baseline, self.tolerance
        )

    def describe(self) -> str:
        diff = (self.seen - self.baseline) / MiB
        text = (
            f"{self.name} {diff:+.1f} MiB from its baseline (tolerance ±{self.tolerance / MiB:g} "
            "MiB)"
        )
        return text if self.judgeable else text + ", not settled"


@dataclass(frozen=True)
class TeardownObservation:
    """What was left after the machine was shut down (judged by invariants.teardown)."""

    qemu_pid: int | None
    qemu_alive: bool
    rundir: str | None
    rundir_exists: bool
    leftovers: tuple[str, ...] = ()  # fds, mappings, child processes of the runner
    counters: tuple[CounterBack, ...] = field(default_factory=tuple)


def pid_alive(pid: int, proc: str = "/proc") -> bool:
    """The process exists and is not a zombie (a zombie holds nothing but its pid)."""
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # "pid (comm) S ...": the state follows the last ')', comm may hold anything.
    state = stat.rpartition(")")[2].split()[:1]
    return state != ["Z"]


class TeardownWatch:
    """The runner's resources and quiet host counters before a guest is launched (H9)."""

    def __init__(
        self,
        extra_markers: tuple[str, ...] = (),
        counters: dict[str, int] | None = None,
        meminfo: str = "/proc/meminfo",
    ) -> None:
        self.markers = TEARDOWN_MARKERS + extra_markers
        self.tolerances = dict(TEARDOWN_COUNTERS if counters is None else counters)
        self._meminfo = meminfo
        self.resources = ResourceSnapshot.take("self", self.markers)
        settled = {
            name: settle(self._reader(name), tolerance=tol // 8, interval=0.05, timeout=10)
            for name, tol in self.tolerances.items()
        }
        self.baseline = {name: s.value for name, s in settled.items()}
        self.baseline_settled = {name: s.ok for name, s in settled.items()}

    def _reader(self, name: str) -> Callable[[], int]:
        return lambda: meminfo_field(name, self._meminfo)

    def observe(
        self, qemu_pid: int | None, rundir: Path | None, timeout: float = 15.0
    ) -> TeardownObservation:
        """After shutdown: what is left, counters given up to `timeout` s to come back."""
        counters = []
        for name, baseline in self.baseline.items():
            tol = self.tolerances[name]
            back = converge(
                self._reader(name), baseline, tolerance=tol, interval=0.1, timeout=timeout
            )
            counters.append(
                CounterBack(
                    name, baseline, back.value, tol, self.baseline_settled[name], back.ok
                )
            )
        after = ResourceSnapshot.take("self", self.markers)
        return TeardownObservation(
            qemu_pid=qemu_pid,
            qemu_alive=qemu_pid is not None and pid_alive(qemu_pid),
            rundir=str(rundir) if rundir is not None else None,
            rundir_exists=rundir is not None and os.path.exists(rundir),
            leftovers=tuple(leftovers(self.resources, after)),
            counters=tuple(counters),
        )
