"""The report's timeline reading by shape, and its plot of a long series.

Host samples are read by shape (orchestrator.report.timeline_data): these tests
hold that reading to the JSON decoder's, line for line, on generated files that
mix clean samples with the lines a shape must refuse (reordered keys, spaces,
numbers JSON does not read, raw control bytes, an overflowing time, strings
where numbers belong), and check that a clean file really takes the fast path
(else the comparison proves nothing).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.bench.report import write_synthetic_job
from orchestrator.report import timeline_data
from orchestrator.report.plot import PLOT_BUCKETS, render_plot
from orchestrator.report.timeline_data import TimelineData, read_timeline


def compact(record: dict[str, object]) -> str:
    """A record as orchestrator.timeline writes it."""
    return json.dumps(record, separators=(",", ":"))


def reading(data: TimelineData) -> str:
    """All that was read, as text: NaN (JSON reads it) equals NaN, 5 differs from 5.0."""
    series = sorted((name, s.points()) for name, s in data.series.items())  # drawn by name
    counts = sorted(data.counts.items())  # the page lists them sorted
    return repr((series, data.markers, counts, data.bad_lines, data.t0))


def both_ways(path: Path) -> tuple[str, str]:
    return reading(read_timeline(path)), reading(read_timeline(path, by_shape=False))


def sample(t: float, **counters: object) -> str:
    return compact({"t": t, "source": "host", "kind": "sample", "counters": counters})


# Lines a shape must not read as a sample of the clean shape: each is either
# JSON of another shape or not JSON at all (then a bad line for both readings).
ODD_LINES = [
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Cached":3,"Shmem":1}}',  # order
    '{"t": 5.0, "source": "host", "kind": "sample", "counters": {"Shmem": 1, "Cached": 3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":01,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":+1,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":.5,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":5.,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":1e,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":-,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":,"Cached":3}}',
    '{"t":1e999,"source":"host","kind":"sample","counters":{"Shmem":1,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":"1","Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":true,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":NaN,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":1,"Cached":3}',  # cut
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":1\x03"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":1,"Shmem":2,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":1,"Cached":3},"x":1}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":[1,2]}',
    '{"t":5.0,"source":"host","kind":"sample"}',
    '{"t":5.0,"source":"host","kind":"sample","memdev":"ram1","counters":{"ram1.held":7}}',
    '{"t":5.0,"source":"host","kind":"sample","memdev":"r\\u00e9","counters":{"Shmem":7}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Sh\\u0000":1,"Cached":3}}',
    '{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":1,"Cached":3}}garbage',
    '[{"t":5.0,"source":"host","kind":"sample","counters":{"Shmem":1,"Cached":3}}]',
    '{"t":5,"source":"serial","kind":"line","text":"a \\"source\\":\\"host\\" line"}',
    '{"t":6,"source":"op","kind":"punch","data":{"source":"host","kind":"sample"}}',
    "",
    "   ",
]

numbers = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False, width=64)
)


@st.composite
def timelines(draw: st.DrawFn) -> list[str]:
    lines = []
    for i in range(draw(st.integers(0, 60))):
        kind = draw(st.sampled_from(["clean", "clean", "clean", "more", "memdev", "odd", "marker"]))
        t = draw(st.one_of(st.just(float(i)), numbers))
        if kind == "clean":
            lines.append(sample(t, Shmem=draw(numbers), Cached=draw(numbers)))
        elif kind == "more":  # the clean shape's text and one more counter
            lines.append(sample(t, Shmem=draw(numbers), Cached=draw(numbers), Dirty=1))
        elif kind == "memdev":
            record = {"t": t, "source": "host", "kind": "sample", "memdev": "ram0"}
            record["counters"] = {"ram0.held": draw(numbers), "Shmem": draw(numbers)}
            lines.append(compact(record))
        elif kind == "odd":
            # NaN is left to the single-line test: points with NaN values have no order, so
            # where they land after sorting depends on the order the points came in.
            lines.append(draw(st.sampled_from([o for o in ODD_LINES if "NaN" not in o])))
        else:
            lines.append(compact({"t": t, "source": "op", "kind": "punch", "length": 4096}))
    return lines


@settings(max_examples=150, deadline=None)
@given(timelines())
def test_reading_by_shape_is_what_json_reads(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str]
) -> None:
    path = tmp_path_factory.mktemp("timeline") / "timeline.jsonl"
    path.write_text("\n".join(lines))
    by_shape, by_json = both_ways(path)
    assert by_shape == by_json


@pytest.mark.parametrize("odd", ODD_LINES)
def test_each_odd_line_among_clean_samples_is_read_as_json_reads_it(
    tmp_path: Path, odd: str
) -> None:
    lines = [sample(float(i), Shmem=100 + i, Cached=7) for i in range(5)]
    lines.insert(2, odd)
    path = tmp_path / "timeline.jsonl"
    path.write_text("\n".join(lines) + "\n")
    by_shape, by_json = both_ways(path)
    assert by_shape == by_json


def test_a_clean_file_takes_the_shape_path_for_every_sample(tmp_path: Path) -> None:
    """Without this, the comparisons above could pass with the shape path never taken."""
    job = write_synthetic_job(tmp_path, 1, samples=300)
    path = next(job.glob("test-results/*/data/timeline.jsonl"))
    lines = path.read_text().splitlines()
    data = TimelineData()
    left = timeline_data._read_samples(lines, data)
    assert data.counts[("host", "sample")] == 300
    assert not [line for line in left if timeline_data.SAMPLE_TAG in line]
    assert reading(read_timeline(path)) == reading(read_timeline(path, by_shape=False))


def test_two_memdevs_are_two_shapes_read_alongside(tmp_path: Path) -> None:
    lines = []
    for i in range(50):
        for memdev in ("ram0", "ram1"):
            record = {"t": i + 0.25, "source": "host", "kind": "sample", "memdev": memdev}
            record["counters"] = {f"{memdev}.held": i * 4, "Shmem": 1000 - i}
            lines.append(compact(record))
    path = tmp_path / "timeline.jsonl"
    path.write_text("\n".join(lines))
    data = TimelineData()
    assert timeline_data._read_samples(lines, data) == []
    assert sorted(data.series) == ["Shmem", "ram0.held", "ram1.held"]
    assert reading(read_timeline(path)) == reading(read_timeline(path, by_shape=False))


def test_samples_that_gain_a_counter_are_a_shape_of_their_own(tmp_path: Path) -> None:
    """As a real balloon test writes them (scenarios/balloon.py, memfd-private): the backing's
    counters, and now and then the host's Shmem after them. Every sample is read by shape."""
    lines = []
    for i in range(60):
        counters: dict[str, object] = {"ram0.held": 199980 + i, "ram0.rss": 100660 - i}
        if i % 20 == 0:
            counters["Shmem"] = 524288 - i
        record = {"t": round(4340.333994 + i * 0.57, 6), "source": "host", "kind": "sample"}
        lines.append(
            compact({**record, "memdev": "ram0", "backend": "memfd", "counters": counters})
        )
    path = tmp_path / "timeline.jsonl"
    path.write_text("\n".join(lines))
    data = TimelineData()
    assert timeline_data._read_samples(lines, data) == []
    assert data.counts[("host", "sample")] == 60 and len(data.series["Shmem"].times) == 3
    assert reading(read_timeline(path)) == reading(read_timeline(path, by_shape=False))


