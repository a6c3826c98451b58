"""QEMU trace events: switch them on over QMP, collect the `log` backend's lines, parse them.

Debian's QEMU is built with the `log` trace backend: an enabled event prints one
line through `qemu_log`, to the file named by `-D` (the launcher passes
`-D <evidence>/trace.log` when the spec lists `trace_events`) or else to QEMU's
stderr (`qemu.stderr` in the evidence directory). Events switched on at run time
with QMP `trace-event-set-state` (name globs allowed) print to the same place.

A line is `<name> <args>`, or with `-msg timestamp=on` `<tid>@<sec>.<usec>:<name>
<args>` (QEMU's wall clock, microseconds). Formats of the events this project
reads, as QEMU 10.0.2 prints them (hw/virtio/trace-events, system/trace-events):

    ram_block_discard_range ram0@0x7fea10d38000 + 0x1000: madvise: 1 fallocate: 1 ret: 0
    virtio_balloon_handle_output section name: ram0 gpa: 0x18d39000
    virtio_balloon_to_target balloon target: 0x18000000 num_pages: 32768
    virtio_balloon_set_config actual: 256 oldactual: 0
    virtio_mem_unplug_request addr=0x108000000 nb_blocks=64
    virtio_mem_resized_usable_region old_size=0x0new_size=0x20000000   (no space: QEMU's format)

`TraceCollector` follows the file from where it stood when started, parses each
complete line, keeps running totals (lines per event, bytes discarded by
`ram_block_discard_range` with ret 0, failed discards) and writes the timeline.
Per-page and per-request events (a 128 MiB balloon prints 65536 lines) are
recorded as one timeline record per event name per read, with the count, bytes
and first/last arguments, so the timeline stays readable; trace.log or
qemu.stderr keeps every line. A record's time is QEMU's own stamp when lines
carry one (converted to the monotonic clock), else the time the collector read
it (at most `interval` late while the follower thread runs).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.errors import QemuError, QmpError
from orchestrator.timeline import Timeline, now

#: What the memory operations switch on: discards (balloon, free page reporting,
#: virtio-mem unplug all end there), and the balloon and virtio-mem devices' own events.
MEMORY_EVENTS: tuple[str, ...] = ("ram_block_discard_range", "virtio_balloon_*", "virtio_mem_*")

#: Events that print a line per page or per small request (a 128 MiB balloon is 32768
#: handle_output lines and 128 set_config lines): recorded on the timeline in batches.
BATCHED_EVENTS = frozenset(
    {
        "ram_block_discard_range",
        "virtio_balloon_handle_output",
        "virtio_balloon_get_config",
        "virtio_balloon_set_config",
        "virtio_mem_plug_request",
        "virtio_mem_unplug_request",
        "virtio_mem_state_request",
        "virtio_mem_state_response",
        "virtio_mem_send_response",
    }
)

_LINE = re.compile(
    r"^(?:(?P<tid>\d+)@(?P<sec>\d+)\.(?P<usec>\d{6}):)?(?P<name>[a-z][a-z0-9_]*)(?: (?P<args>.*))?$"
)
_DISCARD = re.compile(
    r"^(?P<ramblock>\S+)@(?P<hva>0x[0-9a-f]+|\(nil\)) \+ (?P<length>0x[0-9a-f]+): "
    r"madvise: (?P<madvise>-?\d+) fallocate: (?P<fallocate>-?\d+) ret: (?P<ret>-?\d+)$"
)
_RESIZED = re.compile(r"^old_size=(?P<old_size>0x[0-9a-f]+)\s*new_size=(?P<new_size>0x[0-9a-f]+)$")
# "key: value" or "key=value"; a key may be two words ("section name", "balloon target").
_PAIR = re.compile(r"(?P<key>[a-z_]+(?: [a-z_]+)?)(?:: |=)(?P<value>\S+)")


class TraceMonitor(Protocol):
    """The part of `orchestrator.qemu.qmp.QmpSession` trace control needs."""

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any: ...


def _value(text: str) -> int | str:
    try:
        return int(text, 16) if text.startswith("0x") else int(text)
    except ValueError:
        return text


def parse_args(name: str, text: str) -> dict[str, int | str]:
    """The arguments of one trace line as a dict (numbers as ints, hex included)."""
    special = {"ram_block_discard_range": _DISCARD, "virtio_mem_resized_usable_region": _RESIZED}
    pattern = special.get(name)
    if pattern is not None:
        match = pattern.match(text)
        if match:
            return {k: _value(v) for k, v in match.groupdict().items()}
    return {m["key"].replace(" ", "_"): _value(m["value"]) for m in _PAIR.finditer(text)}


@dataclass(frozen=True)
class TraceRecord:
    """One parsed trace line."""

    name: str
    args: dict[str, int | str]
    line: str
    t: float  # monotonic: QEMU's own stamp converted, or when the line was read
    qemu_wall: float | None = None  # QEMU's wall-clock stamp (-msg timestamp=on), if any
    tid: int | None = None

    @property
    def discarded(self) -> int:
        """Bytes this line says were discarded successfully (ram_block_discard_range, ret 0)."""
        if self.name != "ram_block_discard_range" or self.args.get("ret") != 0:
            return 0
        length = self.args.get("length")
        return length if isinstance(length, int) else 0

    @property
    def failed_discard(self) -> bool:
        return self.name == "ram_block_discard_range" and self.args.get("ret", 0) != 0


def parse_line(
    line: str, read_at: float, wall_offset: float, names: Sequence[str] = ()
) -> TraceRecord | None:
    """Parse one line of QEMU's log output; None for lines that are not wanted trace events.

    `names` are the event globs to accept (all lowercase identifiers when empty);
    `wall_offset` is time.time() - now(), to turn QEMU's wall stamps into now() time.
    """
    match = _LINE.match(line.rstrip("\n"))
    if match is None:
        return None
    name = match["name"]
    if names and not any(fnmatch.fnmatchcase(name, glob) for glob in names):
        return None
    wall = None
    t = read_at
    if match["sec"] is not None:
        wall = int(match["sec"]) + int(match["usec"]) / 1e6
        t = wall - wall_offset
    return TraceRecord(
        name=name,
        args=parse_args(name, match["args"] or ""),
        line=line.rstrip("\n"),
        t=t,
        qemu_wall=wall,
        tid=int(match["tid"]) if match["tid"] is not None else None,
    )


# --- switching events on --------------------------------------------------------------------


def set_trace_events(
    qmp: TraceMonitor, patterns: Iterable[str] = MEMORY_EVENTS, enable: bool = True
) -> dict[str, str]:
    """Switch the events matching `patterns` on (or off) and confirm it; {event: state}.

    Raises QemuError when a pattern matches no event of this QEMU or an event stays in
    the other state (QEMU built without a trace backend reports "unavailable").
    """
    patterns = list(patterns)
    for pattern in patterns:
        try:
            qmp.execute("trace-event-set-state", {"name": pattern, "enable": enable})
        except QmpError as error:
            raise QemuError(
                f"QEMU refused to switch trace event {pattern!r}: {error.problem}",
                "check the name against `qemu-system-x86_64 -trace help`",
            ) from None
    states: dict[str, str] = {}
    wanted = "enabled" if enable else "disabled"
    for pattern in patterns:
        found = qmp.execute("trace-event-get-state", {"name": pattern})
        if not found:
            raise QemuError(
                f"no trace event of this QEMU matches {pattern!r}",
                "check the name against `qemu-system-x86_64 -trace help`",
            )
        for entry in found:
            states[str(entry["name"])] = str(entry["state"])
    wrong = sorted(name for name, state in states.items() if state != wanted)
    if wrong:
        raise QemuError(
            f"trace events not {wanted}: {', '.join(wrong[:5])} (state {states[wrong[0]]})",
            "this QEMU was built without a usable trace backend; use a build with 'log'",
        )
    return states


def trace_output(evidence_dir: Path, spec_trace_events: Sequence[str]) -> Path:
    """Where a machine's trace lines go: trace.log with -D (spec trace events), else qemu.stderr."""
    return evidence_dir / ("trace.log" if spec_trace_events else "qemu.stderr")


