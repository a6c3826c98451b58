"""The lab CI templates (ci/lab/): they parse, and their job graphs are what labs rely on.

Every tier (tcg, kvm, snp, tdx) has a job on runners labelled with it that
sets up the host and runs its profile; the merge job depends on all of them,
runs when they fail too, and merges with `cvmlab report`. The shell scripts
both templates call are checked for syntax and run where that is cheap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from report_jobs import run_tiny_job

REPO = Path(__file__).resolve().parent.parent
LAB = REPO / "ci" / "lab"
TIERS = ("tcg", "kvm", "snp", "tdx")
PROFILES = ["smoke", "full", "qualification", "stress"]


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((LAB / name).read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def gitlab() -> dict[str, Any]:
    return load("gitlab-ci.yml")


@pytest.fixture(scope="module")
def github() -> dict[str, Any]:
    return load("github-actions.yml")


# --- GitLab ---------------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
def test_gitlab_has_a_job_per_tier_on_runners_tagged_with_it(
    gitlab: dict[str, Any], tier: str
) -> None:
    job = gitlab[f"cvmlab:{tier}"]
    assert job["extends"] == ".cvmlab-tier"
    assert job["tags"] == [tier]
    assert job["variables"]["CVMLAB_TIER"] == tier


def test_gitlab_tier_template_sets_up_runs_the_profile_and_keeps_junit(
    gitlab: dict[str, Any],
) -> None:
    template = gitlab[".cvmlab-tier"]
    assert template["script"][0] == "make setup"
    assert "ci/lab/run-profile.sh" in template["script"][1]
    assert '"$CVMLAB_PROFILE" "$CVMLAB_TIER"' in template["script"][1]
    assert template["artifacts"]["when"] == "always"
    assert template["artifacts"]["reports"]["junit"].endswith("job-*/results.xml")


@pytest.mark.parametrize("tier", TIERS)
def test_gitlab_tier_rules_follow_the_lab_tier_list(gitlab: dict[str, Any], tier: str) -> None:
    (rule,) = gitlab[f"cvmlab:{tier}"]["rules"]
    match = re.fullmatch(r"\$CVMLAB_TIERS =~ /(.+)/", rule["if"])
    assert match is not None
    pattern = re.compile(match.group(1))
    default = gitlab["variables"]["CVMLAB_TIERS"]["value"]
    assert pattern.search(default)
    others = " ".join(t for t in TIERS if t != tier)
    assert not pattern.search(others)
    assert pattern.search(f"kvm {tier}") and pattern.search(tier)


def test_gitlab_merge_job_needs_every_tier_and_runs_when_they_fail(
    gitlab: dict[str, Any],
) -> None:
    job = gitlab["cvmlab:report"]
    needed = {need["job"] for need in job["needs"]}
    assert needed == {f"cvmlab:{tier}" for tier in TIERS} | {"cvmlab:kernels"}
    assert all(need["artifacts"] and need["optional"] for need in job["needs"])
    assert job["when"] == "always"
    stages = gitlab["stages"]
    assert stages.index(job["stage"]) > stages.index(gitlab[".cvmlab-tier"]["stage"])
    assert any("ci/lab/merge-report.sh" in line for line in job["script"])
    assert "results/" in job["artifacts"]["paths"]


def test_gitlab_profiles_are_the_four_avocado_tags(gitlab: dict[str, Any]) -> None:
    profile = gitlab["variables"]["CVMLAB_PROFILE"]
    assert profile["options"] == PROFILES and profile["value"] in PROFILES


# --- GitHub ---------------------------------------------------------------------------


def test_github_tier_matrix_covers_every_tier_on_labelled_self_hosted_runners(
    github: dict[str, Any],
) -> None:
    job = github["jobs"]["tier"]
    expression = job["strategy"]["matrix"]["tier"]
    default = re.search(r"'(\[.*\])'", expression)
    assert default is not None and "vars.CVMLAB_TIERS" in expression
    assert json.loads(default.group(1)) == list(TIERS)
    assert job["runs-on"] == ["self-hosted", "${{ matrix.tier }}"]
    assert job["strategy"]["fail-fast"] is False


def test_github_tier_job_sets_up_runs_the_profile_and_uploads_always(
    github: dict[str, Any],
) -> None:
    steps = github["jobs"]["tier"]["steps"]
    runs = [s.get("run", "") for s in steps]
    assert "make setup" in runs
    assert any(r.startswith("ci/lab/run-profile.sh") for r in runs)
    assert runs.index("make setup") < next(
        i for i, r in enumerate(runs) if r.startswith("ci/lab/run-profile.sh")
    )
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert upload["with"]["name"] == "lab-${{ matrix.tier }}"


def test_github_merge_job_needs_the_tiers_and_runs_when_they_fail(
    github: dict[str, Any],
) -> None:
    job = github["jobs"]["report"]
    assert job["needs"] == ["tier", "kernels"]
    assert "always()" in job["if"]
    steps = job["steps"]
    download = next(s for s in steps if s.get("uses", "").startswith("actions/download-artifact"))
    assert download["with"]["pattern"] == "lab-*" and download["with"]["path"] == "results/"
    assert any("ci/lab/merge-report.sh" in s.get("run", "") for s in steps)


def test_github_profiles_are_the_four_avocado_tags(github: dict[str, Any]) -> None:
    # YAML 1.1 reads the key `on` as True.
    triggers = github.get("on", github.get(True))
    assert isinstance(triggers, dict)
    assert triggers["workflow_dispatch"]["inputs"]["profile"]["options"] == PROFILES


# --- the scripts both templates call ----------------------------------------------------


@pytest.mark.parametrize("script", ["run-profile.sh", "merge-report.sh"])
def test_lab_scripts_are_executable_bash(script: str) -> None:
    path = LAB / script
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", str(path)], check=True)


def _run_profile(tmp_path: Path, profile: str, tier: str) -> subprocess.CompletedProcess[str]:
    if not (REPO / ".venv" / "bin" / "avocado").exists():
        pytest.skip("no .venv with avocado (make venv)")
    return subprocess.run(
        [str(LAB / "run-profile.sh"), profile, tier, "1"],
        env={**os.environ, "CVMLAB_LAB_RESULTS": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_run_profile_with_no_matching_test_says_so_and_passes(tmp_path: Path) -> None:
    # No scenario is tagged both stress and tier:kvm: a KVM runner of that profile has no share.
    proc = _run_profile(tmp_path, "stress", "kvm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing ran on this kvm host" in proc.stdout
    assert not list((tmp_path / "lab-kvm").glob("job-*"))


def test_run_profile_refuses_an_unknown_profile_naming_the_known_ones(tmp_path: Path) -> None:
    proc = _run_profile(tmp_path, "no-such-profile", "tcg")
    assert proc.returncode != 0
    assert "no profile 'no-such-profile'" in proc.stderr
    assert "smoke, full, kernels, qualification, stress" in proc.stderr


def test_merge_report_merges_every_tiers_jobs(tmp_path: Path) -> None:
    cvmlab = REPO / ".venv" / "bin" / "cvmlab"
    help_text = subprocess.run([str(cvmlab), "--help"], capture_output=True, text=True).stdout
    if " report " not in help_text and "report," not in help_text:
        pytest.skip("`cvmlab report` is not wired into orchestrator/cli.py yet")
    job = run_tiny_job(tmp_path / "run")
    for tier in ("tcg", "kvm"):
        shutil.copytree(job, tmp_path / "results" / f"lab-{tier}" / f"{job.name}{tier}")
    proc = subprocess.run(
        [str(LAB / "merge-report.sh")],
        env={**os.environ, "CVMLAB_LAB_RESULTS": str(tmp_path / "results")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "results" / "lab-report" / "report.json").read_text())
    assert len(report["jobs"]) == 2 and len(report["results"]) == 16
    assert "| all |" in (tmp_path / "results" / "lab-report" / "summary.md").read_text()


def test_the_kernels_job_runs_the_lab_profile_on_any_runner(
    gitlab: dict[str, Any], github: dict[str, Any]
) -> None:
    """Kernel qualification needs no KVM or CoCo hardware: it runs in the lab."""
    job = gitlab["cvmlab:kernels"]
    assert job["tags"] == ["tcg"] and job["stage"] == "cvmlab-lab"
    assert 'ci/lab/run-profile.sh kernels any "$CVMLAB_PARALLEL"' in job["script"]
    assert job["artifacts"]["paths"] == ["results/lab-kernels/"]
    steps = github["jobs"]["kernels"]["steps"]
    assert any("run-profile.sh kernels any" in s.get("run", "") for s in steps)
    assert github["jobs"]["kernels"]["runs-on"] == ["self-hosted", "tcg"]

