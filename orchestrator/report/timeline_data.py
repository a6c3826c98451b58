"""A test's `timeline.jsonl` read into what its plot draws: counter series, markers, counts.

`timeline.jsonl` (orchestrator.timeline) holds one record per line,
`{"t": monotonic_seconds, "source": ..., "kind": ..., ...}`. Host samples
(`source "host", kind "sample", counters {name: KiB}`) become one series per
counter. Every other record becomes a marker (operations such as punch,
convert, balloon; QMP events; verdicts; the machine's life; guest steps;
crashes), except the chatty ones (serial lines, SSH, QMP commands and
replies), which are only counted. Records of sources or kinds this module
does not know are counted, never an error; so are lines that are not JSON (a
file cut short by a killed runner).

Host samples are most of a real timeline (a balloon test writes about a
thousand; a test that follows the host for a minute, many more) and the
report reads every test's, so they are read by shape rather than one JSON
decode per line: the first sample of each shape (its literal text between the
numbers: keys, source, kind, memdev) is decoded, and every sample line of that
shape is then checked against it and its numbers read with a few bytes
operations over all those lines at once. A line that does not match its shape
exactly is decoded as JSON like every other record: what is read is what the
JSON decoder reads (tests/test_report.py compares the two readings).
"""

from __future__ import annotations

import json
import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress, islice, repeat
from pathlib import Path
from typing import Any

# Lines of a timeline read at most: a runaway recorder must not stall the report.
MAX_RECORDS = 200_000
# What every host sample line holds, as orchestrator.timeline writes it (compact JSON).
SAMPLE_TAG = ',"source":"host","kind":"sample",'
# Shapes of samples read by shape per file (backends and memdevs each have their own).
MAX_SHAPES = 8
# One marker byte per piece of a shape: control bytes JSON text never holds raw.
_MARKS = tuple(bytes([b]) for b in range(1, 32) if b not in (0x0A, 0x0D))
# Bytes a JSON number is made of.
_NUMBER_BYTES = b"0123456789+-.eE"
_SENTINEL = "\x00"
_SENTINEL_JSON = json.dumps(_SENTINEL)


@dataclass(frozen=True)
class Marker:
    t: float
    label: str
    category: str  # a MARKER_COLOURS key (orchestrator.report.plot)
    detail: str  # the record, for the hover text


@dataclass
class Series:
    """One counter over time: parallel lists in time order (values in KiB, as recorded)."""

    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def points(self) -> list[tuple[float, float]]:
        return list(zip(self.times, self.values, strict=True))


@dataclass
class TimelineData:
    series: dict[str, Series] = field(default_factory=dict)
    markers: list[Marker] = field(default_factory=list)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    bad_lines: int = 0
    t0: float | None = None

    @property
    def empty(self) -> bool:
        return not self.series and not self.markers

    def add(self, name: str, times: list[float], values: list[Any]) -> None:
        series = self.series.get(name)
        if series is None:
            series = self.series[name] = Series()
        series.times += times
        series.values += values


def _event_name(record: dict[str, Any]) -> str:
    """A QMP event's name: at the top (`event`) or in the message as recorded (`msg.event`)."""
    msg = record.get("msg")
    for value in (record.get("event"), msg.get("event") if isinstance(msg, dict) else None):
        if isinstance(value, str) and value:
            return value
    return "event"


def _category(source: str, label: str) -> str:
    if source == "verdict":
        return "verdict-fail" if label.endswith(" fail") else "verdict-pass"
    words = f"{source} {label}".lower()
    if "crash" in words or "panic" in words:
        return "crash"
    for word, category in (
        ("punch", "punch"),
        ("convert", "convert"),
        ("conversion", "convert"),
        ("balloon", "balloon"),
    ):
        if word in words:
            return category
    if "virtio-mem" in words or "memory_device" in words or "virtio_mem" in words:
        return "virtio-mem"
    return "event"


# Records too frequent or too plain to mark: the plot draws every other record as a
# marker, so a recorder added later (a new source or kind) shows up unasked.
QUIET_SOURCES = frozenset({"ssh"})
QUIET_RECORDS = frozenset(
    {("serial", "line"), ("qmp", "command"), ("qmp", "reply"), ("qmp", "greeting")}
)


def _marker(record: dict[str, Any], t: float) -> Marker | None:
    """A marker for the records worth a vertical line; None for the quiet ones."""
    source = str(record.get("source", ""))
    kind = str(record.get("kind", ""))
    if source in QUIET_SOURCES or (source, kind) in QUIET_RECORDS:
        return None
    if source == "qmp" and kind == "event":
        label = _event_name(record)
    elif source == "verdict":
        label = f"{record.get('invariant', '?')} {kind}"
    elif source in ("op", "machine"):  # operations; the guest's life (launch, ready, exited)
        label = kind
    else:
        label = f"{source} {kind}"
    detail = json.dumps(record, default=str)
    if len(detail) > 400:
        detail = detail[:400] + "..."
    return Marker(t, label, _category(source, label), detail)


