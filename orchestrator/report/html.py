"""The static HTML report: one matrix page, one page per test.

Everything is inline (CSS, SVG): no script, no network, so the pages open
from a CI artifact, a mail attachment or `file://`. Links to evidence are
relative paths from the report dir into the job dirs, so the report and
the job dirs it read travel together (keep them side by side).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from orchestrator.errors import CvmlabError
from orchestrator.invariants.verdict import is_self_check
from orchestrator.report.compare import Comparison
from orchestrator.report.jobs import Job, TestResult
from orchestrator.report.matrix import Matrix
from orchestrator.report.plot import read_timeline, render_plot
from orchestrator.report.store import REPORT_JSON

INDEX_NAME = "report.html"
COMPARE_NAME = "compare.html"
TESTS_DIR = "tests"

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:20px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 8px}
table{border-collapse:collapse;margin:4px 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3;font-weight:600}
table.matrix td{text-align:center;min-width:64px;font-weight:600;font-size:12px}
table.matrix th.row{font-weight:normal;font-family:ui-monospace,monospace;font-size:12px}
table.matrix th.tier{text-align:center;background:#e4e8f0}
td a{color:inherit;text-decoration:none;display:block}
.s-PASS{background:#c9f0cf;color:#0b5a1a}.s-FAIL{background:#f6b8b8;color:#7a0000}
.s-ERROR{background:#f0a0d0;color:#6a0040}.s-CANCEL{background:#fde7a9;color:#6b4d00}
.s-SKIP{background:#e6e6e6;color:#444}.s-WARN{background:#ffd8a8;color:#7a3d00}
.s-INTERRUPTED{background:#d9c2f0;color:#3c1a66}.s-INCOMPLETE{background:#c9d6ea;color:#1e3a66}
td.none{color:#bbb;font-weight:normal}
.badge{display:inline-block;padding:1px 8px;border-radius:3px;font-weight:700}
.warn{background:#fff4d6;border:1px solid #e0c060;padding:6px 10px;margin:8px 0}
.muted{color:#666}code,.mono{font-family:ui-monospace,monospace;font-size:12px}
svg.timeline{border:1px solid #ddd;background:#fafafa}
svg .tick{font-size:10px;fill:#555}svg .axis{font-size:11px;fill:#333}
svg .legend{font-size:11px;fill:#222}svg .mlabel{font-size:10px}svg .note{font-size:10px;fill:#777}
td.ev{max-width:420px;word-break:break-all}
"""


def page_name(job: Job, result: TestResult) -> str:
    """A file name unique across jobs: job, index, and a readable slug."""

    def slug(text: str, limit: int) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:limit]

    # Class.method (without the file) and the variant: job and index make it unique.
    test = slug(result.row.rsplit(":", 1)[-1], 70)
    variant = f"-{slug(result.variant, 40)}" if result.variant else ""
    return f"{job.short_id}-{result.index:04d}-{test}{variant}.html"


def _href(from_dir: Path, target: Path) -> str:
    return quote(os.path.relpath(target, from_dir))


def _page(title: str, body: Iterable[str]) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>\n"
    )


def _badge(status: str) -> str:
    return f'<span class="badge s-{escape(status)}">{escape(status)}</span>'


