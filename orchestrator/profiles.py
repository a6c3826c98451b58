"""Profiles: named selections of scenarios, run as plain `avocado run` jobs.

`scenarios/profiles.yaml` lists the jobs (one scenario file, with its own
variants file) and the profiles (smoke, full, qualification, stress: tags to
filter by, and variants files to swap). `cvmlab profile run NAME` runs one
avocado job per scenario file that has matching tests, prints each exact
`avocado run` command first, and ends with where the results are. Nothing
here imports avocado: it is driven as a program, as a user would.

A profile may also name lab kernels and lab jobs: after its host jobs, it boots each
kernel under test once (`cvmlab lab --kernel K`) and runs the lab jobs inside it with
`cvmlab profile run NAME --inside-lab`, so guest_memfd and KVM scenarios run on the
kernels chosen, whatever this host's kernel has.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import CvmlabError

REPO = Path(__file__).resolve().parents[1]
PROFILES_FILE = REPO / "scenarios" / "profiles.yaml"
JOB_LOG_RE = re.compile(r"^JOB LOG\s*:\s*(.*)/job\.log\s*$", re.M)


class ProfileError(CvmlabError):
    """profiles.yaml is malformed, or names a profile, file or tier that does not exist."""


@dataclass(frozen=True)
class Job:
    """One `avocado run FILE [MORE...] [-m VARIANTS]`."""

    file: str
    variants: str | None = None
    more_files: tuple[str, ...] = ()  # files merged in: same variants, one avocado start
    # (each start costs seconds, tens under TCG in the lab)
    kernels: tuple[str, ...] = ()  # lab jobs: the lab kernels that run it (empty: every one)

    def runs_on(self, kernel: str | None) -> bool:
        return not self.kernels or kernel in self.kernels

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file, *self.more_files)


def merge_jobs(jobs: tuple[Job, ...]) -> tuple[Job, ...]:
    """Jobs with the same variants (or none) in one `avocado run a.py b.py ... [-m V]`.

    Each avocado start costs seconds (tens inside the lab): one job per variants file,
    in the order of each group's first job.
    """
    groups: dict[str | None, list[str]] = {}
    for job in jobs:
        groups.setdefault(job.variants, []).extend(job.files)
    return tuple(Job(files[0], variants, tuple(files[1:])) for variants, files in groups.items())


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    tags: tuple[str, ...]
    jobs: tuple[Job, ...]
    lab_kernels: tuple[str, ...] = ()  # `cvmlab lab --kernel` values, one lab boot each
    lab_jobs: tuple[Job, ...] = ()  # run inside each lab kernel (or those a job names)
    lab_hugepages: int = 0  # 2 MiB pages the lab reserves (its kernel is throwaway)
    lab_numa: int = 1  # NUMA nodes of the lab machine (mbind tests need two)
    lab_cpus: int | None = None  # the lab machine's vCPUs (None: cvmlab lab's default)
    host_jobs: bool = True  # False: a lab-only profile (kernel qualification)
    merge: bool = False  # host jobs with the same variants in one avocado run (lab: always)
    parallel: int = 2  # tests at a time in a job (`--parallel` overrides)

    def tag_filter(self, tier: str | None = None) -> str | None:
        """One --filter-by-tags value: every tag must hold, `-tag` must not."""
        tags = [*self.tags, *([f"tier:{tier}"] if tier else [])]
        return ",".join(tags) or None


@dataclass(frozen=True)
class JobRun:
    job: Job
    argv: tuple[str, ...]
    exit_status: int | None  # None: not run (dry run, or no matching test)
    job_dir: str | None
    note: str = ""


def _fail(problem: str) -> ProfileError:
    return ProfileError(f"{PROFILES_FILE.relative_to(REPO)}: {problem}", "fix the file")


def load_profiles(path: Path = PROFILES_FILE, root: Path = REPO) -> dict[str, Profile]:
    """Read and check profiles.yaml: every named file must exist."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise _fail(f"cannot be read ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise _fail("needs a 'jobs' list and a 'profiles' map")
    jobs: list[Job] = []
    for item in data["jobs"]:
        if not isinstance(item, dict) or "file" not in item:
            raise _fail(f"job {item!r} needs a 'file'")
        jobs.append(Job(str(item["file"]), item.get("variants")))
    profiles: dict[str, Profile] = {}
    for name, spec in (data.get("profiles") or {}).items():
        if not isinstance(spec, dict):
            raise _fail(f"profile {name!r} must be a map")
        swaps: dict[str, str] = spec.get("variants") or {}
        unknown = set(swaps) - {job.file for job in jobs}
        if unknown:
            raise _fail(f"profile {name!r} swaps variants of unknown jobs: {sorted(unknown)}")
        lab = spec.get("lab") or {}
        if not isinstance(lab, dict) or not isinstance(lab.get("kernels", []), list):
            raise _fail(f"profile {name!r}: 'lab' needs 'kernels' (a list) and 'jobs'")
        lab_jobs = []
        for item in lab.get("jobs") or []:
            if not isinstance(item, dict) or "file" not in item:
                raise _fail(f"profile {name!r}: lab job {item!r} needs a 'file'")
            only_on = item.get("kernels") or []
            if not isinstance(only_on, list) or set(map(str, only_on)) - set(
                map(str, lab.get("kernels") or [])
            ):
                raise _fail(
                    f"profile {name!r}: lab job {item['file']} names kernels {only_on!r}: "
                    "each must be one of the lab's kernels"
                )
            lab_jobs.append(
                Job(str(item["file"]), item.get("variants"), kernels=tuple(map(str, only_on)))
            )
        if bool(lab_jobs) != bool(lab.get("kernels")):
            raise _fail(f"profile {name!r}: a lab needs both kernels and jobs")
        parallel = spec.get("parallel", 2)
        if not _whole(parallel, 1):
            raise _fail(f"profile {name!r}: parallel must be a whole number >= 1, not {parallel!r}")
        for key, least in (("hugepages", 0), ("numa", 1), ("cpus", 1)):
            if key in lab and not _whole(lab[key], least):
                raise _fail(f"profile {name!r}: lab {key} must be a whole number >= {least}, "
                            f"not {lab[key]!r}")  # fmt: skip
        profiles[name] = Profile(
            name=str(name),
            description=str(spec.get("description", "")),
            tags=tuple(str(t) for t in spec.get("tags") or ()),
            jobs=tuple(Job(j.file, swaps.get(j.file, j.variants)) for j in jobs),
            lab_kernels=tuple(str(k) for k in lab.get("kernels") or ()),
            lab_jobs=tuple(lab_jobs),
            lab_hugepages=int(lab.get("hugepages", 0)),
            lab_numa=int(lab.get("numa", 1)),
            lab_cpus=int(lab["cpus"]) if "cpus" in lab else None,
            host_jobs=not bool(lab.get("only", False)),
            merge=bool(spec.get("merge", False)),
            parallel=parallel,
        )
    for profile in profiles.values():
        for job in (*profile.jobs, *profile.lab_jobs):
            for file in (job.file, job.variants):
                if file is not None and not (root / file).is_file():
                    raise _fail(f"profile {profile.name!r} names {file}, which does not exist")
    return profiles


