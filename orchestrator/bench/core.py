"""What every bench returns, and the alternating side-by-side comparison.

`compare` runs two cycles alternately so that machine noise (other tenants of a
shared host) cannot favour one side; `Comparison` holds both series in the same
unit (wall-clock seconds) and their ratio against a target. A comparison may carry
reference cycles, run in the same rotation and printed with the candidate's ratio to
each, which the target does not judge (e.g. the lab against a raw boot that enters
the kernel the way the lab does).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any, Protocol


class BenchResult(Protocol):
    """What every bench returns: a Comparison, or figures without a ratio (punch)."""

    name: str

    @property
    def met(self) -> bool: ...

    def to_json(self) -> dict[str, Any]: ...

    def report(self) -> str: ...


@dataclasses.dataclass
class Comparison:
    name: str
    baseline_label: str
    candidate_label: str
    baseline: list[float]
    candidate: list[float]
    target: float
    references: dict[str, list[float]] = dataclasses.field(default_factory=dict)

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
            **{label: values for label, values in self.references.items()},
            **{
                f"{self.candidate_label}_per_{label}": statistics.median(self.candidate)
                / statistics.median(values)
                for label, values in self.references.items()
            },
            "ratio": self.ratio,
            "target": self.target,
            "met": self.ratio <= self.target,
        }

    def report(self) -> str:
        width = max(13, *(len(label) for label in (self.baseline_label, self.candidate_label,
                                                    *self.references)))  # fmt: skip

        def row(label: str, values: list[float]) -> str:
            runs = " ".join(f"{v:.2f}" for v in values)
            return f"  {label:<{width}} median {statistics.median(values):6.2f} s   runs: {runs}"

        verdict = "met" if self.ratio <= self.target else "MISSED"
        lines = [
            f"bench {self.name}:",
            row(self.baseline_label, self.baseline),
            *(row(label, values) for label, values in self.references.items()),
            row(self.candidate_label, self.candidate),
            f"  ratio {self.ratio:.2f}x  (target <= {self.target}x: {verdict})",
        ]
        for label, values in self.references.items():
            ratio = statistics.median(self.candidate) / statistics.median(values)
            lines.append(f"  {self.candidate_label} / {label} {ratio:.2f}x  (reference)")
        return "\n".join(lines)


def compare(
    name: str,
    runs: int,
    baseline: tuple[str, Callable[[], float]],
    candidate: tuple[str, Callable[[], float]],
    target: float,
    progress: Callable[[str], None],
    references: tuple[tuple[str, Callable[[], float]], ...] = (),
) -> Comparison:
    """Run the two cycles (and any references) alternately `runs` times each."""
    result = Comparison(name, baseline[0], candidate[0], [], [], target)
    for label, _ in references:
        result.references[label] = []
    for i in range(1, runs + 1):
        for label, cycle, values in (
            (baseline[0], baseline[1], result.baseline),
            *((label, cycle, result.references[label]) for label, cycle in references),
            (candidate[0], candidate[1], result.candidate),
        ):
            values.append(cycle())
            progress(f"bench {name}: run {i}/{runs} {label} {values[-1]:.2f} s")
    return result




@dataclasses.dataclass
class Budget:
    """Measured runs against a fixed budget (no baseline to compare with: nothing is faked).

    `wall` is what the budget is about (a user waits for it); `cpu` is this
    process's CPU time beside it, which other tenants of a shared host cannot inflate.
    """

    name: str
    what: str
    budget_s: float
    wall: list[float]
    cpu: list[float]

    @property
    def met(self) -> bool:
        return statistics.median(self.wall) <= self.budget_s

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "what": self.what,
            "wall_s": self.wall,
            "cpu_s": self.cpu,
            "wall_median_s": statistics.median(self.wall),
            "cpu_median_s": statistics.median(self.cpu),
            "budget_s": self.budget_s,
            "met": self.met,
        }

    def report(self) -> str:
        runs = " ".join(f"{v:.2f}" for v in self.wall)
        verdict = "met" if self.met else "MISSED"
        return "\n".join(
            [
                f"bench {self.name}: {self.what}",
                f"  wall   median {statistics.median(self.wall):6.2f} s   runs: {runs}",
                f"  cpu    median {statistics.median(self.cpu):6.2f} s",
                f"  budget {self.budget_s:g} s wall: {verdict}",
            ]
        )