def _parse_lines(lines: list[str]) -> tuple[list[Any], int]:
    """The JSON value of each non-blank line, and how many lines were not JSON.

    One decode of all lines as an array is several times faster than one per
    line; lines with a bad one (cut short by a killed runner) fall back to
    line by line.
    """
    lines = [line for line in lines if line.strip()]
    try:
        values = json.loads("[" + ",".join(lines) + "]")
        if isinstance(values, list) and len(values) == len(lines):
            return values, 0
    except ValueError:
        pass
    values, bad = [], 0
    for line in lines:
        try:
            values.append(json.loads(line))
        except ValueError:
            bad += 1
    return values, bad


def _is_number(value: Any) -> bool:
    return value.__class__ is int or value.__class__ is float  # not bool, not str


@dataclass(frozen=True)
class _Shape:
    """A host sample's text without its numbers: `pieces[0] t pieces[1] c1 ... pieces[-1]`."""

    pieces: tuple[bytes, ...]
    names: tuple[str, ...]  # the counters, in the order their numbers come

    @classmethod
    def of(cls, line: str) -> _Shape | None:
        """The shape of one sample line; None when it is not a sample of numbers."""
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if record.__class__ is not dict:
            return None
        counters = record.get("counters")
        if (
            record.get("source") != "host"
            or record.get("kind") != "sample"
            or counters.__class__ is not dict
            or not _is_number(record.get("t"))
            or not all(_is_number(v) for v in counters.values())
            or len(counters) + 2 > len(_MARKS)
        ):
            return None
        # The record re-encoded as the writer encodes it, a sentinel for each number.
        shadow = {**record, "t": _SENTINEL, "counters": dict.fromkeys(counters, _SENTINEL)}
        pieces = json.dumps(shadow, separators=(",", ":")).split(_SENTINEL_JSON)
        if len(pieces) != len(counters) + 2:
            return None  # the sentinel is elsewhere in the record too
        return cls(tuple(p.encode("ascii") for p in pieces), tuple(counters))

    @property
    def key(self) -> str:
        """Text every line of this shape holds: source, kind, other fields, the first name."""
        return self.pieces[1].decode("ascii")

    def _marked(self, lines: list[str]) -> bytes | None:
        """`lines` joined, each piece replaced by its marker byte; None unless plain ASCII text."""
        joined = "\n".join(lines)
        if not joined.isascii():
            return None
        data = joined.encode("ascii")
        marks = _MARKS[: len(self.pieces)]
        if any(mark in data for mark in marks):
            return None  # raw control bytes: not JSON text
        # Longest first: a short piece may also occur inside a longer one.
        for i in sorted(range(len(marks)), key=lambda i: -len(self.pieces[i])):
            data = data.replace(self.pieces[i], marks[i])
        return data

    def fits(self, lines: list[str]) -> list[bool] | None:
        """Which of `lines` have this shape's text around their numbers (None: cannot tell)."""
        data = self._marked(lines)
        if data is None:
            return None
        skeleton = b"".join(_MARKS[: len(self.pieces)])
        return [line == skeleton for line in data.translate(None, _NUMBER_BYTES).split(b"\n")]

    def read(self, lines: list[str]) -> tuple[list[float], list[list[Any]]] | None:
        """(times, one value list per counter) of `lines`; None unless all have this shape.

        Each piece becomes its own marker byte; what is left between the markers
        must be number bytes only, in the same order on every line (so each
        line is exactly this shape's text with numbers in it), and the numbers
        are decoded by the JSON decoder as one list (so each is a JSON number).
        """
        data = self._marked(lines)
        if data is None:
            return None
        marks = _MARKS[: len(self.pieces)]
        if data.translate(None, _NUMBER_BYTES) != b"\n".join([b"".join(marks)] * len(lines)):
            return None
        # Inner markers and line ends separate numbers; the first and last go.
        inner = bytes.maketrans(b"\n" + b"".join(marks[1:-1]), b"," * (len(marks) - 1))
        try:
            numbers = json.loads(b"[" + data.translate(inner, marks[0] + marks[-1]) + b"]")
        except ValueError:
            return None  # an empty or malformed number
        stride = len(marks) - 1
        times = list(map(float, numbers[0::stride]))
        if not (math.isfinite(min(times)) and math.isfinite(max(times))):
            return None  # an overflowing time: the JSON path counts it as a bad line
        return times, [numbers[i::stride] for i in range(1, stride)]