def _whole(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def get_profile(name: str, path: Path = PROFILES_FILE) -> Profile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(f"no profile {name!r}", f"use one of: {', '.join(profiles)}")
    return profiles[name]


# Inside the lab, tests and their guests run several times slower (Python under TCG,
# guests nested under TCG's SVM): avocado's timeouts and the scenarios' own waits scale.
LAB_TIMEOUT_FACTOR = 5

# Each test forks from a server that imported avocado and cvmlab once
# (orchestrator/lab/fork_spawner.py), instead of a new interpreter per test: on the host
# that is about 0.6 s of CPU per test (make smoke 74 s -> 57 s with the lab beside), in
# the lab 16 times that. `cvmlab profile run --spawner process` is avocado's own.
FORK_SPAWNER = "cvmlab-fork"  # orchestrator.lab.fork_server.NAME (a layer above this one)
SPAWNERS = (FORK_SPAWNER, "process")
#: The module inside the lab that runs avocado's command line (a layer above this one).
LAB_AVOCADO = "orchestrator.lab.avocado_run"
#: avocado settings for every job cvmlab runs (plugins it does not need, and why).
AVOCADO_CONFIG = REPO / "scenarios" / "avocado.conf"


def avocado_argv(
    profile: Profile, job: Job, *, avocado: str, results: str, parallel: int, tier: str | None,
    inside_lab: bool = False, spawner: str = FORK_SPAWNER,
) -> list[str]:  # fmt: skip
    """The exact avocado command for one job (references before -m: -m takes several files).

    Inside the lab, avocado's command line runs through LAB_AVOCADO, which forks the fork
    spawner's server after the imports both need (orchestrator/lab/avocado_run.py).
    """
    command = [sys.executable, "-m", LAB_AVOCADO] if inside_lab else [avocado]
    argv = [*command, "--config", str(AVOCADO_CONFIG), "run", *job.files]
    argv += ["--job-results-dir", results]
    argv += ["--max-parallel-tasks", str(parallel)]
    if spawner != "process" and not inside_lab:
        argv += ["--spawner", spawner]
    if inside_lab:
        # No job sysinfo in the lab: it describes a throwaway VM (the lab's own
        # evidence, lab.json, has its kernel and CPU) and costs seconds under TCG. No
        # results.html either (2-3 s under TCG): `cvmlab report` renders lab jobs too.
        argv += ["--spawner", FORK_SPAWNER, "--disable-sysinfo", "--disable-html-job-result"]
    if inside_lab and not job.variants:
        # avocado refuses -p beside a varianter (-m): the lab's variants files carry it.
        argv += ["-p", f"timeout_factor={LAB_TIMEOUT_FACTOR}"]
    tag_filter = profile.tag_filter(tier)
    if tag_filter:
        argv.append(f"--filter-by-tags={tag_filter}")
    if job.variants:
        argv += ["-m", job.variants]
    return argv


def files_with_tests(avocado: str, files: Sequence[str], tag_filter: str | None) -> set[str]:
    """The scenario files among `files` that have a test passing `tag_filter`.

    One `avocado list` for all of them: inside the lab each avocado start costs
    seconds of Python under TCG.
    """
    if not files:
        return set()  # no references: nothing to ask avocado (a Python start) about
    argv = [avocado, "list", *dict.fromkeys(files)]
    if tag_filter:
        argv.append(f"--filter-by-tags={tag_filter}")
    listed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    found = set()
    for line in listed.stdout.splitlines():
        # "<kind> <file>:<Class>.<test>", e.g. "avocado-instrumented scenarios/boot.py:Boot.test_x"
        reference = line.split(maxsplit=1)[-1] if line.strip() else ""
        found.add(reference.split(":", 1)[0])
    return {file for file in files if file in found}


#: Host jobs and a lab running beside them write whole lines, one at a time.
_OUTPUT = threading.Lock()


def _say_line(line: str) -> None:
    with _OUTPUT:
        sys.stdout.write(line)
        sys.stdout.flush()


def _whole_lines(say: Callable[[str], None]) -> Callable[[str], None]:
    """`say`, holding the output lock: no other thread's line lands inside its line."""

    def locked(text: str) -> None:
        with _OUTPUT:
            say(text)

    return locked


#: The avocado jobs and labs running now (a host job and a lab beside it, at most).
_RUNNING: set[subprocess.Popen[bytes]] = set()


def _streamed(argv: list[str], prefix: str = "") -> tuple[int, str]:
    """Run `argv` in the repository with its stdout passed through; (status, stdout).

    In our process group: a Ctrl-C reaches avocado and `cvmlab lab`, which stop
    their tests and guests in order; a SIGTERM to us is passed on (`stop_running`).
    """
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE)
    _RUNNING.add(proc)
    try:
        assert proc.stdout is not None
        output = []
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            _say_line(prefix + line)
            output.append(line)
        return proc.wait(), "".join(output)
    finally:
        _RUNNING.discard(proc)