# --- collecting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceTotals:
    """Running totals of what a collector has parsed (or the difference between two)."""

    lines: Mapping[str, int] = field(default_factory=dict)  # per event name
    discarded_bytes: int = 0  # ram_block_discard_range with ret 0
    discards: int = 0  # ram_block_discard_range lines with ret 0
    failed_discards: int = 0  # ram_block_discard_range lines with ret != 0

    def count(self, name: str) -> int:
        return int(self.lines.get(name, 0))

    def minus(self, earlier: TraceTotals) -> TraceTotals:
        """What happened between `earlier` and this snapshot."""
        names = set(self.lines) | set(earlier.lines)
        delta = {n: self.count(n) - earlier.count(n) for n in names}
        return TraceTotals(
            lines={n: v for n, v in delta.items() if v},
            discarded_bytes=self.discarded_bytes - earlier.discarded_bytes,
            discards=self.discards - earlier.discards,
            failed_discards=self.failed_discards - earlier.failed_discards,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "lines": dict(sorted(self.lines.items())),
            "discarded_bytes": self.discarded_bytes,
            "discards": self.discards,
            "failed_discards": self.failed_discards,
        }


class TraceCollector:
    """Follows QEMU's trace output from now on: parses, totals, records the timeline.

        with TraceCollector(path, timeline) as trace:     # follower thread reads every 50 ms
            before = trace.totals()
            ...                                           # the operation
            done = trace.totals().minus(before)           # totals() drains what is written

    `keep` bounds the parsed records held in memory (oldest dropped first); the
    totals count every line.
    """

    def __init__(
        self,
        path: Path,
        timeline: Timeline | None = None,
        *,
        names: Sequence[str] = MEMORY_EVENTS,
        interval: float = 0.05,
        keep: int = 20_000,
    ) -> None:
        self.path = Path(path)
        self.timeline = timeline
        self.names = tuple(names)
        self.interval = interval
        self.keep = keep
        self._lock = threading.Lock()
        self._offset = 0
        self._partial = b""
        self._lines: Counter[str] = Counter()
        self._discarded = 0
        self._discards = 0
        self._failed = 0
        self._records: list[TraceRecord] = []
        self._wall_offset = time.time() - now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, follow: bool = True) -> TraceCollector:
        """Skip what the file holds already; with `follow`, read new lines in a thread."""
        try:
            self._offset = self.path.stat().st_size
        except FileNotFoundError:
            self._offset = 0
        if follow and self._thread is None:
            self._thread = threading.Thread(
                target=self._follow, name=f"cvmlab-trace-{self.path.name}", daemon=True
            )
            self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.collect()

    def stop(self) -> TraceTotals:
        """Stop following, read what is left, return the totals."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with contextlib.suppress(OSError):
            self.collect()
        return self.totals(drain=False)

    def __enter__(self) -> TraceCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def collect(self) -> list[TraceRecord]:
        """Read and parse every complete line written since the last read."""
        with self._lock:
            read_at = now()
            try:
                with open(self.path, "rb") as handle:
                    handle.seek(self._offset)
                    chunk = handle.read()
            except FileNotFoundError:
                return []
            self._offset += len(chunk)
            data = self._partial + chunk
            lines = data.split(b"\n")
            self._partial = lines.pop()  # an unfinished last line waits for its end
            records = []
            for raw in lines:
                record = parse_line(
                    raw.decode("utf-8", "replace"), read_at, self._wall_offset, self.names
                )
                if record is not None:
                    records.append(record)
            self._account(records)
        self._record_timeline(records)
        return records

    def _account(self, records: list[TraceRecord]) -> None:
        for record in records:
            self._lines[record.name] += 1
            if record.failed_discard:
                self._failed += 1
            elif record.discarded:
                self._discarded += record.discarded
                self._discards += 1
        self._records.extend(records)
        if len(self._records) > self.keep:
            del self._records[: len(self._records) - self.keep]

    def _record_timeline(self, records: list[TraceRecord]) -> None:
        if self.timeline is None or not records:
            return
        batches: dict[str, list[TraceRecord]] = {}
        for record in records:
            if record.name in BATCHED_EVENTS:
                batches.setdefault(record.name, []).append(record)
            else:
                self.timeline.record(
                    "trace", record.name, t=record.t, args=record.args, stamp=_stamp(record)
                )
        for name, batch in batches.items():
            data: dict[str, Any] = {
                "count": len(batch),
                "first": batch[0].args,
                "last": batch[-1].args,
                "stamp": _stamp(batch[0]),
            }
            if name == "ram_block_discard_range":
                data["bytes"] = sum(r.discarded for r in batch)
                data["failed"] = sum(1 for r in batch if r.failed_discard)
            self.timeline.record("trace", name, t=batch[0].t, **data)

    def totals(self, drain: bool = True) -> TraceTotals:
        """Totals so far; with `drain`, after reading what QEMU has written up to now."""
        if drain:
            with contextlib.suppress(OSError):
                self.collect()
        with self._lock:
            return TraceTotals(
                lines=dict(self._lines),
                discarded_bytes=self._discarded,
                discards=self._discards,
                failed_discards=self._failed,
            )

    def records(self, name: str | None = None, since: float | None = None) -> list[TraceRecord]:
        """Parsed records kept in memory (optionally one event, and from time `since`)."""
        with self._lock:
            return [
                r
                for r in self._records
                if (name is None or r.name == name) and (since is None or r.t >= since)
            ]


def _stamp(record: TraceRecord) -> str:
    """How a record's time was obtained: QEMU's clock, or when the collector read the line."""
    return "qemu" if record.qemu_wall is not None else "read"
