"""A test's timeline drawn as SVG by hand: host memory counters over time, events marked.

`timeline.jsonl` (orchestrator.timeline) holds one record per line,
`{"t": monotonic_seconds, "source": ..., "kind": ..., ...}`. Host samples
(`source "host", kind "sample", counters {name: KiB}`) become lines, one per
counter, drawn as the change since the counter's first sample: what a punch,
a balloon or a conversion should move is a difference, and a 2 MiB drop is
invisible on a 4 GiB absolute scale. Every other record becomes a vertical
marker (operations such as punch, convert, balloon; QMP events; verdicts; the
machine's life; guest steps; crashes), except the chatty ones (serial lines,
SSH, QMP commands and replies), which are only counted.
Records of sources or kinds this module does not know are counted, never an
error; so are lines that are not JSON (a file cut short by a killed runner).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

# Lines of a timeline read at most: a runaway recorder must not stall the report.
MAX_RECORDS = 200_000
MAX_SERIES = 8
MAX_MARKERS = 400
SERIES_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
)
MARKER_COLOURS = {
    "punch": "#d62728",
    "convert": "#6a3d9a",
    "balloon": "#1f78b4",
    "virtio-mem": "#33a02c",
    "verdict-pass": "#2ca02c",
    "verdict-fail": "#d62728",
    "crash": "#b00020",
    "event": "#555555",
}


@dataclass(frozen=True)
class Marker:
    t: float
    label: str
    category: str  # a MARKER_COLOURS key
    detail: str  # the record, for the hover text


@dataclass
class TimelineData:
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    markers: list[Marker] = field(default_factory=list)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    bad_lines: int = 0
    t0: float | None = None

    @property
    def empty(self) -> bool:
        return not self.series and not self.markers


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


def _parse_lines(text: str) -> tuple[list[Any], int]:
    """The JSON value of each non-blank line, and how many lines were not JSON.

    One decode of the whole file as an array is several times faster than one
    per line; a file with a bad line (cut short by a killed runner) falls
    back to line by line.
    """
    lines = [line for line in text.splitlines() if line.strip()][:MAX_RECORDS]
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


def read_timeline(path: Path) -> TimelineData:
    """Samples, markers and a count of every (source, kind) in `path`; missing file: empty."""
    data = TimelineData()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return data
    records, data.bad_lines = _parse_lines(text)
    # The hottest loop of the report (a test's timeline holds thousands of
    # samples): plain dicts and local names rather than Counter and setdefault.
    series = data.series
    markers = data.markers
    counts: dict[tuple[Any, Any], int] = {}
    t0 = math.inf
    bad = 0
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
            key = (str(source), str(kind))
            counts[key] = counts.get(key, 0) + 1
        if source == "host" and kind == "sample":
            counters = record.get("counters")
            if counters.__class__ is dict:
                for name, value in counters.items():
                    if value.__class__ is int or value.__class__ is float:  # not bool, not str
                        points = series.get(name)
                        if points is None:
                            points = series[str(name)] = []
                        points.append((t, value))
                continue
        marker = _marker(record, t)
        if marker is not None:
            markers.append(marker)
    data.bad_lines += bad
    for (source, kind), n in counts.items():
        data.counts[(str(source), str(kind))] += n
    data.t0 = t0 if t0 != math.inf else None
    for points in series.values():
        points.sort()
    data.markers.sort(key=lambda m: m.t)
    return data


def nice_step(span: float, target_ticks: int = 5) -> float:
    """A tick step of 1, 2 or 5 times a power of ten giving about `target_ticks` ticks."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target_ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return float(factor * power)
    return float(10 * power)


def _ticks(low: float, high: float) -> list[float]:
    step = nice_step(high - low)
    first = math.ceil(low / step) * step
    ticks: list[float] = []
    value = first
    while value <= high + step * 1e-9 and len(ticks) < 50:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _thin(points: list[tuple[float, float]], buckets: int) -> list[tuple[float, float]]:
    """At most about 2*buckets points, keeping each bucket's min and max (spikes stay visible)."""
    if len(points) <= 2 * buckets:
        return points
    t_low, t_high = points[0][0], points[-1][0]
    width = (t_high - t_low) / buckets or 1.0
    kept: list[tuple[float, float]] = []
    bucket: list[tuple[float, float]] = []
    current = 0
    for point in points:
        index = min(int((point[0] - t_low) / width), buckets - 1)
        if index != current and bucket:
            low, high = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
            kept.extend(sorted({low, high}))
            bucket = []
        current = index
        bucket.append(point)
    if bucket:
        low, high = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        kept.extend(sorted({low, high}))
    return kept


def _pick_series(series: dict[str, list[tuple[float, float]]]) -> list[str]:
    """The counters that moved most (then by name), at most MAX_SERIES."""

    def movement(name: str) -> float:
        values = [v for _, v in series[name]]
        return max(values) - min(values)

    return sorted(series, key=lambda n: (-movement(n), n))[:MAX_SERIES]