def stop_running(grace: float = 60.0) -> None:
    """SIGTERM every job and lab still running, and wait for them to stop.

    avocado stops its tests and `cvmlab lab` its QEMU on SIGTERM; whatever is still
    there after `grace` seconds is killed.
    """
    procs = list(_RUNNING)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def lab_job(profile: Profile, kernel: str, files: Sequence[str] | None) -> Job | None:
    """The one avocado run of `kernel`'s lab jobs with tests in `files`, if they make one."""
    if files is None:
        return None
    jobs = merge_jobs(tuple(j for j in profile.lab_jobs if j.runs_on(kernel) and j.file in files))
    return jobs[0] if len(jobs) == 1 else None


def lab_argv(profile: Profile, kernel: str, *, cvmlab: str, results: str, parallel: int,
             tier: str | None, files: Sequence[str] | None = None) -> list[str]:  # fmt: skip
    """The command that boots `kernel` and runs the profile's lab jobs inside it.

    `files`: the lab jobs' files that have matching tests, listed on the host. When they
    make one avocado run, the lab runs it directly (`lab_job`); otherwise `cvmlab profile
    run --inside-lab` runs each in turn (a Python start more: 3-4 s under TCG).
    """
    job = lab_job(profile, kernel, files)
    if job is not None:
        inner = avocado_argv(profile, job, avocado="avocado", results=results,
                             parallel=parallel, tier=tier, inside_lab=True)  # fmt: skip
    else:
        inner = [cvmlab, "profile", "run", profile.name, "--inside-lab", "--lab-kernel", kernel]
        inner += [arg for file in files or () for arg in ("--lab-file", file)]
        inner += ["--results", results]
        inner += ["--parallel", str(parallel), *(["--tier", tier] if tier else [])]
    lab = [cvmlab, "lab", "--kernel", kernel, "--results", results]
    if profile.lab_hugepages:
        lab += ["--hugepages", str(profile.lab_hugepages)]
    if profile.lab_numa > 1:
        lab += ["--numa", str(profile.lab_numa)]
    if profile.lab_cpus is not None:
        lab += ["--cpus", str(profile.lab_cpus)]
    return [*lab, "--", *inner]


