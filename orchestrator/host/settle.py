"""Wait for a noisy host counter to settle, or to come back to a value, with a deadline.

Host counters such as /proc/meminfo `Cached` are machine-wide: other work on
the host (other tests, QEMU guests, page cache) moves them while a test runs,
and per-CPU vmstat deltas are folded in lazily. Instead of sleeping a fixed
time, these helpers sample until `window` consecutive samples agree within
`tolerance` (or, for `converge`, all lie within `tolerance` of a target), and
give up at a deadline, returning what they saw so a test can report it.

This is polling on a condition with a deadline, not a sleep used as
synchronisation: the condition is what the caller asserts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Settled:
    """The outcome of a wait: the settled `value`, whether the condition held, the samples."""

    value: int
    ok: bool
    samples: tuple[int, ...]
    elapsed: float


def _wait(
    read: Callable[[], int],
    done: Callable[[list[int]], bool],
    window: int,
    interval: float,
    timeout: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Settled:
    if window < 1:
        raise ValueError("window must be at least 1")
    start = clock()
    samples: list[int] = []
    while True:
        samples.append(read())
        recent = samples[-window:]
        if len(recent) == window and done(recent):
            return Settled(int(statistics.median(recent)), True, tuple(samples), clock() - start)
        if clock() - start >= timeout:
            return Settled(int(statistics.median(recent)), False, tuple(samples), clock() - start)
        sleep(interval)


def settle(
    read: Callable[[], int],
    *,
    tolerance: int,
    window: int = 3,
    interval: float = 0.05,
    timeout: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Settled:
    """Sample `read` until `window` consecutive samples span at most `tolerance`.

    `value` is the median of the last window; `ok` is False if the deadline
    passed first (then `value` is the median of the last samples seen).
    """
    return _wait(
        read,
        lambda recent: max(recent) - min(recent) <= tolerance,
        window,
        interval,
        timeout,
        clock,
        sleep,
    )


def converge(
    read: Callable[[], int],
    target: int,
    *,
    tolerance: int,
    window: int = 2,
    interval: float = 0.05,
    timeout: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Settled:
    """Sample `read` until `window` consecutive samples lie within `tolerance` of `target`.

    For "back to baseline" checks (H9): a single lucky sample is not enough,
    and a counter that never comes back yields `ok=False` at the deadline.
    """
    return _wait(
        read,
        lambda recent: all(abs(value - target) <= tolerance for value in recent),
        window,
        interval,
        timeout,
        clock,
        sleep,
    )