def _read_samples(lines: list[str], data: TimelineData) -> list[str]:
    """Read the host samples of `lines` by shape into `data`; the lines left for JSON."""
    flags = list(map(operator.contains, lines, repeat(SAMPLE_TAG)))
    samples = list(compress(lines, flags))
    leftover: list[str] = []
    remaining = samples
    for _ in range(MAX_SHAPES):
        if not remaining:
            break
        shape = _Shape.of(remaining[0])
        if shape is None or shape.key not in remaining[0]:
            leftover.append(remaining[0])
            remaining = remaining[1:]
            continue
        key = shape.key
        group = [line for line in remaining if key in line]
        if len(group) == len(remaining):
            remaining = []
        else:
            remaining = [line for line in remaining if key not in line]
        read = shape.read(group)
        if read is None:
            # Other shapes hold this one's key too (a sample with one more counter, as a
            # backing sample gains the host's): keep the lines that fit, leave the others.
            fits = shape.fits(group)
            if fits is not None and fits[0] and not all(fits):
                remaining = list(compress(group, map(operator.not_, fits))) + remaining
                group = list(compress(group, fits))
                read = shape.read(group)
        if read is None:
            leftover += group
            continue
        times, columns = read
        for name, values in zip(shape.names, columns, strict=True):
            data.add(name, times, values)
        data.counts[("host", "sample")] += len(group)
        data.t0 = min(times) if data.t0 is None else min(data.t0, min(times))
    leftover += remaining
    if not leftover:
        return list(compress(lines, map(operator.not_, flags)))
    # Keep the file's order: markers of equal time stay in it.
    left = set(leftover)
    return [line for line in lines if SAMPLE_TAG not in line or line in left]


def _consume(records: list[Any], data: TimelineData) -> None:
    """Records one by one (all but the samples read by shape) into `data`."""
    markers = data.markers
    counts: dict[tuple[Any, Any], int] = {}
    t0 = math.inf if data.t0 is None else data.t0
    bad = 0
    columns: dict[str, tuple[list[float], list[Any]]] = {}
    for record in records:
        if record.__class__ is not dict:
            bad += 1
            continue
        try:
            t = float(record["t"])
        except (KeyError, TypeError, ValueError):
            bad += 1
            continue
        if not math.isfinite(t):
            bad += 1
            continue
        if t < t0:
            t0 = t
        source, kind = record.get("source", "?"), record.get("kind", "?")
        try:
            key = (source, kind)
            counts[key] = counts.get(key, 0) + 1
        except TypeError:  # a list or dict where a name belongs
            source, kind = key = (str(source), str(kind))
            counts[key] = counts.get(key, 0) + 1
        if key in QUIET_RECORDS or source in QUIET_SOURCES:
            continue  # counted, never marked (most of what is not a sample)
        if source == "host" and kind == "sample":
            counters = record.get("counters")
            if counters.__class__ is dict:
                for name, value in counters.items():
                    if _is_number(value):
                        column = columns.get(name)
                        if column is None:
                            column = columns[str(name)] = ([], [])
                        column[0].append(t)
                        column[1].append(value)
                continue
        marker = _marker(record, t)
        if marker is not None:
            markers.append(marker)
    for name, (times, values) in columns.items():
        data.add(name, times, values)
    data.bad_lines += bad
    for (source, kind), n in counts.items():
        data.counts[(str(source), str(kind))] += n
    data.t0 = t0 if t0 != math.inf else None


def _in_order(series: Series) -> None:
    """Sort by time (then value, as tuples sort); the usual, already sorted case costs one pass."""
    times = series.times
    if all(map(operator.lt, times, islice(times, 1, None))):
        return
    pairs = sorted(zip(times, series.values, strict=True))
    series.times = [t for t, _ in pairs]
    series.values = [v for _, v in pairs]


def read_timeline(path: Path, *, by_shape: bool = True) -> TimelineData:
    """Samples, markers and a count of every (source, kind) in `path`; missing file: empty.

    `by_shape=False` decodes every line as JSON (the reference the shape reading is tested
    against).
    """
    data = TimelineData()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return data
    lines = text.splitlines()
    if len(lines) > MAX_RECORDS:
        lines = [line for line in lines if line.strip()][:MAX_RECORDS]
    if by_shape and SAMPLE_TAG in text:
        lines = _read_samples(lines, data)
    records, data.bad_lines = _parse_lines(lines)
    _consume(records, data)
    for series in data.series.values():
        _in_order(series)
    data.markers.sort(key=lambda m: m.t)
    return data