def run_profile(
    profile: Profile,
    *,
    avocado: str,
    results: str = "results",
    parallel: int = 2,
    tier: str | None = None,
    dry_run: bool = False,
    say: Callable[[str], None] = print,
    inside_lab: bool = False,
    with_lab: bool = True,
    lab_kernel: str | None = None,
    lab_files: Sequence[str] | None = None,
    only_kernels: Sequence[str] | None = None,
    lab_beside: bool = True,
    spawner: str = FORK_SPAWNER,
) -> list[JobRun]:
    """Run every job of `profile` that has matching tests; avocado's output streams through.

    `inside_lab`: run the lab jobs here (we are the command inside `cvmlab lab`), those
    for `lab_kernel` (the `--kernel` the lab booted) when it is given; `lab_files`: the
    files the host found matching tests in (no `avocado list` inside, where it costs tens
    of seconds).
    `with_lab`: boot each lab kernel and run the lab jobs there (`only_kernels`: those
    of the profile's lab kernels); `lab_beside`: while the host jobs run, else after them.
    `spawner`: avocado's spawner for the host jobs (the lab's is always FORK_SPAWNER).
    """
    unknown = set(only_kernels or ()) - set(profile.lab_kernels)
    if unknown:
        raise ProfileError(
            f"profile {profile.name!r} has no lab kernel {', '.join(sorted(unknown))}",
            f"use one of: {', '.join(profile.lab_kernels) or '(it has no lab)'}",
        )
    labs: list[LabRun] = []
    with_lab = with_lab and not inside_lab and bool(profile.lab_kernels)
    if inside_lab and lab_files is not None:
        listed = set(lab_files)
    else:
        # One `avocado list` for the host's and the lab's files (each costs a Python start).
        host_jobs = profile.lab_jobs if inside_lab else profile.jobs if profile.host_jobs else ()
        files = [file for job in host_jobs for file in job.files]
        files += [file for job in profile.lab_jobs for file in job.files] if with_lab else []
        listed = files_with_tests(avocado, files, profile.tag_filter(tier))
    if with_lab:
        labs = plan_labs(profile, listed, avocado=avocado, results=results, parallel=parallel,
                         tier=tier, only_kernels=only_kernels)  # fmt: skip
    beside = None
    if labs and profile.host_jobs and lab_beside and not dry_run:
        # The lab's TCG vCPUs use what the host jobs leave (they wait on the host lock
        # and on their guests). Lines are written whole; the lab's carry `[lab K]`.
        say = _whole_lines(say)
        beside = threading.Thread(target=_run_labs, args=(labs, say, True), daemon=True)
        beside.start()
    runs = _run_jobs(profile, avocado=avocado, results=results, parallel=parallel, tier=tier,
                     dry_run=dry_run, say=say, inside_lab=inside_lab, lab_kernel=lab_kernel,
                     listed=listed, spawner=spawner)  # fmt: skip
    if beside is not None:
        beside.join()
    else:
        _run_labs(labs, say, False, dry_run=dry_run)
    for lab in labs:
        runs.extend(lab.runs)
    return runs


