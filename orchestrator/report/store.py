"""`report.json`: the report's results in a form a later `--compare` reads back.

One record per result: the matrix key (row, variant, tier), status and
reason, and where it came from (host, job, avocado test id, page). The
format carries a version so an old file is recognised, not misread.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.report.jobs import Job

REPORT_JSON = "report.json"
FORMAT = "cvmlab-report/1"


def report_records(jobs: list[Job], pages: dict[int, str] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "jobs": [
            {
                "job_id": job.job_id,
                "dir": job.path.name,
                "host": job.host.name,
                "start": job.start,
                "complete": job.complete,
                "problem": job.problem,
                "exit": job.exit_code,
                "tests": len(job.results),
            }
            for job in jobs
        ],
        "results": [
            {
                "row": r.row,
                "variant": r.variant,
                "tier": r.tier,
                "status": r.status,
                "reason": r.reason,
                "host": r.host,
                "job_id": r.job_id,
                "test_id": r.test_id,
                "page": (pages or {}).get(id(r), ""),
            }
            for job in jobs
            for r in job.results
        ],
    }


def write_report_json(jobs: list[Job], out_dir: Path, pages: dict[int, str] | None = None) -> Path:
    path = out_dir / REPORT_JSON
    path.write_text(json.dumps(report_records(jobs, pages), indent=1), encoding="utf-8")
    return path
