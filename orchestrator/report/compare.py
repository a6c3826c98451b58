"""`--compare OLD NEW`: what changed between two runs, for release qualification.

Each side is an avocado job dir, a report dir (holding `report.json`), or a
`report.json` file: merge many hosts' jobs into one report first, then
compare reports. Results are matched on the matrix key (scenario:test,
variant, host tier); several results under one key count as their worst.
The kernel under test of lab results is not part of the key, so comparing one
kernel's run with another's (`--compare results-7.2 results-7.3`) matches the
same tests and names the kernels where an outcome changed.

- regression: PASS or WARN before, FAIL/ERROR/INTERRUPTED/INCOMPLETE now
- fix: one of those failures before, PASS or WARN now
- new cancel: CANCEL now, anything else before (a tier or a host went away)
- new / removed: a key on one side only
- changed: any other status change (e.g. CANCEL -> FAIL: newly run, failing)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import CvmlabError
from orchestrator.report.jobs import (
    BAD_STATUSES,
    SEVERITY,
    is_job_dir,
    load_job,
    split_kernel,
)
from orchestrator.report.store import FORMAT, REPORT_JSON

Key = tuple[str, str, str]  # (row, variant, tier)
GOOD_STATUSES = frozenset({"PASS", "WARN"})


@dataclass(frozen=True)
class Outcome:
    status: str
    reason: str
    kernel: str = ""  # the kernel under test (lab results), "" on a host


@dataclass(frozen=True)
class Change:
    key: Key
    old: Outcome | None
    new: Outcome | None

    def describe(self) -> str:
        row, variant, tier = self.key
        where = f"{row} [{variant or 'default'} @ {tier}]"
        old = self.old.status if self.old else "absent"
        new = self.new.status if self.new else "absent"
        text = f"{where}: {old} -> {new}"
        kernels = (self.old.kernel if self.old else "", self.new.kernel if self.new else "")
        if self.old and self.new and kernels[0] != kernels[1]:
            text += f" (kernel {kernels[0] or 'of the host'} -> {kernels[1] or 'of the host'})"
        reason = (self.new or self.old or Outcome("", "")).reason
        return f"{text}: {reason}" if reason else text


@dataclass
class Comparison:
    old_label: str
    new_label: str
    regressions: list[Change] = field(default_factory=list)
    fixes: list[Change] = field(default_factory=list)
    new_cancels: list[Change] = field(default_factory=list)
    new_tests: list[Change] = field(default_factory=list)
    removed_tests: list[Change] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    unchanged: int = 0

    def sections(self) -> list[tuple[str, str, list[Change]]]:
        """(title, one item's label, items) in the order a reader wants them."""
        return [
            ("Regressions", "REGRESSION", self.regressions),
            ("Fixes", "FIX", self.fixes),
            ("New cancels", "NEW CANCEL", self.new_cancels),
            ("New tests", "NEW TEST", self.new_tests),
            ("Removed tests", "REMOVED", self.removed_tests),
            ("Other changes", "CHANGED", self.changed),
        ]

    def headline(self) -> str:
        counts = ", ".join(f"{len(items)} {title.lower()}" for title, _, items in self.sections())
        return f"{self.old_label} -> {self.new_label}: {counts}, {self.unchanged} unchanged"

    def text(self) -> str:
        lines = [f"compare {self.headline()}"]
        for _, label, items in self.sections():
            lines += [f"  {label}: {change.describe()}" for change in items]
        return "\n".join(lines)


def _worst(a: Outcome | None, b: Outcome) -> Outcome:
    if a is None or SEVERITY.get(b.status, 6) > SEVERITY.get(a.status, 6):
        return b
    return a


def _from_records(records: Any, source: Path) -> dict[Key, Outcome]:
    if not isinstance(records, dict) or records.get("format") != FORMAT:
        raise CvmlabError(
            f"{source} is not a cvmlab report.json (format {FORMAT})",
            "compare job dirs, report dirs or the report.json cvmlab report wrote",
        )
    side: dict[Key, Outcome] = {}
    for r in records.get("results", []):
        if isinstance(r, dict):
            tier, kernel = split_kernel(str(r.get("tier", "")))
            key = (str(r.get("row", "")), str(r.get("variant", "")), tier)
            outcome = Outcome(str(r.get("status")), str(r.get("reason")), kernel)
            side[key] = _worst(side.get(key), outcome)
    return side


def load_side(path: Path) -> dict[Key, Outcome]:
    """The outcomes of one side of a comparison, keyed by matrix cell."""
    report = path / REPORT_JSON if path.is_dir() else path
    if path.is_dir() and not report.is_file() and is_job_dir(path):
        side: dict[Key, Outcome] = {}
        for r in load_job(path).results:
            tier, kernel = split_kernel(r.tier)
            key = (r.row, r.variant, tier)
            side[key] = _worst(side.get(key), Outcome(r.status, r.reason, kernel))
        return side
    if not report.is_file():
        raise CvmlabError(
            f"{path} is neither an avocado job dir, a report dir, nor a report.json",
            "give --compare two job dirs or two reports written by cvmlab report -o",
        )
    try:
        records = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CvmlabError(
            f"{report} is unreadable ({error})", "write it again with cvmlab report -o"
        ) from error
    return _from_records(records, report)


def compare(
    old: dict[Key, Outcome],
    new: dict[Key, Outcome],
    old_label: str = "old",
    new_label: str = "new",
) -> Comparison:
    result = Comparison(old_label, new_label)
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        change = Change(key, before, after)
        if before is None:
            result.new_tests.append(change)
        elif after is None:
            result.removed_tests.append(change)
        elif before.status == after.status:
            result.unchanged += 1
        elif before.status in GOOD_STATUSES and after.status in BAD_STATUSES:
            result.regressions.append(change)
        elif before.status in BAD_STATUSES and after.status in GOOD_STATUSES:
            result.fixes.append(change)
        elif after.status == "CANCEL":
            result.new_cancels.append(change)
        else:
            result.changed.append(change)
    return result


def compare_paths(old: Path, new: Path) -> Comparison:
    return compare(load_side(old), load_side(new), str(old), str(new))
