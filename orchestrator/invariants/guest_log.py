"""G3: signatures of a sick guest kernel in its log.

The same signatures the serial watcher reacts to live; here they judge a
whole `dmesg` after the fact. Sources: the lines Linux prints for a panic,
an oops, BUG()/WARN() (kernel/panic.c, lib/bug.c), a general protection
fault, and the confidential-guest failures intel/lkvs' launcher scans for
(`unchecked MSR access error`, `Unexpected #VE`).
"""

from __future__ import annotations

import re

GUEST_BAD_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"Kernel panic",
        r"\bOops\b",
        r"\bBUG:",
        r"kernel BUG at",
        r"WARNING:",
        r"general protection fault",
        r"Call Trace:",
        r"unchecked MSR access error",
        r"Unexpected #VE",
        r"#VC exception",
        r"rcu_sched self-detected stall|rcu: INFO: rcu_.* detected stalls",
        r"soft lockup",
    )
)


def find_bad_lines(log: str) -> list[str]:
    """The lines of a kernel log that match a sickness signature, in order."""
    return [line for line in log.splitlines() if any(p.search(line) for p in GUEST_BAD_PATTERNS)]