def render_plot(data: TimelineData, width: int = 960, height: int = 340) -> str:
    """The timeline as one inline `<svg>` (no script, no external reference).

    Without host samples it is a shorter strip of event markers, with no value axis.
    """
    names = _pick_series(data.series)
    if not names:
        height = min(height, 190)
    left, right, top, bottom = 70, 190, 20, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    t0 = data.t0 or 0.0
    times = [t for n in names for t, _ in data.series[n]] + [m.t for m in data.markers]
    t_high = max(times, default=t0) - t0
    t_span = t_high if t_high > 0 else 1.0
    # Values: MiB changed since the counter's first sample (counters are KiB).
    deltas = {
        n: [(t - t0, (v - data.series[n][0][1]) / 1024.0) for t, v in data.series[n]] for n in names
    }
    values = [v for pts in deltas.values() for _, v in pts] or [0.0]
    v_low, v_high = min(*values, 0.0), max(*values, 0.0)
    if v_high - v_low < 1e-9:
        v_low, v_high = v_low - 1.0, v_high + 1.0
    pad = (v_high - v_low) * 0.05
    v_low, v_high = v_low - pad, v_high + pad

    def x(t: float) -> float:
        return left + (t / t_span) * plot_w

    def y(v: float) -> float:
        return top + plot_h - (v - v_low) / (v_high - v_low) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="host memory counters over time">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" '
        f'stroke="#999"/>',
    ]
    for tick in _ticks(v_low, v_high) if names else []:
        ty = y(tick)
        out.append(
            f'<line x1="{left}" y1="{ty:.1f}" x2="{left + plot_w}" y2="{ty:.1f}" '
            f'stroke="{"#888" if tick == 0 else "#eee"}"/>'
            f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end" class="tick">'
            f"{_fmt(tick)}</text>"
        )
    for tick in _ticks(0.0, t_span):
        tx = x(tick)
        out.append(
            f'<line x1="{tx:.1f}" y1="{top + plot_h}" x2="{tx:.1f}" y2="{top + plot_h + 4}" '
            f'stroke="#999"/><text x="{tx:.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
            f'class="tick">{_fmt(tick)}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle" class="axis">'
        f"seconds since the first record</text>"
    )
    if names:
        out.append(
            f'<text transform="translate(14 {top + plot_h / 2:.0f}) rotate(-90)" '
            f'text-anchor="middle" class="axis">MiB changed since first sample</text>'
        )
    last_label_x = -1e9
    for marker in data.markers[:MAX_MARKERS]:
        mx = x(marker.t - t0)
        colour = MARKER_COLOURS.get(marker.category, MARKER_COLOURS["event"])
        out.append(
            f'<g class="marker {marker.category}"><title>{escape(marker.detail)}</title>'
            f'<line x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{top + plot_h}" '
            f'stroke="{colour}" stroke-dasharray="4 3"/>'
        )
        if mx - last_label_x >= 12:
            out.append(
                f'<text transform="translate({mx + 3:.1f} {top + 4}) rotate(90)" '
                f'class="mlabel" fill="{colour}">{escape(marker.label[:28])}</text>'
            )
            last_label_x = mx
        out.append("</g>")
    for i, name in enumerate(names):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        points = _thin(deltas[name], plot_w)
        # x() and y() inlined: this is the report's hottest loop.
        sx, sy, base = plot_w / t_span, plot_h / (v_high - v_low), top + plot_h
        coords = " ".join(
            f"{round(left + t * sx)},{round(base - (v - v_low) * sy)}" for t, v in points
        )
        first, raw = data.series[name][0][1], [v for _, v in data.series[name]]
        hover = (
            f"{name}: first {first:.0f} KiB, min {min(raw):.0f}, max {max(raw):.0f}, "
            f"last {raw[-1]:.0f} KiB ({len(raw)} samples)"
        )
        out.append(
            f'<g class="series"><title>{escape(hover)}</title>'
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{coords}"/>'
        )
        if len(points) == 1:
            (t, v) = points[0]
            out.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>')
        ly = top + 8 + i * 18
        out.append(
            f'<rect x="{left + plot_w + 12}" y="{ly}" width="14" height="3" fill="{colour}"/>'
            f'<text x="{left + plot_w + 30}" y="{ly + 5}" class="legend">'
            f"{escape(name[:22])}</text></g>"
        )
    hidden = len(data.series) - len(names)
    notes = []
    if hidden > 0:
        notes.append(f"{hidden} steadier counter(s) not drawn")
    if len(data.markers) > MAX_MARKERS:
        notes.append(f"{len(data.markers) - MAX_MARKERS} later events not drawn")
    if not names:
        notes.append("no host memory samples")
    for i, note in enumerate(notes):
        out.append(
            f'<text x="{left + plot_w + 12}" y="{top + plot_h - 6 - i * 14}" class="note">'
            f"{escape(note)}</text>"
        )
    out.append("</svg>")
    return "".join(out)
