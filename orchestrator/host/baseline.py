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
into verdicts. Pick quiet counters for the baseline check (`Unevictable`);
counters that the rest of the machine moves all the time (`Cached`, `Shmem`)
are better judged by deltas measured right around an operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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

    @property
    def ok(self) -> bool:
        return self.settled.ok

    @property
    def difference(self) -> int:
        return self.settled.value - self.baseline


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
            # A baseline taken while a counter is still moving would be off.
            self.counters = {
                name: settle(self._reader(name), tolerance=tolerance // 8, interval=0.02).value
                for name in counters
            }
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
