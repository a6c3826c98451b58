"""The qualification matrix: scenario.test rows, variant x host tier columns.

A cell may hold several results (the same test on two hosts of one tier, or
a rerun); it shows the worst of them, so one failure is never hidden by a
pass elsewhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from orchestrator.report.jobs import SEVERITY, TestResult, tier_sort_key

# The order statuses are listed in totals.
STATUS_ORDER = ("PASS", "FAIL", "ERROR", "CANCEL", "SKIP", "WARN", "INTERRUPTED", "INCOMPLETE")


@dataclass(frozen=True, order=True)
class Column:
    tier: str
    variant: str

    @property
    def label(self) -> str:
        return self.variant or "default"


@dataclass
class Cell:
    results: list[TestResult] = field(default_factory=list)

    @property
    def status(self) -> str:
        return worst(r.status for r in self.results)

    @property
    def worst_result(self) -> TestResult:
        return max(self.results, key=lambda r: SEVERITY.get(r.status, 0))

    def hover(self) -> str:
        """One line per result: status, host, reason."""
        lines = []
        for r in self.results:
            text = f"{r.status} on {r.host}"
            if r.reason:
                text += f": {r.reason}"
            lines.append(text)
        return "\n".join(lines)


def worst(statuses: Iterable[str]) -> str:
    # Unknown statuses rank just below FAIL: they need a look.
    return max(statuses, key=lambda s: SEVERITY.get(s, 6), default="PASS")


@dataclass
class Matrix:
    rows: list[str]
    columns: list[Column]
    cells: dict[tuple[str, Column], Cell]
    totals: Counter[str]
    tier_totals: dict[str, Counter[str]]

    def tiers(self) -> list[str]:
        return sorted({c.tier for c in self.columns}, key=tier_sort_key)

    def columns_of(self, tier: str) -> list[Column]:
        return [c for c in self.columns if c.tier == tier]

    def statuses(self) -> list[str]:
        """Statuses present, in STATUS_ORDER (others after)."""
        known = [s for s in STATUS_ORDER if self.totals.get(s)]
        return known + sorted(s for s in self.totals if s not in STATUS_ORDER)


def build_matrix(results: Iterable[TestResult]) -> Matrix:
    cells: dict[tuple[str, Column], Cell] = {}
    rows: dict[str, None] = {}
    columns: set[Column] = set()
    totals: Counter[str] = Counter()
    tier_totals: dict[str, Counter[str]] = {}
    for result in results:
        column = Column(result.tier, result.variant)
        rows.setdefault(result.row, None)
        columns.add(column)
        cells.setdefault((result.row, column), Cell()).results.append(result)
        totals[result.status] += 1
        tier_totals.setdefault(result.tier, Counter())[result.status] += 1
    return Matrix(
        rows=sorted(rows),
        columns=sorted(columns, key=lambda c: (tier_sort_key(c.tier), c.variant)),
        cells=cells,
        totals=totals,
        tier_totals=tier_totals,
    )
