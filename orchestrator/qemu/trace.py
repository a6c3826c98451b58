"""QEMU trace events: switch them on over QMP, collect the `log` backend's lines, parse them.

Debian's QEMU is built with the `log` trace backend: an enabled event prints one
line through `qemu_log`, to the file named by `-D` (the launcher passes
`-D <evidence>/trace.log` when the spec lists `trace_events`) or else to QEMU's
stderr (`qemu.stderr` in the evidence directory). Events switched on at run time
with QMP `trace-event-set-state` (name globs allowed) print to the same place.

This module is the one place that knows the `log` backend's lines and QEMU's event
names across versions (measured on 10.0.2 and 11.1.3):

- A line is `<name> <args>`. With `-msg timestamp=on` QEMU 10.0 puts
  `<tid>@<sec>.<usec>:` before the name, QEMU 11.1 an ISO-8601 UTC time and a space
  (`2026-11-21T06:53:45.332569Z <name> <args>`, no thread id). `split_line` reads all
  three forms.
- The discard of the shared/normal RAM backing (balloon, free page reporting,
  virtio-mem unplug, a conversion to private) is `ram_block_discard_range` up to 11.0
  and `ram_block_discard_shared_range` in 11.1 (same arguments,
  `%s@%p + 0x%zx: madvise: %d fallocate: %d ret: %d`; 11.1 has no event of the old
  name, and switching it on there is an error). Both are one notion here
  (`DISCARD_EVENTS`, `is_discard`, `TraceRecord.discarded`).
- Events are switched on by `EventGroup`: the names one thing has had across
  versions. `set_trace_events` skips the names this QEMU lacks and fails, naming the
  QEMU, only when a required group has none at all.

Formats of the events this project reads, as QEMU 10.0.2 prints them
(hw/virtio/trace-events, system/trace-events):

    ram_block_discard_range ram0@0x7fea10d38000 + 0x1000: madvise: 1 fallocate: 1 ret: 0
    virtio_balloon_handle_output section name: ram0 gpa: 0x18d39000
    virtio_balloon_to_target balloon target: 0x18000000 num_pages: 32768
    virtio_balloon_set_config actual: 256 oldactual: 0
    virtio_mem_unplug_request addr=0x108000000 nb_blocks=64
    virtio_mem_resized_usable_region old_size=0x0new_size=0x20000000   (no space: QEMU's format)

`TraceFollower` reads the complete lines appended to the file since it started (in
a thread and on demand); `TraceCollector` and `orchestrator.memory.conversions`'
observer build on it. `TraceCollector` parses each complete line, keeps running
totals (lines per event, bytes discarded by a discard event with ret 0, failed
discards) and writes the timeline.
Per-page and per-request events (a 128 MiB balloon prints 65536 lines) are
recorded as one timeline record per event name per read, with the count, bytes
and first/last arguments, so the timeline stays readable; trace.log or
qemu.stderr keeps every line. A record's time is QEMU's own stamp when lines
carry one (converted to the monotonic clock), else the time the collector read
it (at most `interval` late while the follower thread runs).
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from orchestrator.errors import QemuError, QmpError
from orchestrator.qemu.qmp import QmpCommandError
from orchestrator.timeline import Timeline, now

#: The discard of the shared/normal RAM backing (system/physmem.c), by QEMU version:
#: `ram_block_discard_range` (<= 11.0), `ram_block_discard_shared_range` (11.1). Exact
#: names, not a glob: a future trace of the guest_memfd punch must not count as one.
DISCARD_EVENTS: tuple[str, ...] = ("ram_block_discard_range", "ram_block_discard_shared_range")
_DISCARD_NAMES = frozenset(DISCARD_EVENTS)


def is_discard(name: str) -> bool:
    """Is `name` (either version's) the discard of the shared/normal RAM backing?"""
    return name in _DISCARD_NAMES


@dataclass(frozen=True)
class EventGroup:
    """Trace events that mean one thing, under every name QEMU versions gave them.

    `patterns` are names or globs; those this QEMU lacks are skipped. A `required`
    group with none of them is an error (`needs` says what QEMU would have them).
    """

    what: str
    patterns: tuple[str, ...]
    required: bool = True
    needs: str = ""


DISCARD_GROUP = EventGroup("a discard of the shared/normal RAM backing", DISCARD_EVENTS)

#: What the memory operations switch on: discards (balloon, free page reporting,
#: virtio-mem unplug all end there), and the balloon and virtio-mem devices' own events.
MEMORY_GROUPS: tuple[EventGroup, ...] = (
    DISCARD_GROUP,
    EventGroup("the virtio-balloon device", ("virtio_balloon_*",)),
    EventGroup("the virtio-mem device", ("virtio_mem_*",)),
)
#: Every name or glob of MEMORY_GROUPS: what a collector of the memory events accepts.
MEMORY_EVENTS: tuple[str, ...] = tuple(p for group in MEMORY_GROUPS for p in group.patterns)

#: Events that print a line per page or per small request (a 128 MiB balloon is 32768
#: handle_output lines and 128 set_config lines): recorded on the timeline in batches.
BATCHED_EVENTS = frozenset(
    {
        *DISCARD_EVENTS,
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

# The prefix -msg timestamp=on adds: "<tid>@<sec>.<usec>:" (10.0) or "<ISO-8601> " (11.1).
_LINE = re.compile(
    r"^(?:(?P<tid>\d+)@(?P<sec>\d+)\.(?P<usec>\d{6}):"
    r"|(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?) )?"
    r"(?P<name>[a-z][a-z0-9_]*)(?: (?P<args>.*))?$"
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


def _iso_wall(text: str) -> float:
    """Seconds since the epoch of QEMU 11.1's ISO-8601 stamp (UTC when no zone is given)."""
    stamp = datetime.datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp()


@dataclass(frozen=True)
class TraceLine:
    """One `log` backend line split into its parts: event name, argument text, stamp."""

    name: str
    args: str
    wall: float | None = None  # QEMU's wall clock (-msg timestamp=on), either prefix form
    tid: int | None = None  # only 10.0's prefix names the thread


def split_line(line: str) -> TraceLine | None:
    """Name, arguments and stamp of one line in any of the three forms; None if not a trace line."""
    match = _LINE.match(line.rstrip("\r\n"))
    if match is None:
        return None
    wall = None
    if match["sec"] is not None:
        wall = int(match["sec"]) + int(match["usec"]) / 1e6
    elif match["iso"] is not None:
        try:
            wall = _iso_wall(match["iso"])
        except ValueError:
            return None
    tid = int(match["tid"]) if match["tid"] is not None else None
    return TraceLine(match["name"], match["args"] or "", wall, tid)


def parse_discard(text: str) -> dict[str, int | str] | None:
    """The arguments of a discard line (either name): ramblock, hva ("(nil)" kept as text),
    length, madvise, fallocate, ret; None when the text is not in that format."""
    match = _DISCARD.match(text)
    return {k: _value(v) for k, v in match.groupdict().items()} if match else None


def parse_args(name: str, text: str) -> dict[str, int | str]:
    """The arguments of one trace line as a dict (numbers as ints, hex included)."""
    if is_discard(name):
        discard = parse_discard(text)
        if discard is not None:
            return discard
    elif name == "virtio_mem_resized_usable_region":
        match = _RESIZED.match(text)
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
    tid: int | None = None  # 10.0's timestamp prefix only

    @property
    def discarded(self) -> int:
        """Bytes this line says were discarded successfully (a DISCARD_EVENTS name, ret 0)."""
        if not is_discard(self.name) or self.args.get("ret") != 0:
            return 0
        length = self.args.get("length")
        return length if isinstance(length, int) else 0

    @property
    def failed_discard(self) -> bool:
        return is_discard(self.name) and self.args.get("ret", 0) != 0


def parse_line(
    line: str, read_at: float, wall_offset: float, names: Sequence[str] = ()
) -> TraceRecord | None:
    """Parse one line of QEMU's log output; None for lines that are not wanted trace events.

    `names` are the event globs to accept (all lowercase identifiers when empty);
    `wall_offset` is time.time() - now(), to turn QEMU's wall stamps into now() time.
    """
    split = split_line(line)
    if split is None:
        return None
    if names and not any(fnmatch.fnmatchcase(split.name, glob) for glob in names):
        return None
    return TraceRecord(
        name=split.name,
        args=parse_args(split.name, split.args),
        line=line.rstrip("\r\n"),
        t=read_at if split.wall is None else split.wall - wall_offset,
        qemu_wall=split.wall,
        tid=split.tid,
    )


# --- switching events on --------------------------------------------------------------------


def qemu_name(qmp: TraceMonitor) -> str:
    """The QEMU as messages name it: "QEMU 11.1.3 (Debian ...)", or "this QEMU" if unknown."""
    try:
        version = qmp.execute("query-version")
        numbers = version["qemu"]
        name = f"QEMU {numbers['major']}.{numbers['minor']}.{numbers['micro']}"
        package = str(version.get("package", "")).strip()
    except (QmpError, KeyError, TypeError, AttributeError):
        return "this QEMU"
    return f"{name} ({package})" if package else name


def available_events(qmp: TraceMonitor, patterns: Iterable[str]) -> dict[str, list[str]]:
    """{pattern: [event names this QEMU has]} via `trace-event-get-state` (globs allowed)."""
    found: dict[str, list[str]] = {}
    for pattern in patterns:
        try:
            states = qmp.execute("trace-event-get-state", {"name": pattern}) or []
        except QmpCommandError:
            # A plain name this QEMU lacks is QEMU's error 'unknown event "..."' (10.0.2,
            # 11.1.3); a glob that matches nothing is an empty list.
            states = []
        found[pattern] = sorted(str(s["name"]) for s in states)
    return found


def _as_group(item: str | EventGroup) -> EventGroup:
    return item if isinstance(item, EventGroup) else EventGroup(f"trace event {item!r}", (item,))


def set_trace_events(
    qmp: TraceMonitor,
    groups: Iterable[str | EventGroup] = MEMORY_GROUPS,
    enable: bool = True,
) -> dict[str, str]:
    """Switch the events of `groups` on (or off) and confirm it; {event: state}.

    A plain string is a required group of its own. Names and globs this QEMU lacks
    are skipped (11.1 has no `ram_block_discard_range`, 10.0 no
    `ram_block_discard_shared_range`). Raises QemuError naming the QEMU when a
    required group has none of its events, when QEMU refuses one, or when an event
    stays in the other state (a build without a trace backend reports "unavailable").
    """
    chosen = [_as_group(item) for item in groups]
    present = available_events(qmp, {p: None for g in chosen for p in g.patterns})
    missing = [g for g in chosen if g.required and not any(present[p] for p in g.patterns)]
    if missing:
        qemu = qemu_name(qmp)
        named = "; ".join(f"{g.what} ({', '.join(g.patterns)})" for g in missing)
        raise QemuError(
            f"{qemu} has no trace event for {named}",
            missing[0].needs
            or "check the names against this QEMU's `-trace help`, or use a QEMU that has them",
        )
    patterns = [p for p in present if present[p]]
    for pattern in patterns:
        try:
            qmp.execute("trace-event-set-state", {"name": pattern, "enable": enable})
        except QmpError as error:
            raise QemuError(
                f"{qemu_name(qmp)} refused to switch trace event {pattern!r}: {error.problem}",
                "check the name against this QEMU's `-trace help`",
            ) from None
    states: dict[str, str] = {}
    wanted = "enabled" if enable else "disabled"
    for pattern in patterns:
        for entry in qmp.execute("trace-event-get-state", {"name": pattern}) or []:
            states[str(entry["name"])] = str(entry["state"])
    wrong = sorted(name for name, state in states.items() if state != wanted)
    if wrong:
        raise QemuError(
            f"trace events of {qemu_name(qmp)} not {wanted}: {', '.join(wrong[:5])} "
            f"(state {states[wrong[0]]})",
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


Handled = TypeVar("Handled")


class TraceFollower(Generic[Handled]):
    """Hands every complete line appended to a file since `start()` to `handle`.

        follower = TraceFollower(path, handle)     # handle(lines, read_at) -> anything
        follower.start()                           # from the file's current end, thread on
        follower.read()                            # what is written up to now, at once
        follower.stop()                            # thread off, the rest read

    `handle` runs under the follower's lock, so once `read()` returns, every line
    written before it was handled (also those the thread was reading meanwhile). An
    unfinished last line waits for its newline. The thread reads every `interval` s.
    """

    def __init__(
        self,
        path: Path,
        handle: Callable[[list[str], float], Handled],
        *,
        interval: float = 0.05,
        name: str = "",
    ) -> None:
        self.path = Path(path)
        self.handle = handle
        self.interval = interval
        self.name = name or f"cvmlab-trace-{self.path.name}"
        self._lock = threading.Lock()
        self._offset = 0
        self._partial = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def skip_to_end(self) -> None:
        """Ignore what the file holds already: only lines written from now on count."""
        with self._lock:
            try:
                self._offset = self.path.stat().st_size
            except FileNotFoundError:
                self._offset = 0
            self._partial = b""

    def follow(self) -> None:
        """Read new lines in a thread from now on (until `stop()`)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def start(self, follow: bool = True) -> None:
        self.skip_to_end()
        if follow:
            self.follow()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.read()

    def read(self) -> Handled:
        """Handle every complete line written since the last read; what `handle` returned."""
        with self._lock:
            read_at = now()
            try:
                with open(self.path, "rb") as stream:
                    stream.seek(self._offset)
                    chunk = stream.read()
            except FileNotFoundError:
                chunk = b""
            self._offset += len(chunk)
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()  # an unfinished last line waits for its end
            return self.handle([raw.decode("utf-8", "replace") for raw in lines], read_at)

    def stop(self) -> None:
        """Stop the thread and read what is left (a vanished file is not an error)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with contextlib.suppress(OSError):
            self.read()


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
        self._lines: Counter[str] = Counter()
        self._discarded = 0
        self._discards = 0
        self._failed = 0
        self._records: list[TraceRecord] = []
        self._wall_offset = time.time() - now()
        self._follower = TraceFollower(self.path, self._handle, interval=interval)

    def start(self, follow: bool = True) -> TraceCollector:
        """Skip what the file holds already; with `follow`, read new lines in a thread."""
        self._follower.start(follow)
        return self

    def stop(self) -> TraceTotals:
        """Stop following, read what is left, return the totals."""
        self._follower.stop()
        return self.totals(drain=False)

    def __enter__(self) -> TraceCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def collect(self) -> list[TraceRecord]:
        """Read and parse every complete line written since the last read."""
        return self._follower.read()

    def _handle(self, lines: list[str], read_at: float) -> list[TraceRecord]:
        records = []
        for line in lines:
            record = parse_line(line, read_at, self._wall_offset, self.names)
            if record is not None:
                records.append(record)
        with self._lock:
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
            if is_discard(name):
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
