"""A test's timeline drawn as SVG by hand: host memory counters over time, events marked.

What is drawn comes from orchestrator.report.timeline_data (the file format is
described there). Host samples become lines, one per counter, drawn as the
change since the counter's first sample: what a punch, a balloon or a
conversion should move is a difference, and a 2 MiB drop is invisible on a
4 GiB absolute scale. Every other record worth it is a vertical marker.

A long series is drawn from the lowest and highest value of each run of
consecutive samples (PLOT_BUCKETS runs): a spike or a step stays visible at
the plot's resolution, and a page costs the same whatever the test's length.
The plot says so when it does, with the number of samples.
"""

from __future__ import annotations

import math
import operator
from html import escape
from itertools import chain

from orchestrator.report.timeline_data import (
    MAX_RECORDS,
    Marker,
    Series,
    TimelineData,
    read_timeline,
)

__all__ = ["MAX_RECORDS", "Marker", "Series", "TimelineData", "read_timeline", "render_plot"]

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


# Runs of samples a long series is drawn from (two points each): about 6 px each.
PLOT_BUCKETS = 120


def _decimate(series: Series, buckets: int) -> tuple[list[float], list[float], int]:
    """(times, values, run length): the lowest and highest value of each run of samples.

    Runs of `k` consecutive samples (k = 1: every sample, when there are at most
    2 * buckets). Each run gives two points, at its first and last sample's time,
    in the order of the run's direction (a fall draws high then low), so steps
    keep their direction and a one-sample spike keeps its height. The work is
    done by min/max over strided slices, not a Python loop over samples.
    """
    times, values = series.times, series.values
    n = len(values)
    if n <= 2 * buckets:
        return times, values, 1
    k = -(-n // buckets)
    full = n - n % k
    strided = [values[j:full:k] for j in range(k)]
    lows, highs = list(map(min, *strided)), list(map(max, *strided))
    firsts, lasts = strided[0], strided[-1]
    starts, ends = times[0:full:k], times[k - 1 : full : k]
    if full < n:  # a shorter last run
        lows.append(min(values[full:]))
        highs.append(max(values[full:]))
        firsts.append(values[full])
        lasts.append(values[-1])
        starts.append(times[full])
        ends.append(times[-1])
    xs = list(chain.from_iterable(zip(starts, ends, strict=True)))
    pairs = zip(lows, highs, map(operator.ge, lasts, firsts), strict=True)
    ys = list(chain.from_iterable([(lo, hi) if up else (hi, lo) for lo, hi, up in pairs]))
    return xs, ys, k


def _pick_series(series: dict[str, Series]) -> list[str]:
    """The counters that moved most (then by name), at most MAX_SERIES."""

    def movement(name: str) -> float:
        values = series[name].values
        return max(values) - min(values)

    named = [n for n in series if series[n].values]
    return sorted(named, key=lambda n: (-movement(n), n))[:MAX_SERIES]


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
    ends = [data.series[n].times[-1] for n in names] + [m.t for m in data.markers]
    t_high = max(ends, default=t0) - t0
    t_span = t_high if t_high > 0 else 1.0
    # Values: MiB changed since the counter's first sample (counters are KiB).
    firsts = {n: data.series[n].values[0] for n in names}
    lows = [(min(data.series[n].values) - firsts[n]) / 1024.0 for n in names]
    highs = [(max(data.series[n].values) - firsts[n]) / 1024.0 for n in names]
    v_low, v_high = min(*lows, 0.0, 0.0), max(*highs, 0.0, 0.0)
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
    run = 1
    for i, name in enumerate(names):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        series = data.series[name]
        times, values, k = _decimate(series, PLOT_BUCKETS)
        run = max(run, k)
        # Pixels straight from KiB and seconds: one multiply-add per coordinate, this
        # being the report's hottest loop.
        sx, sy = plot_w / t_span, plot_h / (v_high - v_low) / 1024.0
        bx = left - t0 * sx
        by = top + plot_h + (v_low * 1024.0 + firsts[name]) * sy
        pairs = zip(times, values, strict=True)
        coords = " ".join([f"{round(bx + t * sx)},{round(by - v * sy)}" for t, v in pairs])
        raw = series.values
        drawn = f", drawn as the low and high of every {k}" if k > 1 else ""
        hover = (
            f"{name}: first {firsts[name]:.0f} KiB, min {min(raw):.0f}, max {max(raw):.0f}, "
            f"last {raw[-1]:.0f} KiB ({len(raw)} samples{drawn})"
        )
        out.append(
            f'<g class="series"><title>{escape(hover)}</title>'
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{coords}"/>'
        )
        if len(times) == 1:
            out.append(
                f'<circle cx="{x(times[0] - t0):.1f}" '
                f'cy="{y((values[0] - firsts[name]) / 1024.0):.1f}" r="2.5" fill="{colour}"/>'
            )
        ly = top + 8 + i * 18
        out.append(
            f'<rect x="{left + plot_w + 12}" y="{ly}" width="14" height="3" fill="{colour}"/>'
            f'<text x="{left + plot_w + 30}" y="{ly + 5}" class="legend">'
            f"{escape(name[:22])}</text></g>"
        )
    hidden = len(data.series) - len(names)
    notes = []
    if run > 1:
        notes.append(f"drawn: low/high per {run} samples")
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
