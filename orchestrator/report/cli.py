"""`cvmlab report JOBDIR... [-o OUT] [--markdown FILE] [--compare OLD NEW]`.

Merges avocado job dirs (one per host, or several per host) into one
qualification report:

  OUT/report.html     the matrix scenario:test x (host tier, variant), totals, jobs
  OUT/tests/*.html    a page per test: status, reason, verdicts, timeline plot, evidence
  OUT/report.json     the results, for a later --compare
  OUT/compare.html    with --compare: regressions, fixes, new cancels, new/removed tests

--markdown FILE writes the matrix and totals (and the comparison) as Markdown
for CI job summaries; `-` is standard output. --compare OLD NEW takes job
dirs, report dirs or report.json files; it exits 0 unless --fail-on-regression
is given and something regressed (exit 1). Keep OUT next to the job dirs:
its evidence links are relative paths into them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import CvmlabError
from orchestrator.report.compare import Comparison, compare_paths
from orchestrator.report.html import (
    COMPARE_NAME,
    INDEX_NAME,
    prepare_out_dir,
    render_compare_page,
    write_html,
)
from orchestrator.report.jobs import Job, load_jobs
from orchestrator.report.markdown import render_comparison_markdown, render_markdown
from orchestrator.report.matrix import Matrix, build_matrix
from orchestrator.report.store import write_report_json

DEFAULT_OUT = Path("cvmlab-report")


@dataclass
class Report:
    jobs: list[Job]
    matrix: Matrix
    index: Path | None
    markdown: str

    def summary(self) -> str:
        total = sum(self.matrix.totals.values())
        counts = ", ".join(f"{self.matrix.totals[s]} {s}" for s in self.matrix.statuses())
        incomplete = sum(1 for j in self.jobs if not j.complete)
        extra = f" ({incomplete} incomplete)" if incomplete else ""
        return f"{total} results from {len(self.jobs)} job(s){extra}: {counts or 'none'}"


def make_report(paths: list[Path], out_dir: Path | None) -> Report:
    """Read the job dirs; write the HTML pages and report.json into `out_dir` (if given)."""
    jobs = load_jobs(paths)
    matrix = build_matrix(r for job in jobs for r in job.results)
    index = None
    if out_dir is not None:
        pages = write_html(jobs, matrix, out_dir)
        write_report_json(jobs, out_dir, pages)
        index = out_dir / INDEX_NAME
    return Report(jobs, matrix, index, render_markdown(jobs, matrix))


def write_comparison(comparison: Comparison, out_dir: Path) -> Path:
    prepare_out_dir(out_dir, clean_pages=False)
    path = out_dir / COMPARE_NAME
    path.write_text(render_compare_page(comparison), encoding="utf-8")
    return path


def run(args: argparse.Namespace) -> int:
    if not args.jobdirs and not args.compare:
        raise CvmlabError("nothing to report", "give job dirs, or --compare OLD NEW")
    # With Markdown on standard output, everything else goes to standard error.
    say = sys.stderr if args.markdown == "-" else sys.stdout
    markdown: list[str] = []
    out_dir: Path | None = args.output
    if args.jobdirs:
        out_dir = out_dir or DEFAULT_OUT
        report = make_report([Path(p) for p in args.jobdirs], out_dir)
        markdown.append(report.markdown)
        print(f"report: {report.index} ({report.summary()})", file=say)
        for job in report.jobs:
            if not job.complete:
                print(f"report: incomplete job {job.path}: {job.problem}", file=say)
    comparison = None
    if args.compare:
        old, new = (Path(p) for p in args.compare)
        comparison = compare_paths(old, new)
        markdown.append(render_comparison_markdown(comparison))
        print(comparison.text(), file=say)
        if out_dir is not None:
            print(f"report: {write_comparison(comparison, out_dir)}", file=say)
    if args.markdown == "-":
        sys.stdout.write("\n".join(markdown))
    elif args.markdown:
        Path(args.markdown).write_text("\n".join(markdown), encoding="utf-8")
    if args.fail_on_regression and comparison is not None and comparison.regressions:
        return 1
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="merge avocado job dirs into an HTML/Markdown matrix; compare two runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("jobdirs", nargs="*", metavar="JOBDIR", help="avocado job dirs")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="OUT",
        help=f"report directory (default with job dirs: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--markdown", metavar="FILE", help="also write Markdown (matrix, totals) to FILE or -"
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("OLD", "NEW"),
        help="list regressions, fixes, new cancels, new/removed tests between two runs",
    )
    parser.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="with --compare: exit 1 when a test regressed",
    )
    parser.set_defaults(handler=run)
