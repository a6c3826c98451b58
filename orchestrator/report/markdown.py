"""Markdown for CI job summaries (GitHub's $GITHUB_STEP_SUMMARY, GitLab MR notes).

The matrix and the totals, then what a reader cannot hover in Markdown: the
reasons of failures (capped) and of cancels (grouped, with counts).
"""

from __future__ import annotations

from collections import Counter

from orchestrator.report.compare import Comparison
from orchestrator.report.jobs import BAD_STATUSES, Job
from orchestrator.report.matrix import Matrix

MARKS = {
    "PASS": "✅ PASS",
    "FAIL": "❌ FAIL",
    "ERROR": "💥 ERROR",
    "CANCEL": "⏭️ CANCEL",
    "SKIP": "SKIP",
    "WARN": "⚠️ WARN",
    "INTERRUPTED": "⛔ INTERRUPTED",
    "INCOMPLETE": "❓ INCOMPLETE",
}
MAX_LISTED = 100


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(jobs: list[Job], matrix: Matrix) -> str:
    ordered = [c for tier in matrix.tiers() for c in matrix.columns_of(tier)]
    total = sum(matrix.totals.values())
    lines = [
        "## cvmlab qualification report",
        "",
        f"{total} results from {len(jobs)} job(s): "
        + ", ".join(f"{matrix.totals[s]} {s}" for s in matrix.statuses()),
        "",
    ]
    for job in jobs:
        if not job.complete:
            lines.append(
                f"> **incomplete job** `{job.path.name}` on {job.host.name}: {job.problem}"
            )
    lines += [
        "| scenario:test | " + " | ".join(f"{_md(c.tier)}: {_md(c.label)}" for c in ordered) + " |",
        "|---|" + "---|" * len(ordered),
    ]
    for row in matrix.rows:
        cells = []
        for column in ordered:
            cell = matrix.cells.get((row, column))
            if cell is None:
                cells.append("·")
                continue
            mark = MARKS.get(cell.status, cell.status)
            cells.append(mark if len(cell.results) == 1 else f"{mark} ({len(cell.results)})")
        lines.append(f"| `{_md(row)}` | " + " | ".join(cells) + " |")
    statuses = matrix.statuses()
    lines += [
        "",
        "### Totals",
        "",
        "| | " + " | ".join(statuses) + " | total |",
        "|---|" + "---|" * (len(statuses) + 1),
    ]
    for label, counts in [("all", matrix.totals)] + [
        (t, matrix.tier_totals[t]) for t in matrix.tiers()
    ]:
        values = " | ".join(str(counts.get(s, 0)) for s in statuses)
        lines.append(f"| {_md(label)} | {values} | {sum(counts.values())} |")
    failures = [r for job in jobs for r in job.results if r.status in BAD_STATUSES]
    if failures:
        lines += ["", "### Failures", ""]
        for r in failures[:MAX_LISTED]:
            lines.append(
                f"- **{r.status}** `{_md(r.row)}` [{_md(r.variant or 'default')} @ {r.tier}, "
                f"{_md(r.host)}]: {_md(r.reason or 'no reason given')}"
            )
        if len(failures) > MAX_LISTED:
            lines.append(f"- ... and {len(failures) - MAX_LISTED} more (see the HTML report)")
    cancels = Counter(
        (r.tier, r.reason or "no reason given")
        for job in jobs
        for r in job.results
        if r.status == "CANCEL"
    )
    if cancels:
        lines += ["", "### Cancel reasons", ""]
        for (tier, reason), count in cancels.most_common(MAX_LISTED):
            lines.append(f"- {count} x [{tier}] {_md(reason)}")
    lines += [
        "",
        "### Jobs",
        "",
        "| job | host | started | tests | avocado exit |",
        "|---|---|---|---|---|",
    ]
    for job in jobs:
        state = "" if job.complete else " (incomplete)"
        lines.append(
            f"| `{job.short_id}`{state} | {_md(job.host.name)} | {_md(job.start)} | "
            f"{len(job.results)} | {_md(job.exit_text())} |"
        )
    return "\n".join(lines) + "\n"


def render_comparison_markdown(comparison: Comparison) -> str:
    lines = ["## cvmlab comparison", "", _md(comparison.headline()), ""]
    for title, _, items in comparison.sections():
        if not items:
            continue
        lines += [f"### {title} ({len(items)})", ""]
        lines += [f"- {_md(change.describe())}" for change in items[:MAX_LISTED]]
        if len(items) > MAX_LISTED:
            lines.append(f"- ... and {len(items) - MAX_LISTED} more")
        lines.append("")
    return "\n".join(lines) + "\n"
