"""One time base for everything a test sees.

QMP commands and events, serial lines, SSH commands, trace lines and host
samples are all stamped with `now()` (CLOCK_MONOTONIC seconds) and appended
to one `timeline.jsonl`, so a single file explains a failure in order. Each
channel may also keep its own log (qmp.jsonl, serial.log); those share the
same clock.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import IO, Any


def now() -> float:
    """Seconds on the monotonic clock shared by every recorder."""
    return time.monotonic()


class JsonlWriter:
    """A thread-safe, line-buffered JSON-lines file: one record per line, flushed at once.

    Flushing per record keeps the file useful when the test runner is killed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str, separators=(",", ":"))
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Timeline:
    """Appends `{"t": now(), "source": ..., "kind": ..., ...}` records to timeline.jsonl.

    A Timeline without a path records nothing (for scripts that want none).
    """

    def __init__(self, path: Path | None = None) -> None:
        self._writer = JsonlWriter(path) if path is not None else None
        self.start = now()

    def record(self, source: str, kind: str, t: float | None = None, **data: Any) -> float:
        """Record one observation; returns its timestamp."""
        stamp = now() if t is None else t
        if self._writer is not None:
            self._writer.write({"t": round(stamp, 6), "source": source, "kind": kind, **data})
        return stamp

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> Timeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
