"""`compare`: cycles run alternately; reference cycles are printed, never judged."""

from __future__ import annotations

from orchestrator.bench.core import compare


def test_references_run_in_the_rotation_and_only_baseline_and_candidate_are_judged() -> None:
    order: list[str] = []

    def cycle(label: str, seconds: float):  # type: ignore[no-untyped-def]
        def run() -> float:
            order.append(label)
            return seconds

        return run

    result = compare(
        "lab", 2, ("raw", cycle("raw", 10.0)), ("lab", cycle("lab", 12.0)), 1.5, lambda _l: None,
        references=(("raw-pvh", cycle("raw-pvh", 6.0)),),
    )  # fmt: skip
    assert order == ["raw", "raw-pvh", "lab"] * 2
    assert result.ratio == 1.2 and result.met  # 12/6 = 2.0 against the reference is not judged
    text = result.report()
    assert "raw-pvh" in text and "lab / raw-pvh 2.00x  (reference)" in text
    assert "ratio 1.20x  (target <= 1.5x: met)" in text
    data = result.to_json()
    assert data["raw-pvh"] == [6.0, 6.0] and data["lab_per_raw-pvh"] == 2.0
    assert data["met"] is True


def test_a_comparison_without_references_reads_as_before() -> None:
    result = compare("boot", 1, ("raw", lambda: 2.0), ("ours", lambda: 4.0), 1.5, lambda _l: None)
    assert result.references == {}
    assert "reference" not in result.report()
    assert not result.met and "MISSED" in result.report()
