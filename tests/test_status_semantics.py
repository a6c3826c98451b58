"""Status semantics end to end: real avocado, real guests, the scenarios of
tests/status_scenarios/status_fixtures.py (each breaks one way on purpose).

FAIL = an invariant did not hold (with its verdict, and the first failed verdict as
avocado's fail reason); ERROR = the harness could not judge; WARN = evidence
incomplete with nothing failed; never PASS on missing evidence. Every QEMU scenario's
verdicts.json ends with H9 then H8 (the finish phase).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

AVOCADO = str(Path(sys.executable).with_name("avocado"))
FIXTURES = Path(__file__).parent / "status_scenarios" / "status_fixtures.py"

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Run the fixtures once (two at a time); test name -> result + verdicts."""
    results = tmp_path_factory.mktemp("status-job")
    subprocess.run(
        [AVOCADO, "run", str(FIXTURES), "--job-results-dir", str(results),
         "--max-parallel-tasks", "2", "--disable-sysinfo"],
        capture_output=True, timeout=900, check=False,
    )  # fmt: skip
    (job_dir,) = results.glob("job-*")
    found: dict[str, dict[str, Any]] = {}
    for test in json.loads((job_dir / "results.json").read_text())["tests"]:
        name = test["name"].split(":")[-1].split(";")[0]
        verdicts_file = Path(test["logdir"]) / "data" / "verdicts.json"
        test["verdicts"] = (
            json.loads(verdicts_file.read_text()) if verdicts_file.is_file() else []
        )
        found[name] = test
    return found


def _failed(test: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in test["verdicts"] if v["status"] == "fail"]


def test_a_guest_panic_is_a_fail_with_g3_and_the_console_lines(job: dict[str, Any]) -> None:
    test = job["PanicsItsGuest.test_guest_panics"]
    assert test["status"] == "FAIL", test["fail_reason"]
    (g3,) = [v for v in _failed(test) if v["invariant"] == "G3"]
    assert any("Kernel panic" in line or "sysrq" in line.lower()
               for line in g3["evidence"]["console_lines"]), g3  # fmt: skip
    assert test["fail_reason"].startswith("G3 FAIL")


def test_a_host_splat_is_a_fail_with_h8_not_an_error(job: dict[str, Any]) -> None:
    test = job["HostSplat.test_host_log_gets_a_splat"]
    assert test["status"] == "FAIL", test["fail_reason"]
    assert test["fail_reason"].startswith("H8 FAIL"), test["fail_reason"]
    (h8,) = _failed(test)
    assert "WARNING" in h8["evidence"]["problems"][0]


def test_lost_host_records_are_never_a_pass(job: dict[str, Any]) -> None:
    test = job["LostHostRecords.test_records_lost"]
    assert test["status"] == "WARN", test["fail_reason"]
    assert [v["status"] for v in test["verdicts"] if v["invariant"] == "H8"] == ["incomplete"]


def test_a_splat_then_a_harness_error_is_still_a_fail(job: dict[str, Any]) -> None:
    test = job["SplatThenSshBreaks.test_splat_then_harness_error"]
    assert test["status"] == "FAIL", test["fail_reason"]
    assert test["fail_reason"].startswith("H8 FAIL") and "GuestError" in test["fail_reason"]


def test_every_machine_scenario_ends_with_h9_then_h8(job: dict[str, Any]) -> None:
    for name, test in job.items():
        ids = [v["invariant"] for v in test["verdicts"]]
        assert ids[-2:] == ["H9", "H8"], (name, ids)
