"""The report's kernel axis: lab results are filed per kernel under test, and a comparison
of one kernel's run with another's matches the same tests and names the kernels."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from report_jobs import PROBE, run_tiny_job

from orchestrator.report.compare import compare_paths
from orchestrator.report.jobs import load_job, split_kernel, tier_sort_key, with_kernel
from orchestrator.report.store import FORMAT


def lab_probe(kernel: str) -> dict[str, object]:
    probe = copy.deepcopy(PROBE)
    host = probe["host"]
    assert isinstance(host, dict)
    host["kernel_release"] = kernel
    host["lab"] = {
        "kernel_under_test": kernel,
        "origin": f"debian trixie-backports linux-image-{kernel}",
        "outer_host_kernel": "6.18.44",
        "outer_qemu": "QEMU 10.0.2",
    }
    return probe


def test_lab_results_carry_the_kernel_under_test_in_their_column(tmp_path: Path) -> None:
    host_job = load_job(run_tiny_job(tmp_path / "host"))
    lab_job = load_job(run_tiny_job(tmp_path / "lab", lab_probe("7.3.4+deb13-amd64")))
    assert {r.tier for r in host_job.results} == {"tcg"}
    assert {r.tier for r in lab_job.results} == {"tcg @ 7.3.4+deb13-amd64"}
    assert lab_job.host.kernel_under_test == "7.3.4+deb13-amd64"
    columns = sorted(["tcg @ 7.3.4+deb13-amd64", "gmem", "tcg", "tcg @ 6.12.95+deb12-amd64"],
                     key=tier_sort_key)  # fmt: skip
    assert columns == ["tcg", "tcg @ 6.12.95+deb12-amd64", "tcg @ 7.3.4+deb13-amd64", "gmem"]


def test_comparing_two_kernels_matches_tests_and_names_the_kernels(tmp_path: Path) -> None:
    def report(name: str, kernel: str, status: str) -> Path:
        path = tmp_path / f"{name}.json"
        record = {"row": "gmem_uapi:GmemUapi.test_punch", "variant": "", "status": status,
                  "reason": "" if status == "PASS" else "H3 FAIL: page 3 read 0x5a",
                  "tier": with_kernel("gmem", kernel)}  # fmt: skip
        path.write_text(json.dumps({"format": FORMAT, "results": [record]}))
        return path

    old = report("old", "7.2.12+deb13-amd64", "PASS")
    new = report("new", "7.3.4+deb13-amd64", "FAIL")
    comparison = compare_paths(old, new)
    (regression,) = comparison.regressions
    text = regression.describe()
    assert "PASS -> FAIL" in text
    assert "(kernel 7.2.12+deb13-amd64 -> 7.3.4+deb13-amd64)" in text
    assert split_kernel("gmem @ 7.3.4+deb13-amd64") == ("gmem", "7.3.4+deb13-amd64")
