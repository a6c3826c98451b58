"""Verdict arithmetic and the verdicts.json record."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from orchestrator.invariants.verdict import Tolerance, VerdictLog, holds, not_applicable, within


def test_absolute_tolerance_passes_inside_and_fails_outside() -> None:
    tol = Tolerance(absolute=4)
    assert within("H2", "x", expected=100, seen=104, tolerance=tol).status == "pass"
    assert within("H2", "x", expected=100, seen=105, tolerance=tol).status == "fail"


def test_relative_tolerance_scales_with_expected() -> None:
    tol = Tolerance(relative=0.1)
    assert within("H2", "x", expected=1000, seen=901, tolerance=tol).status == "pass"
    assert within("H2", "x", expected=1000, seen=899, tolerance=tol).status == "fail"


def test_the_larger_of_absolute_and_relative_applies() -> None:
    tol = Tolerance(absolute=50, relative=0.01)
    assert tol.allows(100, 149) and not tol.allows(100, 151)
    assert tol.allows(100_000, 100_999) and not tol.allows(100_000, 101_001)


def test_failed_verdict_line_carries_expected_seen_and_tolerance() -> None:
    v = within("H2", "Shmem fell by the punched amount", 64, 3, Tolerance(relative=0.1))
    assert v.failed
    assert v.line() == (
        "H2 FAIL: Shmem fell by the punched amount (expected 64, seen 3, tolerance ±10%)"
    )


def test_log_rewrites_verdicts_json_after_each_verdict(tmp_path: Path) -> None:
    log = VerdictLog(tmp_path / "verdicts.json")
    log.add(holds("G3", "guest log clean", True, bad_lines=[]))
    assert [v["invariant"] for v in json.loads((tmp_path / "verdicts.json").read_text())] == ["G3"]
    log.add(not_applicable("H7", "no private memory on this host"))
    log.add(holds("H8", "host log clean", False, lines=["WARNING: x"]))
    record = json.loads((tmp_path / "verdicts.json").read_text())
    assert [v["status"] for v in record] == ["pass", "not-applicable", "fail"]
    assert [v.invariant for v in log.failures] == ["H8"]


def test_log_file_is_the_json_list_of_every_verdict_so_far(tmp_path: Path) -> None:
    # The file is built from each verdict's text made once; it must read as json.dumps
    # of the whole list would write it, multi-line summaries and nested evidence included.
    log = VerdictLog(tmp_path / "verdicts.json")
    added = [
        holds("H9", "no fd left\nbehind", True, leftovers=[], nested={"a": [1, {"b": None}]}),
        within("H2", "Shmem fell", 64, 3, Tolerance(relative=0.1)),
        not_applicable("H7", "no private memory"),
    ]
    for count, verdict in enumerate(added, 1):
        log.add(verdict)
        expected = json.dumps([asdict(v) for v in added[:count]], indent=2, default=str)
        assert (tmp_path / "verdicts.json").read_text() == expected
