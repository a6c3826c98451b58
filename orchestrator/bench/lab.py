"""`cvmlab bench lab`: the lab's start against a raw boot of the same kernel, side by side.

Both cycles boot the same kernel under test (default 7.3) with the same outer QEMU
machine (`orchestrator.lab.machine.lab_argv`: q35, TCG `-cpu max`, same RAM and vCPUs):

- raw: that command line with a two-line initramfs whose /init prints a marker,
  `-kernel vmlinuz` (the bzImage, as QEMU users boot it); timed from exec to the
  marker on the console (the kernel reached init);
- raw-pvh (reference): the same, with the ELF kernel entered through PVH as the lab
  enters it (orchestrator/image/pvh.py), so the lab's own overhead shows too;
- lab: `run_lab` with the command `true`; timed from exec to the runner's marker,
  printed just before the command starts (root mounted over 9p, kvm_amd loaded).

Target: lab <= 1.5x raw. `cvmlab bench lab-gmem` times the gmem uAPI suite inside the
lab (`avocado run scenarios/gmem_uapi.py`, wall from the lab's start) against its
60 s budget per kernel.
"""

from __future__ import annotations

import os
import resource
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.bench.core import Budget, Comparison, compare
from orchestrator.errors import CvmlabError, LabError
from orchestrator.image.cpio import CpioArchive
from orchestrator.image.pvh import kernel_entry
from orchestrator.lab.bytecode import compile_checkout
from orchestrator.lab.initramfs import BUSYBOX
from orchestrator.lab.kernels import LabKernel, debian_kernel
from orchestrator.lab.machine import LabConfig, lab_argv, lab_environment, run_lab
from orchestrator.profiles import FORK_SPAWNER, Job, avocado_argv, get_profile
from orchestrator.qemu.spawn import spawn

LAB_RATIO_TARGET = 1.5
GMEM_SUITE_BUDGET_S = 60.0
BENCH_KERNEL = os.environ.get("CVMLAB_BENCH_KERNEL", "7.3")
RAW_MARKER = b"CVMLAB-RAW-INIT"
RAW_TIMEOUT_S = 600.0
CHECKOUT = Path(__file__).resolve().parents[2]
_RAW_INIT = b"#!/bin/busybox sh\n/bin/busybox echo CVMLAB-RAW-INIT > /dev/console\n" + (
    b"/bin/busybox poweroff -f\n"
)


def _raw_initrd(directory: Path) -> Path:
    archive = CpioArchive()
    for name in ("bin", "dev", "proc", "sys"):
        archive.add_directory(name)
    archive.add_char_device("dev/console", 5, 1)
    archive.add_file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.add_file("init", _RAW_INIT, 0o755)
    path = directory / "raw-initrd.cpio"
    with path.open("wb") as stream:
        archive.write(stream)
    return path


def _config(
    kernel: LabKernel, argv: tuple[str, ...], qemu: str, *, pvh: bool = True
) -> LabConfig:
    """The lab's machine as `cvmlab lab` builds it (`pvh`: entered as it enters the kernel)."""
    return LabConfig(
        kernel=kernel,
        argv=argv,
        cwd=CHECKOUT,
        writable=(CHECKOUT,),
        env=lab_environment(os.environ, kernel, qemu),
        qemu=(qemu,),
        entry=kernel_entry(kernel.vmlinuz) if pvh else None,
    )


def raw_cycle(kernel: LabKernel, qemu: str, *, pvh: bool = False) -> float:
    """Seconds from exec to the raw initramfs's marker, on the lab's own machine:
    `-kernel vmlinuz` as QEMU users boot it, or (`pvh`) the ELF kernel as the lab does."""
    with tempfile.TemporaryDirectory(prefix="cvmlab-bench-lab-") as scratch:
        initrd = _raw_initrd(Path(scratch))
        # The same machine as the lab's, minus its 9p shares (the raw boot mounts nothing).
        argv = lab_argv(_config(kernel, ("true",), qemu, pvh=pvh), initrd, Path(scratch))
        argv = argv[: argv.index("-fsdev")]
        start = time.monotonic()
        proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.DEVNULL)  # fmt: skip
        assert proc.stdout is not None
        seen = b""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ)
                while RAW_MARKER not in seen:
                    remaining = start + RAW_TIMEOUT_S - time.monotonic()
                    if remaining <= 0 or not selector.select(remaining):
                        raise CvmlabError("raw boot: no marker in time", "see the kernel console")
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        raise CvmlabError("raw boot: QEMU exited before the marker", "")
                    seen = (seen + chunk)[-65536:]
            return time.monotonic() - start
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


def lab_cycle(kernel: LabKernel, qemu: str) -> float:
    """Seconds from the lab's exec to its command about to run."""
    result = run_lab(_config(kernel, ("true",), qemu))
    if result.status != 0 or result.start_to_running_s is None:
        raise LabError(f"the lab's `true` ended with status {result.status}", "run cvmlab lab")
    return result.start_to_running_s


def bench_lab(runs: int, binary: str, progress: Callable[[str], None]) -> Comparison:
    kernel = debian_kernel(BENCH_KERNEL, progress=progress)
    return compare(
        f"lab ({kernel.release})",
        runs,
        ("raw-to-init", lambda: raw_cycle(kernel, binary)),
        ("lab-to-command", lambda: lab_cycle(kernel, binary)),
        LAB_RATIO_TARGET,
        progress,
        # The lab enters the kernel through PVH (orchestrator/image/pvh.py), which skips
        # the bzImage's decompressor: its start is judged against the boot QEMU users
        # run, and shown against a raw boot entered the same way, so the lab's own
        # overhead (9p root, KVM modules, runner) is visible too.
        references=(("raw-pvh-to-init", lambda: raw_cycle(kernel, binary, pvh=True)),),
    )


def bench_lab_gmem(runs: int, binary: str, progress: Callable[[str], None]) -> Budget:
    """The gmem uAPI suite inside the lab, wall from the lab's exec to its end."""
    kernel = debian_kernel(BENCH_KERNEL, progress=progress)
    avocado = str(Path(sys.executable).with_name("avocado"))
    compile_checkout(CHECKOUT)  # as `cvmlab lab` does
    wall: list[float] = []
    cpu: list[float] = []
    for i in range(1, runs + 1):
        with tempfile.TemporaryDirectory(prefix="bench-lab-gmem-", dir=CHECKOUT / "results") as out:
            # Exactly as `make test` (profile full) runs it in the lab.
            argv = avocado_argv(get_profile("full"), Job("scenarios/gmem_uapi.py"),
                                avocado=avocado, results=out, parallel=2, tier=None,
                                inside_lab=True)  # fmt: skip
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.monotonic()
            result = run_lab(_config(kernel, tuple(argv), binary))
            wall.append(time.monotonic() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        if result.status != 0:
            raise LabError(f"the gmem suite failed in the lab (status {result.status})", "")
        progress(f"bench lab-gmem: run {i}/{runs} {wall[-1]:.1f} s")
    return Budget(
        "lab-gmem",
        f"avocado run scenarios/gmem_uapi.py --spawner {FORK_SPAWNER} (as profile full runs "
        f"it) inside the lab on {kernel.release} "
        "(boot included; cpu = the outer QEMU's)",
        GMEM_SUITE_BUDGET_S,
        wall,
        cpu,
    )
