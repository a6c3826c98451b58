"""The guest's serial console: every line kept, crashes noticed as they appear.

The launcher feeds QEMU's stdout (the guest console) into a `SerialConsole` line by
line from a reader thread. The console keeps every line with its `now()` timestamp
(and records it to the Timeline as source "serial"), wakes up anyone waiting for a
pattern, and recognises the kernel's crash reports (panic, Oops, BUG, WARNING,
general protection fault, Call Trace) the moment they are printed, so a test that
waits for something else fails at once with the console evidence instead of
running into its timeout.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from orchestrator.errors import GuestCrashed, GuestError
from orchestrator.timeline import Timeline, now

# Kernel crash reports, matched at the start of the message (after the optional
# "[    1.234567] " printk timestamp) so that a command that merely prints or
# greps these words does not count as a crash.
_PRINTK_PREFIX = r"^(?:<\d+>)?(?:\[\s*\d+\.\d+\]\s*)?"
# Messages some subsystems prefix with their name ("tdx: ", "watchdog: ", "rcu: ").
_SUBSYSTEM = r"(?:[\w/.-]+: )?"
DEFAULT_CRASH_PATTERNS: tuple[str, ...] = (
    r"Kernel panic - not syncing",
    r"Oops\b",
    _SUBSYSTEM + r"BUG:",  # incl. "watchdog: BUG: soft lockup"
    r"kernel BUG at",
    r"WARNING:",
    r"general protection fault",
    r"Call Trace:",
    # Confidential guests (intel/lkvs' launcher scans for these; arch/x86/coco/tdx/tdx.c).
    r"unchecked MSR access error",
    _SUBSYSTEM + r"Unexpected #VE",
    # RCU stalls (kernel/rcu/tree_stall.h): "rcu: INFO: rcu_preempt self-detected stall".
    r"rcu: INFO: rcu_\w+ (?:self-)?detected stall",
)

# The kernel closes each report with "---[ end trace <id> ]---" (WARN, BUG, Oops)
# or "---[ end Kernel panic - not syncing: ... ]---".
_REPORT_END = re.compile(r"---\[ end (?:trace|Kernel panic)")

# How many console lines before and after the crash line a report shows.
CONTEXT_BEFORE = 20
CONTEXT_AFTER = 60


@dataclass(frozen=True)
class ConsoleLine:
    """One console line (without its line ending) and when it was read."""

    t: float
    text: str


@dataclass
class CrashReport:
    """Why we believe the guest crashed, with the console lines around it.

    `source` is "serial" (a crash line on the console) or "qmp" (a GUEST_PANICKED
    event). `context` is the console at the time of detection; `evidence()` renders
    the freshest view, including lines printed after the crash line.
    """

    source: str
    t: float
    line: str
    context: list[str] = field(default_factory=list)
    console: SerialConsole | None = field(default=None, repr=False, compare=False)
    line_index: int | None = None

    def _serial_index(self) -> int | None:
        """The console line that reports the crash, if the console has seen one."""
        if self.line_index is not None:
            return self.line_index
        seen = self.console.serial_crash if self.console is not None else None
        return seen.line_index if seen is not None else None

    def evidence(self) -> str:
        """The crash line and the console lines around it, as one text block."""
        if self.console is not None:
            index = self._serial_index()
            if index is not None:
                lines = self.console.context(index)
            else:
                lines = self.console.tail(CONTEXT_BEFORE + CONTEXT_AFTER)
            if lines:
                return "\n".join(lines)
        return "\n".join(self.context) if self.context else self.line

    def headline(self) -> str:
        """One line: the console's crash line, and the event when QMP saw it first."""
        seen = self.console.serial_crash if self.console is not None else None
        if self.source != "serial" and seen is not None:
            return f"{seen.line} ({self.line})"
        return self.line

    def error(self) -> GuestCrashed:
        """The exception a test sees for this crash."""
        return GuestCrashed(
            f"guest crashed: {self.headline()}",
            "see serial.log and the console lines below; the kernel's report names the cause",
            detail=self.evidence(),
        )

    def __str__(self) -> str:
        return f"{self.headline()}\n{self.evidence()}"


