"""Following one QEMU's conversion events live: switch them on over QMP, feed a ledger.

Switching events on by `EventGroup` (names a QEMU lacks are skipped, a required group
with none is an error) and following the output file are `orchestrator.qemu.trace`'s;
this module binds them to the conversion events and a `ledger.ConversionLedger`, and
writes one timeline record per read (never one per line: a storm prints hundreds of
thousands).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from orchestrator.memory.conversions.events import CONVERSION_GROUPS
from orchestrator.memory.conversions.ledger import ConversionCounts, ConversionLedger
from orchestrator.qemu.trace import TraceFollower, TraceMonitor, set_trace_events
from orchestrator.timeline import Timeline

#: What the observer needs of a QMP session (`orchestrator.qemu.qmp.QmpSession`).
Monitor = TraceMonitor


def enable_conversion_events(qmp: Monitor) -> list[str]:
    """Switch the conversion events on over QMP; the event names now enabled.

    QemuError naming the QEMU when it lacks every event of a required group of
    CONVERSION_GROUPS (a build without KVM or guest_memfd support, or older than 9.1)
    or has no usable trace backend.
    """
    return sorted(set_trace_events(qmp, CONVERSION_GROUPS))


class ConversionObserver:
    """Follows one QEMU's conversion events into a ledger.

        observer = ConversionObserver(machine.qmp, trace_output(evidence, ()), timeline)
        observer.start()
        before = observer.counts()
        ...                                   # the guest converts
        done = observer.counts().minus(before)
        observer.stop()

    A follower thread reads new lines every `interval` s; `counts()` first reads what
    QEMU has written up to now. The timeline gets one record per read with the counts
    it added, never one per line.
    """

    def __init__(
        self,
        qmp: Monitor,
        path: Path,
        timeline: Timeline | None = None,
        interval: float = 0.05,
    ) -> None:
        self.qmp = qmp
        self.path = Path(path)
        self.timeline = timeline
        self.interval = interval
        self.ledger = ConversionLedger()
        self.enabled: list[str] = []
        self._follower = TraceFollower(
            self.path, self._handle, interval=interval, name="cvmlab-conversions"
        )

    def start(self) -> ConversionObserver:
        """Switch the events on, then follow the output from where it stood before."""
        self._follower.skip_to_end()
        self.enabled = enable_conversion_events(self.qmp)
        if self.timeline is not None:
            self.timeline.record("trace", "conversion-events-on", events=self.enabled)
        self._follower.follow()
        return self

    def collect(self) -> int:
        """Read every complete line written since the last read; events added."""
        return self._follower.read()

    def _handle(self, lines: list[str], read_at: float) -> int:
        before = self.ledger.counts()
        added = self.ledger.add_lines(lines)
        if added and self.timeline is not None:
            delta = self.ledger.counts().minus(before)
            self.timeline.record(
                "trace", "conversions", events=added,
                **{k: v for k, v in delta.to_json().items() if v},
            )  # fmt: skip
        return added

    def counts(self) -> ConversionCounts:
        """Totals so far, after reading what QEMU wrote up to now."""
        with contextlib.suppress(OSError):
            self.collect()
        return self.ledger.counts()

    def stop(self) -> ConversionCounts:
        self._follower.stop()
        return self.ledger.counts()

    def __enter__(self) -> ConversionObserver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
