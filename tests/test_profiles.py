"""Profiles: scenarios/profiles.yaml -> the exact avocado commands."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.errors import CvmlabError
from orchestrator.profiles import (
    AVOCADO_CONFIG,
    FORK_SPAWNER,
    LAB_AVOCADO,
    LAB_TIMEOUT_FACTOR,
    REPO,
    Job,
    Profile,
    ProfileError,
    _streamed,
    avocado_argv,
    files_with_tests,
    get_profile,
    lab_argv,
    load_profiles,
    merge_jobs,
    run_profile,
    stop_running,
)

CVMLAB = [sys.executable, "-m", "orchestrator.cli"]


def test_the_repository_profiles_load_and_name_existing_files() -> None:
    profiles = load_profiles()
    assert list(profiles) == ["smoke", "full", "kernels", "qualification", "stress"]
    for profile in profiles.values():
        for job in profile.jobs:
            assert (REPO / job.file).is_file()
            assert job.variants is None or (REPO / job.variants).is_file()


def test_qualification_swaps_in_the_negative_variants_of_host_punch() -> None:
    jobs = {job.file: job.variants for job in get_profile("qualification").jobs}
    assert jobs["scenarios/host_punch.py"] == "scenarios/variants/host_punch-qualification.yaml"
    assert jobs["scenarios/boot.py"] == "scenarios/variants/backends.yaml"


def test_tier_joins_the_profile_tags_in_one_filter() -> None:
    profile = Profile("full", "", ("-negative",), ())
    assert profile.tag_filter() == "-negative"
    assert profile.tag_filter("tdx") == "-negative,tier:tdx"
    assert Profile("qualification", "", (), ()).tag_filter() is None


def test_references_come_before_the_variants_file() -> None:
    # avocado's -m takes several files: a reference after it would be read as YAML.
    argv = avocado_argv(
        Profile("smoke", "", ("smoke",), ()),
        Job("scenarios/boot.py", "scenarios/variants/backends.yaml"),
        avocado="avocado",
        results="results",
        parallel=2,
        tier=None,
    )
    assert argv.index("scenarios/boot.py") < argv.index("-m")
    assert "--filter-by-tags=smoke" in argv and argv[-1] == "scenarios/variants/backends.yaml"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("profiles: {}\n", "needs a 'jobs' list"),
        ("jobs: [{variants: x.yaml}]\nprofiles: {}\n", "needs a 'file'"),
        ("jobs: [{file: scenarios/nope.py}]\nprofiles: {p: {tags: []}}\n", "does not exist"),
        (
            "jobs: [{file: scenarios/boot.py}]\nprofiles: {p: {variants: {x.py: y.yaml}}}\n",
            "unknown jobs",
        ),
        ("jobs: [\n", "cannot be read"),
        ("jobs: [{file: scenarios/boot.py}]\nprofiles: {p: {parallel: 0}}\n", "parallel must"),
        ("jobs: [{file: scenarios/boot.py}]\nprofiles: {p: {parallel: two}}\n", "not 'two'"),
        (
            "jobs: [{file: scenarios/boot.py}]\n"
            "profiles: {p: {lab: {kernels: ['7.3'], jobs: [{file: scenarios/boot.py}],"
            " cpus: 0}}}\n",
            "lab cpus must be a whole number >= 1, not 0",
        ),
        (
            "jobs: [{file: scenarios/boot.py}]\n"
            "profiles: {p: {lab: {kernels: ['7.3'], jobs: [{file: scenarios/boot.py}],"
            " numa: x}}}\n",
            "lab numa must be a whole number >= 1, not 'x'",
        ),
    ],
)
def test_a_malformed_profiles_file_is_one_clear_error(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(text)
    with pytest.raises(CvmlabError, match=problem):
        load_profiles(path)


def test_smoke_runs_three_tests_at_a_time_and_the_others_two() -> None:
    profiles = load_profiles()
    assert profiles["smoke"].parallel == 3
    assert {p.parallel for name, p in profiles.items() if name != "smoke"} == {2}


def test_an_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(CvmlabError, match=r"no profile 'nightly'.*smoke, full"):
        get_profile("nightly")


def test_dry_run_prints_one_avocado_command_per_job_with_matching_tests() -> None:
    proc = subprocess.run(
        [*CVMLAB, "profile", "run", "full", "--dry-run", "--no-lab"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert any(
        "scenarios/boot.py" in c and "-m scenarios/variants/backends.yaml" in c for c in commands
    )
    assert all("--filter-by-tags=-negative" in c for c in commands)
    assert len(commands) == len({c.split()[5] for c in commands})  # full does not merge


def test_a_lab_profile_boots_each_kernel_once_and_runs_its_lab_jobs_inside() -> None:
    profiles = load_profiles()
    kernels = profiles["kernels"]
    assert set(kernels.lab_kernels) == {"6.12", "7.2", "7.3", "sw-protected"}
    assert not kernels.host_jobs
    argv = lab_argv(kernels, "7.3", cvmlab="cvmlab", results="results", parallel=2, tier=None)
    assert argv[:3] == ["cvmlab", "lab", "--kernel"] and "--hugepages" in argv
    assert argv[argv.index("--numa") + 1] == "2"
    inner = argv[argv.index("--") + 1 :]
    assert inner[:5] == ["cvmlab", "profile", "run", "kernels", "--inside-lab"]
    listed = lab_argv(kernels, "7.3", cvmlab="cvmlab", results="results", parallel=2,
                      tier=None, files=["a.py", "b.py"])  # fmt: skip
    assert listed.count("--lab-file") == 2 and "b.py" in listed
    assert profiles["full"].lab_kernels == ("7.3", "sw-protected") and profiles["full"].host_jobs
    assert "--cpus" not in argv  # cvmlab lab's default machine


def test_smoke_boots_its_lab_with_one_vcpu() -> None:
    smoke = load_profiles()["smoke"]
    argv = lab_argv(smoke, "7.3", cvmlab="cvmlab", results="results", parallel=3, tier=None)
    assert argv[argv.index("--cpus") + 1] == "1"
    assert argv.index("--cpus") < argv.index("--")


def test_plain_lab_jobs_merge_into_one_avocado_run_and_get_the_lab_timeout_factor() -> None:
    jobs = (Job("a.py"), Job("b.py", "v.yaml"), Job("c.py"))
    merged = merge_jobs(jobs)
    assert merged == (Job("a.py", None, ("c.py",)), Job("b.py", "v.yaml"))
    profile = load_profiles()["full"]
    argv = avocado_argv(profile, merged[0], avocado="avocado", results="r", parallel=2,
                        tier=None, inside_lab=True)  # fmt: skip
    config = ["--config", str(AVOCADO_CONFIG)]
    assert argv[:7] == [sys.executable, "-m", LAB_AVOCADO, *config, "run", "a.py"]
    assert argv[7] == "c.py" and "--disable-html-job-result" in argv
    assert argv[argv.index("-p") + 1] == f"timeout_factor={LAB_TIMEOUT_FACTOR}"
    assert argv[argv.index("--spawner") + 1] == FORK_SPAWNER and "--disable-sysinfo" in argv
    # avocado refuses -p with -m: a job with variants gets the factor from its file.
    with_variants = avocado_argv(profile, merged[1], avocado="avocado", results="r",
                                 parallel=2, tier=None, inside_lab=True)  # fmt: skip
    assert "-p" not in with_variants and FORK_SPAWNER in with_variants
    on_host = avocado_argv(profile, merged[0], avocado="avocado", results="r", parallel=2,
                           tier=None)  # fmt: skip
    # On the host: forked tests too (unless `--spawner process`), and avocado's sysinfo.
    assert on_host[on_host.index("--spawner") + 1] == FORK_SPAWNER
    assert "--disable-sysinfo" not in on_host and on_host[:3] == ["avocado", *config]
    assert "--disable-html-job-result" not in on_host
    own = avocado_argv(profile, merged[0], avocado="avocado", results="r", parallel=2,
                       tier=None, spawner="process")  # fmt: skip
    assert "--spawner" not in own
    for job in profile.lab_jobs:
        if job.variants:
            assert "timeout_factor:" in (REPO / job.variants).read_text(), job.variants


def test_a_lab_section_needs_kernels_and_jobs(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "jobs: [{file: a.py}]\nprofiles:\n  p:\n    lab: {kernels: ['7.3']}\n"
    )
    (tmp_path / "a.py").write_text("")
    with pytest.raises(ProfileError, match="a lab needs both kernels and jobs"):
        load_profiles(path, root=tmp_path)


def test_one_avocado_list_finds_the_files_that_have_matching_tests() -> None:
    files = ["scenarios/boot.py", "scenarios/gmem_uapi.py", "scenarios/coco_boot.py"]
    avocado = str(Path(sys.executable).with_name("avocado"))
    smoke = files_with_tests(avocado, files, load_profiles()["smoke"].tag_filter())
    everything = files_with_tests(avocado, files, None)
    assert everything == set(files)
    # An independent count: the files whose source carries the smoke tag.
    tagged = {file for file in files if "smoke" in (REPO / file).read_text()}
    assert smoke == tagged


def test_a_lab_job_runs_only_on_the_kernels_it_names(tmp_path: Path) -> None:
    full = load_profiles()["full"]
    private = next(job for job in full.lab_jobs if job.file.endswith("gmem_private.py"))
    assert private.runs_on("sw-protected") and not private.runs_on("7.3")
    argv = lab_argv(full, "sw-protected", cvmlab="cvmlab", results="r", parallel=2, tier=None)
    assert argv[argv.index("--lab-kernel") + 1] == "sw-protected"
    # Files that make one avocado run: the lab runs avocado itself, no profile runner.
    direct = lab_argv(full, "sw-protected", cvmlab="cvmlab", results="r", parallel=2,
                      tier=None, files=[private.file])  # fmt: skip
    inner = direct[direct.index("--") + 1 :]
    assert inner[:7] == [sys.executable, "-m", LAB_AVOCADO, "--config", str(AVOCADO_CONFIG),
                         "run", private.file]  # fmt: skip
    assert inner[inner.index("--spawner") + 1] == FORK_SPAWNER
    two = lab_argv(full, "7.3", cvmlab="cvmlab", results="r", parallel=2, tier=None,
                   files=["scenarios/gmem_uapi.py", "scenarios/boot.py"])  # fmt: skip
    assert "--inside-lab" in two  # two avocado runs (boot has its own variants)
    path = tmp_path / "profiles.yaml"
    (tmp_path / "a.py").write_text("")
    path.write_text(
        "jobs: [{file: a.py}]\nprofiles:\n  p:\n"
        "    lab: {kernels: ['7.3'], jobs: [{file: a.py, kernels: ['6.12']}]}\n"
    )
    with pytest.raises(ProfileError, match="each must be one of the lab's kernels"):
        load_profiles(path, root=tmp_path)


def test_jobs_with_the_same_variants_merge_in_first_seen_order() -> None:
    jobs = (Job("a.py", "v.yaml"), Job("b.py"), Job("c.py", "v.yaml"), Job("d.py", "w.yaml"))
    assert merge_jobs(jobs) == (
        Job("a.py", "v.yaml", ("c.py",)), Job("b.py"), Job("d.py", "w.yaml")
    )  # fmt: skip


def test_smoke_runs_each_layer_once_in_few_avocado_jobs() -> None:
    proc = subprocess.run(
        [*CVMLAB, "profile", "run", "smoke", "--dry-run", "--no-lab"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    commands = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    smoke = load_profiles()["smoke"]
    assert smoke.merge
    # One avocado run per variants file, not one per scenario file.
    variants = [c.split(" -m ")[1] if " -m " in c else None for c in commands]
    assert len(variants) == len(set(variants)), commands
    files = [word for c in commands for word in c.split() if word.startswith("scenarios/")]
    assert len([f for f in files if f.endswith(".py")]) > len(commands)
    boot = next(c for c in commands if "scenarios/boot.py" in c)
    assert "scenarios/host_punch.py" in boot and "-m scenarios/variants/smoke.yaml" in boot
    # Every scenario that can share smoke.yaml does, the two long tests first.
    shared = [w for w in boot.split() if w.startswith("scenarios/") and w.endswith(".py")]
    assert shared[0] == "scenarios/balloon.py"
    assert shared[1] == "scenarios/virtio_mem.py"
    assert {"scenarios/conversion_driver.py", "scenarios/gmem_uapi.py"} <= set(shared)
    assert len(commands) == 3  # smoke.yaml and the two confidential ones


def test_a_run_can_pick_lab_kernels_and_an_unknown_one_is_one_error() -> None:
    proc = subprocess.run(
        [*CVMLAB, "profile", "run", "kernels", "--dry-run", "--kernel", "7.2"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    labs = [line for line in proc.stdout.splitlines() if line.startswith("== ") and " lab " in line]
    assert len(labs) == 1 and "--kernel 7.2 " in labs[0], labs
    bad = subprocess.run(
        [*CVMLAB, "profile", "run", "kernels", "--dry-run", "--kernel", "5.10"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "no lab kernel 5.10" in bad.stderr
    assert "Traceback" not in bad.stderr and "use one of: 7.3" in bad.stderr


# Stand-ins for the avocado and cvmlab executables, to test only how the profile runner
# schedules them (the real ones run in `make smoke` and `make test`): each side marks
# that it started and waits, with a deadline, for the other side's mark, so they pass
# only if the lab runs while the host jobs do.
STAND_IN = """#!/bin/bash
marks={marks}
if [ "$1" = list ]; then
    shift
    for ref in "$@"; do case $ref in *.py) echo "avocado-instrumented $ref:Stand.test";; esac; done
    exit 0
