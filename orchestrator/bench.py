"""`cvmlab bench`: speed targets measured side by side in one run.

`cvmlab bench report` times `cvmlab report` over 1,000 synthetic results
against its budget of 2 s.

`cvmlab bench boot` alternates, `--runs` times each, two cycles of the same
kernel, initrd and QEMU command line:

- raw: `qemu-system-x86_64` alone; the guest prints its readiness marker and
  powers off at once (`cvmlab.poweroff=1`); timed from exec to QEMU's exit.
- orchestrated: `Machine.start`, wait for the marker, SSH in, run `true`,
  clean shutdown; timed from the first to the last step.

It prints the medians and their ratio against the target (orchestrated <=
1.5x raw). Alternating the two keeps machine noise from favouring one side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from orchestrator.errors import CvmlabError
from orchestrator.image import ImageManifest, default_image
from orchestrator.qemu.argv import Plumbing, build_argv
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.spec import KernelBoot, MachineSpec
from orchestrator.report.synthetic import REPORT_TARGET_S, bench_report

BOOT_RATIO_TARGET = 1.5
RAW_TIMEOUT_S = 120.0


def _spec(image: ImageManifest, extra_cmdline: str = "") -> MachineSpec:
    cmdline = " ".join(x for x in (image.cmdline, extra_cmdline) if x)
    return MachineSpec(
        boot=KernelBoot(kernel=str(image.kernel), initrd=str(image.initrd), cmdline=cmdline)
    )


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


@dataclasses.dataclass
class Comparison:
    name: str
    baseline_label: str
    candidate_label: str
    baseline: list[float]
    candidate: list[float]
    target: float

    @property
    def ratio(self) -> float:
        return statistics.median(self.candidate) / statistics.median(self.baseline)

    @property
    def met(self) -> bool:
        return self.ratio <= self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            self.baseline_label: self.baseline,
            self.candidate_label: self.candidate,
            f"{self.baseline_label}_median_s": statistics.median(self.baseline),
            f"{self.candidate_label}_median_s": statistics.median(self.candidate),
            "ratio": self.ratio,
            "target": self.target,
            "met": self.ratio <= self.target,
        }

    def report(self) -> str:
        def row(label: str, values: list[float]) -> str:
            runs = " ".join(f"{v:.2f}" for v in values)
            return f"  {label:<13} median {statistics.median(values):6.2f} s   runs: {runs}"

        verdict = "met" if self.ratio <= self.target else "MISSED"
        return "\n".join(
            [
                f"bench {self.name}:",
                row(self.baseline_label, self.baseline),
                row(self.candidate_label, self.candidate),
                f"  ratio {self.ratio:.2f}x  (target <= {self.target}x: {verdict})",
            ]
        )


def compare(
    name: str,
    runs: int,
    baseline: tuple[str, Callable[[], float]],
    candidate: tuple[str, Callable[[], float]],
    target: float,
    progress: Callable[[str], None],
) -> Comparison:
    """Run the two cycles alternately `runs` times each."""
    result = Comparison(name, baseline[0], candidate[0], [], [], target)
    for i in range(1, runs + 1):
        for label, cycle, values in (
            (baseline[0], baseline[1], result.baseline),
            (candidate[0], candidate[1], result.candidate),
        ):
            values.append(cycle())
            progress(f"bench {name}: run {i}/{runs} {label} {values[-1]:.2f} s")
    return result


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


def bench_report_speed(runs: int, binary: str, progress: Callable[[str], None]) -> Comparison:
    """`cvmlab report` over 1,000 results against its 2 s budget (ratio = time / budget)."""
    del binary  # no guest involved
    return Comparison(
        "report",
        "budget",
        "report",
        [REPORT_TARGET_S] * runs,
        [bench_report(progress) for _ in range(runs)],
        1.0,
    )


def bench_repro(runs: int, binary: str, progress: Callable[[str], None]) -> Comparison:
    """`cvmlab repro --no-replay` to SSH-ready vs a normal boot to SSH-ready (target 1.2x)."""
    from orchestrator.repro.speed import bench_repro as run  # it imports this module

    return run(runs, binary, progress)


def bench_punch(runs: int, binary: str, progress: Callable[[str], None]) -> BenchResult:
    """Balloon inflate -> host backing settled, medians per backend (no ratio, no target)."""
    from orchestrator.memory.bench_punch import bench_punch as run

    return run(runs, binary, progress)


class BenchResult(Protocol):
    """What every bench returns: a Comparison, or figures without a ratio (punch)."""

    name: str

    @property
    def met(self) -> bool: ...

    def to_json(self) -> dict[str, Any]: ...

    def report(self) -> str: ...


BENCHES: dict[str, Callable[[int, str, Callable[[str], None]], BenchResult]] = {
    "boot": bench_boot,
    "report": bench_report_speed,
    "repro": bench_repro,
    "punch": bench_punch,
}


def _run(args: argparse.Namespace) -> int:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    names = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise CvmlabError(f"unknown benchmark {', '.join(unknown)}", f"use: {', '.join(BENCHES)}")
    if args.runs < 1:
        raise CvmlabError(f"--runs {args.runs} is not a positive number", "use --runs 3 or more")
    results = [BENCHES[name](args.runs, args.qemu, progress) for name in names]
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print("\n".join(r.report() for r in results))
    missed = [r.name for r in results if not r.met]
    return 1 if (args.check and missed) else 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure speed targets side by side (boot: orchestrated vs raw QEMU)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"what to measure: {', '.join(BENCHES)} (default: all)",
    )
    parser.add_argument("--runs", type=int, default=3, help="cycles of each kind (default 3)")
    parser.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.set_defaults(handler=_run)
