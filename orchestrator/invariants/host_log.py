"""H8, the host stays healthy: no bug signature in the host kernel log during the test.

Observation: `orchestrator.host.kernel_log.LogDelta` (records since the baseline, the
signatures found, and whether the ring buffer overwrote records before they were
read). A splat is a FAIL whether or not the log is complete; a log with records
lost and nothing found is "incomplete", never a pass: the lost records may have held
the splat.
"""

from __future__ import annotations

from orchestrator.host.kernel_log import LogDelta
from orchestrator.invariants.verdict import Verdict, holds, incomplete

#: How many problem lines a verdict carries (the whole log is in host-dmesg.txt).
MAX_PROBLEMS = 20


def host_log_verdict(delta: LogDelta, summary: str = "host kernel log is clean") -> Verdict:
    """H8 from the kernel log delta: fail on a signature, incomplete on lost records."""
    problems = [f"{name}: {record.message}" for name, record in delta.problems][:MAX_PROBLEMS]
    if not delta.clean:
        return holds(
            "H8", summary, False, new_records=len(delta.records), problems=problems,
            incomplete=delta.incomplete,
        )  # fmt: skip
    if delta.incomplete:
        return incomplete(
            "H8",
            f"{summary}: records were overwritten in the ring buffer before cvmlab read them, "
            "so a splat may have been lost",
            new_records=len(delta.records),
        )
    return holds("H8", summary, True, new_records=len(delta.records))
