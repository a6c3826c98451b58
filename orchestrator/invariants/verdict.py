"""Verdicts: each invariant a test checked, with the numbers that decided it.

A verdict is written to `verdicts.json` the moment it is made, so a test that
dies later still leaves what it had judged. IDs are those of docs/design.md
section 4: H1..H9 (host) and G1..G4 (guest) are invariants of the system under
test; S1..S4 are cvmlab's own self-checks (see SELF_CHECKS), never filed as an
invariant of the system, and shown apart in the report.

Statuses: "pass", "fail" (the invariant did not hold: the test FAILs),
"incomplete" (the evidence to judge was partly missing: never a PASS; the test
WARNs when nothing failed), "not-applicable".
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["pass", "fail", "incomplete", "not-applicable"]

#: cvmlab's self-checks: they prove the harness did what it meant to (a request it
#: must refuse was refused by cvmlab itself, an injected fault took effect, a step
#: ran where the platform makes it a no-op), not that the system under test holds.
SELF_CHECKS: dict[str, str] = {
    "S1": "cvmlab refused a bad request itself, before it reached QEMU or the kernel",
    "S2": "a fault the test injected on purpose took effect",
    "S3": "a step ran, on a platform where it cannot change anything (e.g. TCG: no conversion)",
    "S4": "how the guest started: cold where the scenario needs it, else restored and running",
}


def is_self_check(invariant: str) -> bool:
    """True for the S family (cvmlab's own checks), false for H/G invariants."""
    return invariant[:1] == "S" and invariant[1:].isdigit()


@dataclass(frozen=True)
class Tolerance:
    """An allowed deviation: absolute (same unit as the values) or relative (fraction)."""

    absolute: float = 0.0
    relative: float = 0.0

    def allows(self, expected: float, seen: float) -> bool:
        return abs(seen - expected) <= max(self.absolute, self.relative * abs(expected))

    def describe(self) -> str:
        parts = []
        if self.absolute:
            parts.append(f"±{self.absolute:g}")
        if self.relative:
            parts.append(f"±{self.relative:.0%}")
        return " or ".join(parts) or "exact"


@dataclass(frozen=True)
class Verdict:
    invariant: str
    status: Status
    summary: str
    expected: Any = None
    seen: Any = None
    tolerance: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    @property
    def incomplete(self) -> bool:
        return self.status == "incomplete"

    def line(self) -> str:
        """One readable line, used in failure messages."""
        text = f"{self.invariant} {self.status.upper()}: {self.summary}"
        if self.expected is not None or self.seen is not None:
            text += f" (expected {self.expected}, seen {self.seen}"
            text += f", tolerance {self.tolerance})" if self.tolerance else ")"
        return text


def within(
    invariant: str,
    summary: str,
    expected: float,
    seen: float,
    tolerance: Tolerance,
    **evidence: Any,
) -> Verdict:
    """Pass when `seen` is within `tolerance` of `expected`."""
    return Verdict(
        invariant=invariant,
        status="pass" if tolerance.allows(expected, seen) else "fail",
        summary=summary,
        expected=expected,
        seen=seen,
        tolerance=tolerance.describe(),
        evidence=evidence,
    )


def holds(invariant: str, summary: str, ok: bool, **evidence: Any) -> Verdict:
    """Pass when `ok`; `evidence` says what was looked at."""
    return Verdict(invariant, "pass" if ok else "fail", summary, evidence=evidence)


def incomplete(invariant: str, summary: str, **evidence: Any) -> Verdict:
    """The evidence to judge `invariant` was partly missing: never a pass."""
    return Verdict(invariant, "incomplete", summary, evidence=evidence)


def not_applicable(invariant: str, reason: str) -> Verdict:
    return Verdict(invariant, "not-applicable", reason)


class VerdictLog:
    """Collects verdicts and rewrites `verdicts.json` atomically after each one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.verdicts: list[Verdict] = []
        # Each verdict's JSON text, made once: rewriting the file stays linear in the
        # verdicts (a test records dozens; under TCG asdict alone was 20 ms a verdict).
        self._texts: list[str] = []

    def add(self, verdict: Verdict) -> Verdict:
        self.verdicts.append(verdict)
        if self.path is not None:
            self._texts.append(textwrap.indent(json.dumps(asdict(verdict), indent=2,
                                                          default=str), "  "))  # fmt: skip
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text("[\n" + ",\n".join(self._texts) + "\n]")
            os.replace(tmp, self.path)
        return verdict

    @property
    def failures(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.failed]
