"""`cvmlab bench`: speed targets measured side by side in one run.

Each bench names what it measures, in wall-clock seconds:

- `boot`: the orchestrated boot cycle (launch, readiness marker, SSH `true`,
  clean shutdown) against raw `qemu-system-x86_64` on the same kernel and initrd
  (target <= 1.5x);
- `report`: `cvmlab report` over 1,000 results shaped like real ones (timelines
  and verdicts as large as a real balloon or conversion test's), wall-clock
  against its 2 s budget, CPU time beside it;
- `repro`: `cvmlab repro --no-replay` to SSH-ready against a normal boot to
  SSH-ready (target <= 1.2x);
- `punch`: a balloon inflate by 64 MiB (the guest gives pages back, QEMU
  discards them), from the QMP `balloon` command until the host backing has
  settled, per backend (figures only, no target). It is not a host-side hole
  punch: it times the path a guest takes to return memory;
- `lab`: the kernel-under-test lab's start to its command running against a raw
  boot of the same kernel to init, same outer QEMU machine (target <= 1.5x);
- `lab-gmem`: the gmem uAPI suite inside the lab, from the lab's start to its end,
  against a 60 s budget per kernel;
- `warm`: a guest restored from a snapshot to a working SSH command against a
  cold boot of the same machine (target <= 0.15x); see orchestrator.bench.warm.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from orchestrator.bench.boot import bench_boot
from orchestrator.bench.core import BenchResult
from orchestrator.bench.lab import bench_lab, bench_lab_gmem
from orchestrator.bench.punch import bench_punch
from orchestrator.bench.report import bench_report
from orchestrator.bench.repro import bench_repro
from orchestrator.bench.warm import bench_warm
from orchestrator.errors import CvmlabError

#: Every bench by name; a new bench registers here (`cvmlab bench NAME`).
BENCHES: dict[str, Callable[[int, str, Callable[[str], None]], BenchResult]] = {
    "boot": bench_boot,
    "report": bench_report,
    "repro": bench_repro,
    "punch": bench_punch,
    "warm": bench_warm,
    "lab": bench_lab,
    "lab-gmem": bench_lab_gmem,
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