@dataclass
class LabRun:
    """One lab kernel's boot: the command, the files it runs, and what came of it."""

    kernel: str
    argv: list[str]
    files: list[str]
    direct: bool = False  # the lab's command is avocado itself (see lab_argv)
    runs: list[JobRun] = field(default_factory=list)


def plan_labs(profile: Profile, listed: set[str], *, avocado: str, results: str,
              parallel: int, tier: str | None,
              only_kernels: Sequence[str] | None) -> list[LabRun]:  # fmt: skip
    """The lab boots `profile` needs, with the files that have matching tests (`listed`)."""
    cvmlab = str(Path(avocado).with_name("cvmlab"))
    labs = []
    for kernel in profile.lab_kernels:
        if only_kernels and kernel not in only_kernels:
            continue
        files = [j.file for j in profile.lab_jobs if j.runs_on(kernel) and j.file in listed]
        argv = lab_argv(profile, kernel, cvmlab=cvmlab, results=results, parallel=parallel,
                        tier=tier, files=files)  # fmt: skip
        labs.append(LabRun(kernel, argv, files, lab_job(profile, kernel, files) is not None))
    return labs


def _run_labs(labs: list[LabRun], say: Callable[[str], None], beside: bool,
              dry_run: bool = False) -> None:  # fmt: skip
    """Boot each lab in turn; `beside`: host jobs run meanwhile, so lines get a prefix."""
    for lab in labs:
        lab_job = Job(f"lab --kernel {lab.kernel}")
        if not lab.files:
            lab.runs.append(JobRun(lab_job, tuple(lab.argv), None, None, "no matching test"))
            continue
        prefix = f"[lab {lab.kernel}] " if beside else ""
        say(prefix + "== " + " ".join(lab.argv))
        if dry_run:
            lab.runs.append(JobRun(lab_job, tuple(lab.argv), None, None, "dry run"))
            continue
        try:
            status, output = _streamed(lab.argv, prefix)
        except OSError as error:  # say so, and fail the run
            say(f"{prefix}could not start the lab: {error}")
            lab.runs.append(JobRun(lab_job, tuple(lab.argv), 2, None, f"not started: {error}"))
            continue
        job_dirs = JOB_LOG_RE.findall(output)
        if lab.direct and job_dirs:
            _mark_job_dir(job_dirs[-1], status)  # avocado ran directly: its status is the lab's
        for job_dir in job_dirs:
            lab.runs.append(
                JobRun(Job(f"  in lab {lab.kernel}"), tuple(lab.argv), None, job_dir, "inside")
            )
        lab.runs.append(JobRun(lab_job, tuple(lab.argv), status, None, "see the jobs above"))


def _mark_job_dir(job_dir: str | None, status: int) -> None:
    """What `cvmlab report` shows per job: avocado's exit status and the host it ran on."""
    if job_dir and Path(job_dir).is_dir():
        (Path(job_dir) / "avocado-exit").write_text(f"{status}\n")
        (Path(job_dir) / "hostname").write_text(f"{socket.gethostname()}\n")


def _run_jobs(profile: Profile, *, avocado: str, results: str, parallel: int,
              tier: str | None, dry_run: bool, say: Callable[[str], None], inside_lab: bool,
              lab_kernel: str | None, listed: set[str], spawner: str) -> list[JobRun]:  # fmt: skip
    """The host jobs of `profile`, or inside a lab the lab jobs for `lab_kernel`.

    `listed`: the files that have matching tests."""
    runs: list[JobRun] = []
    if inside_lab:
        jobs = tuple(j for j in profile.lab_jobs if j.runs_on(lab_kernel))
    else:
        jobs = profile.jobs if profile.host_jobs else ()
    for job in jobs:
        if job.file not in listed:
            runs.append(JobRun(job, (), None, None, "no matching test"))
    jobs = tuple(job for job in jobs if job.file in listed)
    if inside_lab or profile.merge:
        jobs = merge_jobs(jobs)
    for job in jobs:
        argv = avocado_argv(
            profile, job, avocado=avocado, results=results, parallel=parallel, tier=tier,
            inside_lab=inside_lab, spawner=spawner,
        )  # fmt: skip
        say("== " + " ".join(argv))
        if dry_run:
            runs.append(JobRun(job, tuple(argv), None, None, "dry run"))
            continue
        status, output = _streamed(argv)
        found = JOB_LOG_RE.findall(output)
        job_dir = found[-1] if found else None
        _mark_job_dir(job_dir, status)
        runs.append(JobRun(job, tuple(argv), status, job_dir))
    return runs