fi
side=$( [ "$1" = lab ] && echo lab || echo host )
other=$( [ "$side" = lab ] && echo host || echo lab )
touch "$marks/$side-started"
waited=0
while [ ! -e "$marks/$other-started" ]; do
    [ $waited -ge 100 ] && {{ echo "$side: $other never started"; exit 3; }}
    read -r -t 0.1 _ <> "$marks/fifo"  # nobody writes: a 0.1 s wait for the mark
    waited=$((waited + 1))
done
echo "JOB LOG    : $marks/job-$side-$$/job.log"
"""


def _stand_ins(tmp_path: Path) -> Path:
    marks = tmp_path / "marks"
    marks.mkdir()
    subprocess.run(["mkfifo", str(marks / "fifo")], check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("avocado", "cvmlab"):
        script = bin_dir / name
        script.write_text(STAND_IN.format(marks=marks))
        script.chmod(0o755)
    return bin_dir / "avocado"


#: One host job and one lab kernel, as `smoke` has (its files exist: avocado lists them).
BESIDE = Profile("beside", "", (), (Job("scenarios/boot.py"),), lab_kernels=("7.3",),
                 lab_jobs=(Job("scenarios/gmem_vcpu.py"),))  # fmt: skip


def test_the_lab_boots_while_the_host_jobs_run_and_its_lines_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = run_profile(BESIDE, avocado=str(_stand_ins(tmp_path)), results="r")
    out = capsys.readouterr().out
    assert "never started" not in out
    assert all(run.exit_status in (None, 0) for run in runs)
    lab_lines = [line for line in out.splitlines() if "job-lab-" in line]
    assert lab_lines and all(line.startswith("[lab 7.3] JOB LOG") for line in lab_lines)
    inside = [run for run in runs if run.note == "inside"]
    assert len(inside) == 1 and "job-lab-" in (inside[0].job_dir or "")


def test_with_lab_after_the_host_jobs_the_lab_waits_for_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Run one after the other, each side waits for the other in vain: the host jobs fail
    # first (exit 3), then the lab, which finds their mark, passes.
    runs = run_profile(BESIDE, avocado=str(_stand_ins(tmp_path)), results="r",
                       lab_beside=False)  # fmt: skip
    out = capsys.readouterr().out
    assert "host: lab never started" in out
    assert [run.exit_status for run in runs if run.job.file.startswith("lab ")] == [0]
    assert not any(line.startswith("[lab") for line in out.splitlines())


def test_stop_running_passes_sigterm_to_the_jobs_and_waits_for_them(tmp_path: Path) -> None:
    # A job that, like avocado and `cvmlab lab`, cleans up on SIGTERM (here: a mark).
    job = tmp_path / "job"
    job.write_text(
        "#!/bin/bash\n"
        f"trap 'echo cleaned > {tmp_path}/cleaned; exit 143' TERM\n"
        f"touch {tmp_path}/started\n"
        f"while :; do read -r -t 0.1 _ <> {tmp_path}/fifo; done\n"
    )
    job.chmod(0o755)
    subprocess.run(["mkfifo", str(tmp_path / "fifo")], check=True)
    done: list[tuple[int, str]] = []
    runner = threading.Thread(target=lambda: done.append(_streamed([str(job)])))
    runner.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline, "the job never started"
        runner.join(0.05)
    stop_running(grace=30)
    runner.join(30)
    assert done and done[0][0] == 143
    assert (tmp_path / "cleaned").read_text() == "cleaned\n"



@pytest.mark.parametrize("with_config", [True, False])
def test_our_avocado_config_disables_the_per_test_asset_prefetch(with_config: bool) -> None:
    # avocado's fetchasset parses each test's file before the job; our jobs fetch nothing.
    config = ["--config", str(AVOCADO_CONFIG)] if with_config else []
    avocado = str(Path(sys.executable).with_name("avocado"))
    listed = subprocess.run([avocado, *config, "plugins"], capture_output=True, text=True,
                            timeout=120, check=True).stdout  # fmt: skip
    assert ("Fetch assets before the test run" in listed) is not with_config
