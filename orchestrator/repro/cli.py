"""`cvmlab repro RESULT_DIR`: bring a failed test's guest back and replay its steps.

    cvmlab repro job-.../test-results/1-scenarios_boot.py_Boot.test_x/
    cvmlab repro RESULT_DIR --list            # the numbered steps, no guest
    cvmlab repro RESULT_DIR --until 3         # replay steps 1..3
    cvmlab repro RESULT_DIR --no-replay       # the same guest, no step replayed

RESULT_DIR is a failed test's result directory (or its data/ dir, its repro.json,
or a job directory holding one failed test). The image and boot files are checked
against the bundle's hashes first; a changed file is refused. By default the steps
are replayed up to just BEFORE the failing one, so you run that one by hand; then
the guest keeps running and the SSH command and QMP socket (qmp-shell) are
printed, until Ctrl-C. Needs no avocado.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from orchestrator.repro.bundle import ReproBundle, load_repro_bundle
from orchestrator.repro.replay import reproduce


def list_lines(bundle: ReproBundle) -> list[str]:
    """The bundle in words: the test, its failure, and every step with its recorded outcome."""
    lines = [
        f"test: {bundle.test_id}",
        f"status: {bundle.status}" + (f": {bundle.fail_reason}" if bundle.fail_reason else ""),
    ]
    if bundle.seed is not None:
        lines.append(f"seed: {bundle.seed}")
    for problem in bundle.incomplete:
        lines.append(f"incomplete: {problem}")
    if not bundle.steps:
        lines.append("no steps recorded after the guest was ready")
        return lines
    default = bundle.default_until
    for step in bundle.steps:
        marks = []
        if step.n == bundle.failed_step:
            marks.append(f"<- failing step ({bundle.failure_cause} follows it)")
        if step.n <= default:
            marks.append("replayed by default")
        if step.ends_machine:
            marks.append("never replayed: ends the machine")
        mark = f"  [{'; '.join(marks)}]" if marks else ""
        lines.append(f"{step.n:>4}  {step.describe()}  -> {step.outcome}{mark}")
    return lines


def _run(args: argparse.Namespace) -> int:
    bundle = load_repro_bundle(Path(args.result_dir))
    if args.list:
        print("\n".join(list_lines(bundle)))
        return 0
    for problem in bundle.incomplete:
        print(f"warning: the bundle is incomplete: {problem}", flush=True)
    result = reproduce(
        bundle,
        until=args.until,
        replay=not args.no_replay,
        keep_running=not args.exit_after_replay,
        evidence_dir=Path(args.evidence_dir) if args.evidence_dir else None,
    )
    # 1: the replay ended early (guest crash or QEMU exit): the failure may have reproduced.
    return 1 if result.stopped else 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "repro",
        help="relaunch a failed test's guest, replay its steps, keep it running to attach",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("result_dir", metavar="RESULT_DIR", help="a failed test's result dir")
    parser.add_argument(
        "--until",
        type=int,
        metavar="STEP",
        help="replay steps 1..STEP (default: up to just before the failing step)",
    )
    parser.add_argument("--no-replay", action="store_true", help="replay no step")
    parser.add_argument("--list", action="store_true", help="print the numbered steps and exit")
    parser.add_argument(
        "--exit-after-replay",
        action="store_true",
        help="shut the guest down after the replay instead of waiting (tests, bench)",
    )
    parser.add_argument(
        "--evidence-dir",
        metavar="DIR",
        help="where this run's evidence goes (default: a new cvmlab-repro-* temp dir)",
    )
    parser.set_defaults(handler=_run)
