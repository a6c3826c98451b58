"""A test's status from its verdicts and what, if anything, interrupted it.

The rule (README "What a status means"):

- FAIL: an invariant did not hold. Any failed verdict (H/G, or an S self-check)
  makes the test FAIL, whatever else happened, even when the harness broke
  afterwards (an SSH time-out after a guest oops is a FAIL with G3). The reason is
  the first failed verdict, as recorded in verdicts.json.
- ERROR: the harness could not judge: something raised (SSH or QMP broke, a bad
  spec, evidence missing) and no verdict failed.
- CANCEL: a tier or capability is missing (the scenario cancelled before judging).
- WARN: nothing failed and nothing broke, but some evidence was incomplete
  (e.g. the host kernel log lost records): never a PASS.
- PASS: every verdict held on complete evidence.

Pure: `decide` takes verdicts and a classification of what was raised, so the
rule is tested without avocado (tests/test_outcome.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from orchestrator.invariants.verdict import Verdict

StatusName = Literal["PASS", "FAIL", "ERROR", "CANCEL", "WARN"]
#: What interrupted the test: nothing, a cancel (missing tier), a failed check (the
#: verdict is in the list), or anything else (the harness could not go on).
Raised = Literal["nothing", "cancel", "check", "error"]


@dataclass(frozen=True)
class Outcome:
    status: StatusName
    reason: str


def decide(verdicts: Sequence[Verdict], raised: Raised, error: str = "") -> Outcome:
    """The status of a test that recorded `verdicts` and ended by `raised` (`error`: its text)."""
    if raised == "cancel":
        return Outcome("CANCEL", error)
    failed = [v for v in verdicts if v.failed]
    if failed:
        reason = failed[0].line()
        if len(failed) > 1:
            reason += f" (+{len(failed) - 1} more failed verdict(s) in verdicts.json)"
        if raised == "error" and error:
            reason += f"; then the harness broke: {error}"
        return Outcome("FAIL", reason)
    if raised == "check":
        # A failed check always records its verdict first: a check without one is a bug.
        return Outcome("ERROR", f"a check failed without a verdict: {error}")
    if raised == "error":
        return Outcome("ERROR", error)
    missing = [v for v in verdicts if v.incomplete]
    if missing:
        return Outcome("WARN", "evidence incomplete, nothing failed: " + missing[0].line())
    return Outcome("PASS", "")