def _generated() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def render_matrix_table(matrix: Matrix, pages: dict[int, str]) -> str:
    """The matrix as an HTML table; `pages` maps id(result) to its page's href."""
    tiers = matrix.tiers()
    out = ['<table class="matrix" id="matrix"><thead><tr><th rowspan="2">scenario:test</th>']
    for tier in tiers:
        span = len(matrix.columns_of(tier))
        out.append(f'<th class="tier" colspan="{span}">{escape(tier)}</th>')
    out.append("</tr><tr>")
    for tier in tiers:
        for column in matrix.columns_of(tier):
            out.append(f"<th>{escape(column.label)}</th>")
    out.append("</tr></thead><tbody>")
    ordered = [c for tier in tiers for c in matrix.columns_of(tier)]
    for row in matrix.rows:
        out.append(f'<tr><th class="row">{escape(row)}</th>')
        for column in ordered:
            cell = matrix.cells.get((row, column))
            if cell is None:
                out.append('<td class="none" title="not run">&middot;</td>')
                continue
            status = cell.status
            text = status if len(cell.results) == 1 else f"{status} ({len(cell.results)})"
            href = pages.get(id(cell.worst_result), "")
            out.append(
                f'<td class="s-{escape(status)}"><a href="{href}" '
                f'title="{escape(cell.hover())}">{escape(text)}</a></td>'
            )
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _totals_table(matrix: Matrix) -> str:
    statuses = matrix.statuses()
    tiers = sorted(matrix.tier_totals, key=lambda t: matrix.tiers().index(t))
    out = ['<table class="totals" id="totals"><tr><th></th>']
    out += [f'<th class="s-{escape(s)}">{escape(s)}</th>' for s in statuses]
    out.append("<th>total</th></tr>")
    lines = [("all", matrix.totals)] + [(t, matrix.tier_totals[t]) for t in tiers]
    for label, counts in lines:
        out.append(f"<tr><th>{escape(label)}</th>")
        out += [f"<td>{counts.get(s, 0)}</td>" for s in statuses]
        out.append(f"<td>{sum(counts.values())}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _jobs_table(jobs: list[Job], out_dir: Path) -> str:
    out = [
        '<table id="jobs"><tr><th>job</th><th>host</th><th>tiers available</th><th>started</th>'
        "<th>tests</th><th>state</th><th>avocado exit</th><th>dir</th></tr>"
    ]
    for job in jobs:
        tiers = ", ".join(sorted(job.host.available)) if job.host.available is not None else "?"
        state = "complete" if job.complete else f"<b>incomplete</b>: {escape(job.problem)}"
        target = job.path / "results.html"
        link = _href(out_dir, target if target.is_file() else job.path)
        out.append(
            f"<tr><td class=mono>{escape(job.short_id)}</td><td>{escape(job.host.name)}"
            f'<br><span class="muted">{escape(job.host.detail)}</span></td>'
            f"<td>{escape(tiers)}</td><td>{escape(job.start)}</td><td>{len(job.results)}</td>"
            f"<td>{state}</td><td>{escape(job.exit_text())}</td>"
            f'<td><a href="{link}">{escape(job.path.name)}</a></td></tr>'
        )
    out.append("</table>")
    return "".join(out)


def render_index(jobs: list[Job], matrix: Matrix, pages: dict[int, str], out_dir: Path) -> str:
    total = sum(matrix.totals.values())
    summary = ", ".join(f"{matrix.totals[s]} {s}" for s in matrix.statuses())
    body = [
        "<h1>cvmlab qualification report</h1>",
        f'<p class="muted">{total} results from {len(jobs)} job(s): {escape(summary)}. '
        f"Generated {_generated()}.</p>",
    ]
    incomplete = [j for j in jobs if not j.complete]
    if incomplete:
        names = ", ".join(f"{j.path.name} ({j.problem})" for j in incomplete)
        body.append(
            f'<p class="warn">{len(incomplete)} job(s) incomplete, read from their test dirs: '
            f"{escape(names)}</p>"
        )
    body += [
        "<h2>Matrix</h2>",
        '<p class="muted">Rows: scenario:test. Columns: host tier, then variant. '
        "Hover a cell for its reason; click it for the test's page.</p>",
        render_matrix_table(matrix, pages),
        "<h2>Totals</h2>",
        _totals_table(matrix),
        "<h2>Jobs</h2>",
        _jobs_table(jobs, out_dir),
    ]
    return _page("cvmlab report", body)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if value.__class__ is int:  # most cells: nothing to encode, nothing to escape
        return str(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return escape(text if len(text) <= 600 else text[:600] + "...")


def _verdicts_table(data_dir: Path | None) -> str:
    raw = None
    if data_dir is not None:
        try:
            raw = json.loads((data_dir / "verdicts.json").read_text(errors="replace"))
        except FileNotFoundError:
            raw = None
        except (OSError, ValueError):
            return '<p class="warn">verdicts.json is unreadable (cut short?)</p>'
    if not isinstance(raw, list) or not raw:
        return '<p class="muted">No verdicts recorded.</p>'
    rows = [v for v in raw if isinstance(v, dict)]
    invariants = [v for v in rows if not is_self_check(str(v.get("invariant", "")))]
    self_checks = [v for v in rows if is_self_check(str(v.get("invariant", "")))]
    out = [_verdict_rows("verdicts", "invariant", invariants)]
    if self_checks:
        # cvmlab's own checks (S family): shown apart, never read as the system's invariants.
        out.append(
            "<h3>cvmlab self-checks (S: not invariants of the system under test)</h3>"
            + _verdict_rows("self-checks", "self-check", self_checks)
        )
    return "".join(out)


def _verdict_rows(table_id: str, label: str, rows: list[dict[str, Any]]) -> str:
    out = [
        f'<table id="{table_id}"><tr><th>{label}</th><th>status</th><th>summary</th>'
        "<th>expected</th><th>seen</th><th>tolerance</th><th>evidence</th></tr>"
    ]
    for v in rows:
        status = str(v.get("status", "?"))
        css = {"pass": "PASS", "fail": "FAIL", "incomplete": "WARN"}.get(status, "SKIP")
        out.append(
            f"<tr><td>{_cell(v.get('invariant'))}</td>"
            f'<td class="s-{css}">{escape(status)}</td><td>{_cell(v.get("summary"))}</td>'
            f"<td>{_cell(v.get('expected'))}</td><td>{_cell(v.get('seen'))}</td>"
            f"<td>{_cell(v.get('tolerance'))}</td>"
            f'<td class="ev mono">{_cell(v.get("evidence") or None)}</td></tr>'
        )
    out.append("</table>")
    return "".join(out)


def _evidence_list(result: TestResult, job_href: str) -> str:
    """Links to the test's files; `job_href` is the job dir relative to the page."""
    if result.logdir is None:
        return '<p class="muted">The test has no directory in its job dir.</p>'
    entries: list[tuple[str, int]] = []
    with os.scandir(result.logdir) as it:
        entries += [(e.name, e.stat().st_size) for e in it if e.is_file()]
    data = result.logdir / "data"
    if data.is_dir():
        with os.scandir(data) as it:
            entries += [(f"data/{e.name}", e.stat().st_size) for e in it if e.is_file()]
    if not entries:
        return '<p class="muted">No evidence files.</p>'
    # Paths are built from the job dir's relative path: one relpath per job, not per file.
    base = f"{job_href}/test-results/{result.logdir.name}"
    items = "".join(
        f'<li><a href="{quote(f"{base}/{label}")}">{escape(label)}</a> '
        f'<span class="muted">{size} bytes</span></li>'
        for label, size in sorted(entries)
    )
    return f'<ul id="evidence">{items}</ul>'


def _start_cell(data_dir: Path | None) -> str:
    """Cold or warm (restored from a snapshot), with the reason, from start.json."""
    try:
        start = json.loads((data_dir / "start.json").read_text()) if data_dir else None
    except (OSError, ValueError):
        start = None
    if not isinstance(start, dict):
        return '<span class="muted">not recorded</span>'
    seconds = start.get("seconds")
    took = f", ready in {seconds:.2f} s" if isinstance(seconds, int | float) else ""
    return (
        f'<span id="start">{escape(str(start.get("mode", "?")))}</span>'
        f" ({escape(str(start.get('reason', '')))}{took})"
    )


def render_test_page(job: Job, result: TestResult, job_href: str) -> str:
    data_dir = result.data_dir
    timeline = read_timeline(data_dir / "timeline.jsonl") if data_dir is not None else None
    facts = [
        ("test", f"<code>{escape(result.test_id)}</code>"),
        ("variant", escape(result.variant or "default")),
        ("tier", escape(result.tier)),
        ("host", escape(result.host)),
        ("job", f"{escape(job.short_id)} ({escape(job.path.name)}, {escape(job.start)})"),
        ("time", f"{result.elapsed:.2f} s" if result.elapsed is not None else "?"),
        ("start", _start_cell(data_dir)),
    ]
    body = [
        f'<p><a href="../{INDEX_NAME}">&larr; matrix</a></p>',
        f"<h1>{escape(result.row)} {_badge(result.status)}</h1>",
    ]
    if result.reason:
        body.append(f'<p class="warn" id="reason">{escape(result.reason)}</p>')
    body.append("<table>")
    body += [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts]
    body.append("</table><h2>Verdicts</h2>")
    body.append(_verdicts_table(data_dir))
    body.append("<h2>Timeline</h2>")
    if timeline is None or timeline.empty:
        body.append('<p class="muted">No timeline samples or events recorded.</p>')
    else:
        body.append(render_plot(timeline))
    if timeline is not None and timeline.counts:
        counts = ", ".join(
            f"{s}/{k}: {n}" for (s, k), n in sorted(timeline.counts.items(), key=lambda i: i[0])
        )
        body.append(f'<p class="muted">Records: {escape(counts)}.</p>')
    if timeline is not None and timeline.bad_lines:
        body.append(
            f'<p class="warn">{timeline.bad_lines} line(s) of timeline.jsonl were not '
            "readable records (cut short by a killed runner?).</p>"
        )
    body.append("<h2>Evidence</h2>")
    body.append(_evidence_list(result, job_href))
    return _page(f"{result.row} [{result.variant}] {result.status}", body)


def prepare_out_dir(out_dir: Path, clean_pages: bool = True) -> None:
    """Create `out_dir`; reuse it only when it is empty or holds an earlier report.

    An earlier report's test pages are removed first (`clean_pages`), so no
    page of a test that is gone survives next to the new matrix.
    """
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CvmlabError(f"{out_dir} is a file", "give -o a directory for the report")
        ours = (out_dir / REPORT_JSON).is_file() or (out_dir / COMPARE_NAME).is_file()
        if not ours and any(out_dir.iterdir()):
            raise CvmlabError(
                f"{out_dir} is not empty and holds no earlier report",
                "give -o a new or empty directory (an earlier report's dir is overwritten)",
            )
        tests = out_dir / TESTS_DIR
        if clean_pages and tests.is_dir():
            for old in tests.glob("*.html"):
                old.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def write_html(jobs: list[Job], matrix: Matrix, out_dir: Path) -> dict[int, str]:
    """Write report.html and every test page; returns id(result) -> page path (from out_dir)."""
    prepare_out_dir(out_dir)
    page_dir = out_dir / TESTS_DIR
    page_dir.mkdir(exist_ok=True)
    pages: dict[int, str] = {}
    for job in jobs:
        job_href = os.path.relpath(job.path, page_dir)
        for result in job.results:
            name = page_name(job, result)
            pages[id(result)] = f"{TESTS_DIR}/{quote(name)}"
            page = render_test_page(job, result, job_href)
            (page_dir / name).write_text(page, encoding="utf-8")
    (out_dir / INDEX_NAME).write_text(render_index(jobs, matrix, pages, out_dir), encoding="utf-8")
    return pages


def render_compare_page(comparison: Comparison) -> str:
    """Regressions first, then fixes, new cancels, new and removed tests, other changes."""
    body = [
        "<h1>cvmlab comparison</h1>",
        f'<p class="muted">{escape(comparison.headline())}. Generated {_generated()}.</p>',
    ]
    for title, _, items in comparison.sections():
        body.append(f"<h2>{escape(title)} ({len(items)})</h2>")
        if not items:
            body.append('<p class="muted">none</p>')
            continue
        body.append(
            '<table class="changes"><tr><th>scenario:test</th><th>variant</th><th>tier</th>'
            "<th>before</th><th>now</th><th>reason</th></tr>"
        )
        for change in items:
            row, variant, tier = change.key
            old = change.old.status if change.old else "absent"
            new = change.new.status if change.new else "absent"
            reason = change.new or change.old
            body.append(
                f'<tr><td class="mono">{escape(row)}</td><td>{escape(variant or "default")}</td>'
                f'<td>{escape(tier)}</td><td class="s-{escape(old)}">{escape(old)}</td>'
                f'<td class="s-{escape(new)}">{escape(new)}</td>'
                f"<td>{escape(reason.reason if reason else '')}</td></tr>"
            )
        body.append("</table>")
    return _page("cvmlab comparison", body)
