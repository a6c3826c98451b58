"""`cvmlab bench punch`: a balloon inflate, from QMP `balloon` to the host backing settled.

The name is historical: it times the guest giving memory back through the balloon and
QEMU discarding it (a punch of the backing), not cvmlab's host-side hole punch injection.

For each backend (anon, memfd, file) one guest is booted and reused for every run.
A run: the guest fills and frees its memory (so the pages the balloon will take are
backed on the host), the backing settles, then QMP `balloon` asks for 64 MiB and
the backing's `held` (orchestrator.memory.backing: st_blocks for memfd/file, the
mapping's Rss for anon) is sampled every few milliseconds until it has fallen by
at least 90% of that and stayed put for 0.3 s. The time from sending the command
to the first sample of that quiet spell is the run's figure; the balloon is then
deflated for the next run. Medians per backend, with the balloon's own time
(query-balloon reaching the target) beside it: under TCG the guest's driver sets
the pace, so the two are close and the host side adds little.

There is no target to meet: the figures are printed, and `met` is always true.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.bench.guest import image_boot
from orchestrator.errors import MemoryOpError
from orchestrator.guest.memhelper import MemHelper, ssh_runner
from orchestrator.image import ImageManifest, default_image
from orchestrator.memory.backing import BackingProbe
from orchestrator.memory.balloon import (
    balloon_actual,
    check_balloon_target,
    guest_ram_size,
    set_balloon,
)
from orchestrator.memory.guest_view import guest_memory
from orchestrator.qemu.argv import RAM_ID
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.spec import spec_from_params
from orchestrator.timeline import now
from orchestrator.units import MiB

BACKENDS: dict[str, dict[str, str]] = {
    "anon": {"backend": "anon"},
    "memfd": {"backend": "memfd", "share": "on"},
    "file": {"backend": "file", "mem_path": "/dev/shm"},
}
INFLATE = 64 * MiB
FILL_MARGIN_MIB = 64
#: The backing counts as settled after this long without moving (more than 1 MiB).
QUIET_S = 0.3
SAMPLE_INTERVAL_S = 0.005
SETTLE_TIMEOUT_S = 60.0


@dataclass
class PunchSeries:
    """The runs of one backend."""

    backend: str
    settled: list[float] = field(default_factory=list)  # command -> backing settled, s
    balloon: list[float] = field(default_factory=list)  # command -> query-balloon at target, s
    freed: list[int] = field(default_factory=list)  # bytes the backing fell by

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "settled_s": self.settled,
            "balloon_s": self.balloon,
            "freed_bytes": self.freed,
            "settled_median_s": statistics.median(self.settled),
            "balloon_median_s": statistics.median(self.balloon),
            "freed_median_bytes": statistics.median(self.freed),
        }


@dataclass
class PunchBench:
    """Per-backend medians; printed, with no ratio and no target."""

    inflate: int
    series: list[PunchSeries]
    name: str = "punch"

    @property
    def met(self) -> bool:
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inflate_bytes": self.inflate,
            "backends": [s.to_json() for s in self.series],
        }

    def report(self) -> str:
        lines = [f"bench {self.name}: balloon inflate by {self.inflate // MiB} MiB -> host "
                 "backing settled (medians)"]  # fmt: skip
        for s in self.series:
            runs = " ".join(f"{v:.3f}" for v in s.settled)
            lines.append(
                f"  {s.backend:<6} settled {statistics.median(s.settled):6.3f} s   balloon "
                f"{statistics.median(s.balloon):6.3f} s   freed "
                f"{statistics.median(s.freed) / MiB:6.1f} MiB   runs: {runs}"
            )
        return "\n".join(lines)


@dataclass
class _Run:
    settled_at: float  # now() of the first sample of the final quiet spell
    settled_value: int  # held then, bytes
    balloon_at: float  # now() when query-balloon first showed the target


def _follow_run(
    read_held: Callable[[], int],
    read_actual: Callable[[], int],
    start_value: int,
    drop: int,
    target: int,
) -> _Run:
    """Sample the backing (and the balloon, until it is there) until the backing settles.

    Settled: fallen by at least `drop` and then within 1 MiB for QUIET_S. Polling with
    a deadline; the condition is what is measured.
    """
    deadline = now() + SETTLE_TIMEOUT_S
    quiet_since: float | None = None
    quiet_value = start_value
    balloon_at: float | None = None
    pause = threading.Event()
    while True:
        if balloon_at is None and read_actual() == target:
            balloon_at = now()
        value, t = read_held(), now()
        if start_value - value >= drop:
            if quiet_since is None or abs(value - quiet_value) > MiB:
                quiet_since, quiet_value = t, value
            elif t - quiet_since >= QUIET_S and balloon_at is not None:
                return _Run(quiet_since, quiet_value, balloon_at)
        if t >= deadline:
            raise MemoryOpError(
                f"the host backing fell by {(start_value - value) // MiB} MiB (balloon at "
                f"target: {balloon_at is not None}), not the {drop // MiB} MiB expected, "
                f"within {SETTLE_TIMEOUT_S:g} s",
                "run scenarios/balloon.py for this backend to see what the host kept",
            )
        pause.wait(SAMPLE_INTERVAL_S)


def run_backend(
    image: ImageManifest, binary: str, backend: str, runs: int, progress: Callable[[str], None]
) -> PunchSeries:
    """Boot one guest on `backend` and time `runs` inflations of INFLATE."""
    spec = spec_from_params({"balloon": "on", **BACKENDS[backend]}, boot=image_boot(image))
    series = PunchSeries(backend)
    with tempfile.TemporaryDirectory(prefix="cvmlab-bench-punch-") as evidence, Machine(
        spec, Path(evidence), binary=binary, ready_marker=image.ready_marker
    ) as machine:  # fmt: skip
        machine.start()
        machine.wait_ready()
        shell = machine.ssh(image.ssh_user, image.ssh_key, image.host_key)
        qmp = machine.qmp
        probe = BackingProbe(qmp, machine.pid, RAM_ID)
        ram = guest_ram_size(qmp)
        filler = MemHelper(ssh_runner(shell), state="/run/cvmlab-bench")
        for i in range(1, runs + 1):
            fill = guest_memory(shell).mem_available // MiB - FILL_MARGIN_MIB
            filler.hold(mib=fill, seed=i, lock=False)
            filler.release()
            _, before = probe.settle(tolerance=MiB)
            target = ram - INFLATE
            check_balloon_target(target, ram)
            started = now()
            qmp.execute("balloon", {"value": target})
            run = _follow_run(
                lambda: probe.sample(record=False).held,
                lambda: balloon_actual(qmp),
                before.held,
                INFLATE * 9 // 10,
                target,
            )
            series.settled.append(run.settled_at - started)
            series.balloon.append(run.balloon_at - started)
            series.freed.append(before.held - run.settled_value)
            progress(
                f"bench punch: {backend} run {i}/{runs}: settled {series.settled[-1]:.3f} s, "
                f"balloon {series.balloon[-1]:.3f} s, freed {series.freed[-1] / MiB:.1f} MiB"
            )
            if not set_balloon(qmp, ram, timeout=60).reached:
                raise MemoryOpError("the balloon did not deflate", "see the balloon scenario")
        shell.close()
    return series


def bench_punch(runs: int, binary: str, progress: Callable[[str], None]) -> PunchBench:
    """The `punch` entry of `cvmlab bench`: every backend of BACKENDS, `runs` runs each."""
    image = default_image(progress=progress)
    return PunchBench(
        INFLATE, [run_backend(image, binary, name, runs, progress) for name in BACKENDS]
    )