# --- the plot drawn from a long series -------------------------------------------------


def polyline(svg: str) -> list[tuple[float, float]]:
    points = re.search(r'points="([^"]+)"', svg)
    assert points is not None
    return [(float(x), float(y)) for x, y in (p.split(",") for p in points.group(1).split())]


def test_a_long_series_is_drawn_from_lows_and_highs_and_the_plot_says_so(
    tmp_path: Path,
) -> None:
    path = tmp_path / "timeline.jsonl"
    # A fall by a step at sample 700 of 1000, and a one-sample dip at 300.
    values = [(50 if i == 300 else 1000) if i < 700 else 200 for i in range(1000)]
    path.write_text("\n".join(sample(i / 2, Shmem=v) for i, v in enumerate(values)))
    svg = render_plot(read_timeline(path))
    coords = polyline(svg)
    assert len(coords) <= 2 * PLOT_BUCKETS + 2
    ys = [y for _, y in coords]
    # The dip reaches the bottom tenth of the plot (y grows downwards; it spans 20..298).
    assert max(ys) > 270
    # The step keeps its direction: the line ends low, after having been high.
    assert ys[-1] > ys[0]
    assert "drawn: low/high per 9 samples" in svg
    assert "1000 samples, drawn as the low and high of every 9" in svg


def test_a_short_series_is_drawn_whole_without_a_note(tmp_path: Path) -> None:
    path = tmp_path / "timeline.jsonl"
    path.write_text("\n".join(sample(float(i), Shmem=i * 1024) for i in range(40)))
    svg = render_plot(read_timeline(path))
    assert len(polyline(svg)) == 40 and "drawn:" not in svg
