"""One clock and one record for everything a test sees."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from orchestrator.timeline import Timeline, now


def test_records_are_json_lines_in_clock_order(tmp_path: Path) -> None:
    path = tmp_path / "timeline.jsonl"
    with Timeline(path) as timeline:
        first = timeline.record("qmp", "command", name="query-status")
        second = timeline.record("serial", "line", text="hello")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["source"] for r in records] == ["qmp", "serial"]
    assert records[0]["name"] == "query-status" and records[1]["text"] == "hello"
    assert first <= second <= now()


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "timeline.jsonl"
    timeline = Timeline(path)

    def writer(n: int) -> None:
        for i in range(200):
            timeline.record(f"w{n}", "tick", i=i, pad="x" * 100)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    timeline.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 800
    assert all(json.loads(line)["kind"] == "tick" for line in lines)
