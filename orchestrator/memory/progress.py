"""Following a device towards a target over QMP: a query to read it, an event to confirm it.

Balloon and virtio-mem work the same way: the host sets a target, the guest driver
moves towards it in steps, and QEMU reports the state in a query (`query-balloon`
`actual`, `query-memory-devices` `size`) and in an event (BALLOON_CHANGE,
MEMORY_DEVICE_SIZE_CHANGE). The events are rate-limited by QEMU's monitor (one
per second, per device for MEMORY_DEVICE_SIZE_CHANGE: monitor/monitor.c
`monitor_qapi_event_conf`), so the last step can be reported up to a second late.
`follow` therefore reads the query between events (waking early on each event),
which gives the exact moment the target was reached, and then waits for the event
that reports the final value, so both of QEMU's channels agree.

Stopping: the value reaches the target; or it has not moved for `stall` seconds
(a guest that cannot give more memory: the Linux balloon driver keeps retrying
silently, virtio-mem retries with back-off); or the deadline passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.errors import QmpError
from orchestrator.qemu.qmp import QmpEvent
from orchestrator.timeline import now

#: How long after the query shows the final value its (rate-limited) event may lag.
EVENT_GRACE = 3.0


class EventSource(Protocol):
    """The part of `orchestrator.qemu.qmp.QmpSession` `follow` needs."""

    @property
    def connected(self) -> bool: ...

    def events(self, name: str | None = None) -> list[QmpEvent]: ...

    def wait_event(
        self,
        name: str,
        predicate: Callable[[QmpEvent], bool] | None = None,
        after: int = 0,
        timeout: float = ...,
    ) -> QmpEvent: ...


@dataclass(frozen=True)
class Progress:
    """How a device moved from `before` towards `target` after a command sent at `started`."""

    target: int
    before: int
    after: int
    reached: bool
    stalled: bool
    started: float  # now() when the command was sent
    seconds: float  # command -> target reached (by the query), or -> stall/deadline
    samples: tuple[tuple[float, int], ...]  # (now(), value) each time the query changed
    events: tuple[tuple[float, int], ...]  # (now(), value) of the device's events
    event_seconds: float | None  # command -> the event reporting the final value

    @property
    def moved(self) -> int:
        """before - after: positive when the device took memory from the guest."""
        return self.before - self.after

    @property
    def rate(self) -> float | None:
        """Bytes per second from the command to the last change (None if nothing moved)."""
        if not self.samples or self.after == self.before:
            return None
        elapsed = self.samples[-1][0] - self.started
        return abs(self.after - self.before) / elapsed if elapsed > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "before": self.before,
            "after": self.after,
            "reached": self.reached,
            "stalled": self.stalled,
            "seconds": round(self.seconds, 6),
            "event_seconds": None if self.event_seconds is None else round(self.event_seconds, 6),
            "rate_bytes_per_s": None if self.rate is None else round(self.rate),
            "steps": len(self.samples),
            "events": [(round(t - self.started, 6), v) for t, v in self.events],
        }


def _pause(qmp: EventSource, event: str, after: int, seconds: float) -> int:
    """Wait up to `seconds` for the next `event`; returns the sequence number to wait after."""
    if seconds <= 0:
        return after
    try:
        got = qmp.wait_event(event, after=after, timeout=seconds)
    except QmpError:
        if not qmp.connected:
            raise
        return after
    return got.seq + 1


def follow(
    read: Callable[[], int],
    target: int,
    qmp: EventSource,
    event: str,
    event_value: Callable[[QmpEvent], int | None],
    *,
    before: int,
    mark: int,
    started: float,
    timeout: float,
    stall: float,
    interval: float = 0.05,
    event_grace: float = EVENT_GRACE,
) -> Progress:
    """Follow `read()` from `before` to `target` (see the module docstring).

    `mark` is the QMP event sequence number taken before the command, `started` the
    now() when it was sent, `event_value(e)` the value an event reports (None: another
    device's event).
    """
    deadline = started + timeout
    samples: list[tuple[float, int]] = []
    last_value, last_change = before, started
    seen = mark
    reached = stalled = False
    finished = started
    while True:
        value = read()
        finished = now()
        if value != last_value:
            samples.append((finished, value))
            last_value, last_change = value, finished
        if value == target:
            reached = True
            break
        if finished - last_change >= stall:
            stalled = True
            break
        if finished >= deadline:
            break
        seen = _pause(qmp, event, seen, min(interval, deadline - finished))
    event_seconds = None
    if last_value != before:
        try:
            confirming = qmp.wait_event(
                event, lambda e: event_value(e) == last_value, after=mark, timeout=event_grace
            )
            event_seconds = confirming.t - started
        except QmpError:
            if not qmp.connected:
                raise
    events = tuple(
        (e.t, reported)
        for e in qmp.events(event)
        if e.seq >= mark and (reported := event_value(e)) is not None
    )
    return Progress(
        target=target,
        before=before,
        after=last_value,
        reached=reached,
        stalled=stalled,
        started=started,
        seconds=(samples[-1][0] if reached and samples else finished) - started,
        samples=tuple(samples),
        events=events,
        event_seconds=event_seconds,
    )