def summary(runs: list[JobRun]) -> str:
    lines = ["Results (avocado job dirs; results.html, results.json, per-test data/ inside):"]
    for run in runs:
        where = run.job_dir or f"({run.note})"
        status = "" if run.exit_status is None else f"exit {run.exit_status}"
        lines.append(f"  {run.job.file:<32} {status:<7} {where}")
    return "\n".join(lines)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    profile = get_profile(args.name)
    avocado = str(Path(sys.executable).with_name("avocado"))
    # A SIGTERM (a CI job cancelled) stops the avocado jobs and labs we started first.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        runs = _run_profile_of(args, profile, avocado)
    finally:
        stop_running()
    print()
    print(summary(runs))
    if not any(run.exit_status is not None or run.note == "dry run" for run in runs):
        print(f"profile {profile.name}: no test matched", file=sys.stderr)
    return 1 if any(run.exit_status not in (None, 0) for run in runs) else 0


def _run_profile_of(args: argparse.Namespace, profile: Profile, avocado: str) -> list[JobRun]:
    return run_profile(
        profile,
        avocado=avocado,
        results=args.results,
        parallel=args.parallel or profile.parallel,
        tier=args.tier,
        dry_run=args.dry_run,
        inside_lab=args.inside_lab,
        with_lab=not args.no_lab,
        lab_kernel=args.lab_kernel,
        lab_files=args.lab_file,
        only_kernels=args.kernel,
        lab_beside=not args.lab_after,
        spawner=args.spawner,
    )


def _list(args: argparse.Namespace) -> int:
    for profile in load_profiles().values():
        tags = profile.tag_filter() or "(all tests)"
        print(f"{profile.name:<14} {tags:<22} {profile.description}")
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "profile", help="list or run test profiles (smoke, full, qualification, stress)"
    )
    commands = parser.add_subparsers(dest="profile_command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="the profiles and their tag filters").set_defaults(
        handler=_list
    )
    run = commands.add_parser("run", help="run a profile: one avocado job per scenario file")
    run.add_argument("name", help="profile name (see `cvmlab profile list`)")
    run.add_argument("--tier", help="only tests tagged tier:TIER (a lab runner's own tier)")
    run.add_argument("--results", default="results", help="avocado job results dir [results]")
    run.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="tests at a time per job (TCG is CPU-bound) [the profile's, else 2]",
    )
    run.add_argument("--dry-run", action="store_true", help="print the avocado commands only")
    run.add_argument(
        "--no-lab", action="store_true", help="host jobs only (skip the profile's lab kernels)"
    )
    run.add_argument(
        "--spawner", choices=SPAWNERS, default=FORK_SPAWNER,
        help="how avocado starts each host test: forked from a pre-imported server, or a "
        "new Python (avocado's own) [%(default)s]",
    )  # fmt: skip
    run.add_argument(
        "--lab-after", action="store_true",
        help="boot the lab kernels after the host jobs, not while they run",
    )  # fmt: skip
    run.add_argument(
        "--kernel", action="append", metavar="K",
        help="only this one of the profile's lab kernels (repeatable)",
    )  # fmt: skip
    run.add_argument(
        "--inside-lab", action="store_true", help=argparse.SUPPRESS
    )  # what `cvmlab lab` runs inside: the profile's lab jobs
    run.add_argument("--lab-kernel", help=argparse.SUPPRESS)  # the kernel the lab booted
    run.add_argument("--lab-file", action="append", help=argparse.SUPPRESS)  # listed on the host
    run.set_defaults(handler=_run)