class SerialConsole:
    """A line-fed console log with pattern waits and crash detection.

    Thread-safe: one thread feeds lines, any number of threads wait. `on_crash` is
    called (from the feeding thread) with the first crash report only.
    """

    def __init__(
        self,
        timeline: Timeline | None = None,
        on_crash: Callable[[CrashReport], None] | None = None,
        crash_patterns: Iterable[str] = DEFAULT_CRASH_PATTERNS,
    ) -> None:
        self._timeline = timeline
        self._on_crash = on_crash
        self._crash_re = re.compile(
            _PRINTK_PREFIX + "(?:" + "|".join(f"(?:{p})" for p in crash_patterns) + ")"
        )
        self._lines: list[ConsoleLine] = []
        self._cond = threading.Condition()
        self._crash: CrashReport | None = None  # seen on this console
        self._noted: CrashReport | None = None  # reported from elsewhere (QMP)
        self._ended: str | None = None

    # --- feeding -------------------------------------------------------------

    def feed(self, text: str, t: float | None = None) -> ConsoleLine:
        """Add one line (line ending stripped) and check it for a crash."""
        stamp = now() if t is None else t
        line = ConsoleLine(stamp, text.rstrip("\r\n"))
        report: CrashReport | None = None
        with self._cond:
            index = len(self._lines)
            self._lines.append(line)
            if self._crash is None and self._crash_re.search(line.text):
                start = max(0, index - CONTEXT_BEFORE)
                report = CrashReport(
                    source="serial",
                    t=stamp,
                    line=line.text,
                    context=[x.text for x in self._lines[start:]],
                    console=self,
                    line_index=index,
                )
                self._crash = report
            self._cond.notify_all()
        if self._timeline is not None:
            self._timeline.record("serial", "line", t=stamp, text=line.text)
            if report is not None:
                self._timeline.record("serial", "crash", t=stamp, text=line.text)
        if report is not None and self._on_crash is not None:
            self._on_crash(report)
        return line

    def note_crash(self, report: CrashReport) -> None:
        """Record a crash seen elsewhere (e.g. QMP GUEST_PANICKED) and wake waiters."""
        with self._cond:
            if self._noted is None:
                self._noted = report
            self._cond.notify_all()

    def end(self, reason: str) -> None:
        """The console will get no more lines (QEMU exited): waiters fail at once."""
        with self._cond:
            if self._ended is None:
                self._ended = reason
            self._cond.notify_all()

    # --- reading ---------------------------------------------------------------

    @property
    def crash(self) -> CrashReport | None:
        """The first crash seen on the console, else one noted from elsewhere."""
        with self._cond:
            return self._crash or self._noted

    @property
    def serial_crash(self) -> CrashReport | None:
        """The first crash line seen on this console."""
        with self._cond:
            return self._crash

    def wait_settled(self, timeout: float) -> bool:
        """Wait until the kernel's crash report is complete (at most `timeout` s).

        Complete means: the console ended (QEMU exited, as it does after a panic
        with panic=-1), or a crash line was seen and the kernel's closing
        `---[ end ... ]---` line followed it. Used before raising GuestCrashed, so
        the error quotes the whole report (call trace included), which trails the
        first crash line (or the QMP event) by milliseconds.
        """
        deadline = now() + timeout
        with self._cond:
            while not self._settled_locked():
                remaining = deadline - now()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def _settled_locked(self) -> bool:
        if self._ended is not None:
            return True
        if self._crash is None or self._crash.line_index is None:
            return False
        return any(
            _REPORT_END.search(x.text) for x in self._lines[self._crash.line_index :]
        )

    @property
    def lines(self) -> list[ConsoleLine]:
        """A copy of every line so far."""
        with self._cond:
            return list(self._lines)

    def mark(self) -> int:
        """The index the next line will get: pass it as `after` to wait only for new lines."""
        with self._cond:
            return len(self._lines)

    def tail(self, count: int) -> list[str]:
        with self._cond:
            return [x.text for x in self._lines[-count:]] if count > 0 else []

    def context(
        self, index: int, before: int = CONTEXT_BEFORE, after: int = CONTEXT_AFTER
    ) -> list[str]:
        """The text of the lines around `index`."""
        with self._cond:
            start = max(0, index - before)
            return [x.text for x in self._lines[start : index + after + 1]]

    def find(self, pattern: str | re.Pattern[str], after: int = 0) -> ConsoleLine | None:
        """The first line at or after index `after` that matches `pattern`."""
        regex = _compile(pattern)
        with self._cond:
            return self._find_locked(regex, after)

    def _find_locked(self, regex: re.Pattern[str], after: int) -> ConsoleLine | None:
        for line in self._lines[after:]:
            if regex.search(line.text):
                return line
        return None

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        after: int = 0,
    ) -> ConsoleLine:
        """Wait until a line at or after index `after` matches `pattern`.

        A string is a literal substring; pass a compiled regex for more. Raises
        GuestCrashed at once when a crash is seen (before the match), GuestError
        when the console ends (QEMU exited) or the timeout passes.
        """
        regex = _compile(pattern)
        deadline = now() + timeout
        with self._cond:
            while True:
                found = self._find_locked(regex, after)
                if found is not None:
                    return found
                crash = self._crash or self._noted
                if crash is not None:
                    raise crash.error()
                if self._ended is not None:
                    raise GuestError(
                        f"console ended before {regex.pattern!r} appeared: {self._ended}",
                        "see serial.log and qemu.stderr",
                        detail="\n".join(x.text for x in self._lines[-CONTEXT_BEFORE:]),
                    )
                remaining = deadline - now()
                if remaining <= 0:
                    raise GuestError(
                        f"{regex.pattern!r} did not appear on the console within {timeout:g} s",
                        "the guest is slow or stuck: see serial.log (last lines below)",
                        detail="\n".join(x.text for x in self._lines[-CONTEXT_BEFORE:]),
                    )
                self._cond.wait(remaining)


def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    return pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))


def crash_lines(
    lines: Sequence[str], patterns: Iterable[str] = DEFAULT_CRASH_PATTERNS
) -> list[str]:
    """The lines of a console log that report a kernel crash (for after-the-fact checks)."""
    regex = re.compile(_PRINTK_PREFIX + "(?:" + "|".join(f"(?:{p})" for p in patterns) + ")")
    return [line for line in lines if regex.search(line)]
