"""`cvmlab bench boot`: the orchestrated boot cycle against raw QEMU, same kernel and initrd.

It alternates, `--runs` times each, two cycles of the same kernel, initrd and
QEMU command line:

- raw: `qemu-system-x86_64` alone; the guest prints its readiness marker and
  powers off at once (`cvmlab.poweroff=1`); timed from exec to QEMU's exit.
- orchestrated: `Machine.start`, wait for the marker, SSH in, run `true`,
  clean shutdown; timed from the first to the last step.

It prints the medians (wall-clock seconds) and their ratio against the target
(orchestrated <= 1.5x raw).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.bench.core import Comparison, compare
from orchestrator.bench.guest import image_boot
from orchestrator.errors import CvmlabError
from orchestrator.image import ImageManifest, default_image
from orchestrator.qemu.argv import Plumbing, build_argv
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.spec import MachineSpec

BOOT_RATIO_TARGET = 1.5
RAW_TIMEOUT_S = 120.0


def _spec(image: ImageManifest, extra_cmdline: str = "") -> MachineSpec:
    return MachineSpec(boot=image_boot(image, extra_cmdline))


def raw_cycle(image: ImageManifest, binary: str) -> float:
    """Seconds for QEMU alone to boot the guest to its marker and power off."""
    spec = _spec(image, "cvmlab.poweroff=1")
    with tempfile.TemporaryDirectory(prefix="cvmlab-bench-") as rundir:
        argv = build_argv(spec, Plumbing(qmp_socket=f"{rundir}/qmp.sock"), binary)
        start = time.monotonic()
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=RAW_TIMEOUT_S, check=False
        )
        elapsed = time.monotonic() - start
    if proc.returncode != 0 or image.ready_marker.encode() not in proc.stdout:
        raise CvmlabError(
            f"raw boot cycle failed (QEMU exit {proc.returncode})",
            "check that the image boots: cvmlab image build",
            detail=proc.stderr.decode(errors="replace")[-2000:],
        )
    return elapsed


def orchestrated_cycle(image: ImageManifest, binary: str) -> float:
    """Seconds for the orchestrator's launch, SSH `true` and clean shutdown."""
    with tempfile.TemporaryDirectory(prefix="cvmlab-bench-") as evidence:
        start = time.monotonic()
        with Machine(
            _spec(image), Path(evidence), binary=binary, ready_marker=image.ready_marker
        ) as machine:
            machine.start()
            machine.wait_ready()
            shell = machine.ssh(image.ssh_user, image.ssh_key, image.host_key)
            shell.run("true")
            shell.close()
            rung = machine.shutdown()
        elapsed = time.monotonic() - start
    if rung != "powerdown":
        raise CvmlabError(
            f"the orchestrated cycle needed the {rung!r} rung to stop the guest",
            "a clean shutdown should need only powerdown; look at the guest's acpid",
        )
    return elapsed


def bench_boot(runs: int, binary: str, progress: Callable[[str], None]) -> Comparison:
    image = default_image(progress=progress)
    return compare(
        "boot",
        runs,
        ("raw", lambda: raw_cycle(image, binary)),
        ("orchestrated", lambda: orchestrated_cycle(image, binary)),
        BOOT_RATIO_TARGET,
        progress,
    )
