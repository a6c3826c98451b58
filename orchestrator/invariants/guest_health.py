"""G3, the guest stays healthy: no oops, WARN, BUG or panic; pvpanic never fired.

Two observations: the console's crash report (`orchestrator.guest.serial.CrashReport`,
seen as it happened, or QMP GUEST_PANICKED) and the guest's kernel log read at the end
(`dmesg` lines). Either one showing a crash is a FAIL carrying the lines.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.guest.serial import CrashReport, crash_lines
from orchestrator.invariants.verdict import Verdict, holds

MAX_LINES = 40


def guest_crash_verdict(crash: CrashReport | None) -> Verdict:
    """G3 from the console watch: fail with the console lines when the guest crashed."""
    if crash is None:
        return holds("G3", "the guest did not crash (console and pvpanic)", True)
    lines = crash.evidence().splitlines()[-MAX_LINES:]
    return holds(
        "G3",
        f"the guest crashed: {crash.headline()}",
        False,
        source=crash.source,
        console_lines=lines,
    )


def guest_log_verdict(dmesg_lines: Sequence[str]) -> Verdict:
    """G3 from the guest's kernel log: fail on any oops/WARN/BUG/panic line."""
    bad = crash_lines(dmesg_lines)
    return holds("G3", "guest kernel log is clean", not bad, bad_lines=list(bad[:MAX_LINES]))
