"""Avocado job directories read into typed records.

A job dir (avocado 113) holds `results.json` (written once, at the end of the
job), `job.log`, `results.xml` and `test-results/<n>-<name>/` with each
test's `debug.log` and `data/` (where cvmlab keeps its evidence). A runner
that was killed leaves no `results.json`, or a truncated one: such a job is
read from its `test-results/` dirs instead (the first `INIT` and the last
status line of each `debug.log`) and marked incomplete, never a crash.

Paths inside `results.json` are absolute on the machine that ran the job;
job dirs are moved around (CI artifacts), so every test's directory is
found again under the job dir by its basename.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import CvmlabError

# Worst first is what a cell of several results shows; compare treats the
# "bad" ones as failures. INCOMPLETE is cvmlab's own: a test whose result the
# runner never wrote (killed mid-test).
SEVERITY: dict[str, int] = {
    "PASS": 0,
    "SKIP": 1,
    "CANCEL": 2,
    "WARN": 3,
    "INCOMPLETE": 4,
    "INTERRUPTED": 5,
    "ERROR": 6,
    "FAIL": 7,
}
BAD_STATUSES = frozenset({"FAIL", "ERROR", "INTERRUPTED", "INCOMPLETE"})
AVOCADO_STATUSES = ("PASS", "FAIL", "ERROR", "CANCEL", "SKIP", "WARN", "INTERRUPTED")

# Most specific first: the tier a result is filed under is the most specific
# one the test asks for and the host has. HOST_CLASSES are the lab's runner
# labels, used when the test's tiers say nothing about the host.
TIER_ORDER = ("tdx", "snp", "sw-protected", "kvm", "gmem", "tcg")
HOST_CLASSES = ("tdx", "snp", "kvm", "tcg")
UNKNOWN_TIER = "?"

# avocado's job exit status bits (avocado.core.exit_codes).
EXIT_MEANINGS = {
    0: "all tests passed (or cancelled/skipped)",
    1: "some tests failed",
    2: "the job failed",
    4: "avocado crashed",
    8: "the job was interrupted",
}
# A file the lab CI scripts write next to results.json with avocado's real exit status.
EXIT_FILE = "avocado-exit"

_VARIANT_HASH_RE = re.compile(r"-[0-9a-f]{4}$")
_INDEX_RE = re.compile(r"^(\d+)-")
_INIT_RE = re.compile(r"\| INIT (.+?)\s*$", re.M)
_STATUS_RE = re.compile(
    r"\| (PASS|FAIL|ERROR|CANCEL|SKIP|WARN|INTERRUPTED) (\S+)(?: -> (\w+): (.*))?\s*$", re.M
)
_DIR_DATE_RE = re.compile(r"job-(\d{4}-\d\d-\d\d)T(\d\d)\.(\d\d)")
# job.log's line for each test the runner started (avocado's testlogs plugin).
_STARTED_RE = re.compile(r"\| (\S.*): STARTED\s*$", re.M)
# full.log's state-machine lines name each task by its id from the moment it is queued.
_TASK_RE = re.compile(r'Task "(\d+-[^"]+)"')
# What avocado's string_to_safe_path turns into '_' when naming a test's dir.
_UNSAFE_RE = re.compile(r'[<>:"/\\|?*;]')
# debug.log can be megabytes (a guest console): its INIT line is near the top
# and its status line near the end.
_LOG_HEAD = 32 * 1024
_LOG_TAIL = 32 * 1024


@dataclass(frozen=True)
class HostInfo:
    """What the probe said about the host a job ran on."""

    name: str
    available: frozenset[str] | None  # None: no probe.json was found
    missing: Mapping[str, str] = field(default_factory=dict)  # tier -> reason
    detail: str = ""  # kernel release and CPU model, when the probe gave them
    # The kernel under test when the job ran inside `cvmlab lab` (probe.json host.lab).
    kernel_under_test: str = ""


@dataclass
class TestResult:
    """One test of one job, as the matrix and the pages need it."""

    job_id: str
    index: int
    test_id: str  # avocado's id: "3-scenarios/boot.py:Boot.test_x;run-machine-anon-6f5e"
    name: str  # without the index
    row: str  # "boot:Boot.test_x"
    variant: str  # "machine-anon"; "" when the job had no variants
    status: str
    reason: str
    tags: Mapping[str, Any]
    tier: str
    host: str
    elapsed: float | None
    logdir: Path | None  # the test's dir inside the job dir, when it exists

    @property
    def data_dir(self) -> Path | None:
        return self.logdir / "data" if self.logdir is not None else None

    @property
    def test_tiers(self) -> frozenset[str]:
        return _tier_tags(self.tags)


@dataclass
class Job:
    """One avocado job dir."""

    path: Path
    job_id: str
    start: str
    complete: bool
    problem: str  # why the job is incomplete ("" when complete)
    exit_code: int | None
    exit_known: bool  # True: from the runner (EXIT_FILE); False: derived from the results
    host: HostInfo
    results: list[TestResult]

    @property
    def short_id(self) -> str:
        return self.job_id[:7]

    def exit_text(self) -> str:
        if self.exit_code is None:
            return "none (runner stopped)"
        bits = [m for bit, m in EXIT_MEANINGS.items() if bit and self.exit_code & bit]
        meaning = "; ".join(bits) or EXIT_MEANINGS[0]
        source = "" if self.exit_known else ", derived"
        return f"{self.exit_code} ({meaning}{source})"


def is_job_dir(path: Path) -> bool:
    """avocado writes job.log first and results.json last: either marks a job dir."""
    return (path / "results.json").is_file() or (path / "job.log").is_file()


def load_jobs(paths: Iterable[str | Path]) -> list[Job]:
    """Every job dir in `paths`, each read once (a `latest` link and its target are one job)."""
    seen: set[Path] = set()
    jobs = []
    for raw in paths:
        real = Path(raw).resolve()
        if real in seen:
            continue
        seen.add(real)
        jobs.append(load_job(Path(raw)))
    return jobs


def load_job(path: Path) -> Job:
    """Read one job dir; a dir that is not a job is a CvmlabError, a half-written job is not."""
    if not path.exists():
        raise CvmlabError(
            f"{path} does not exist", "give the job dir avocado printed as JOB LOG's directory"
        )
    if not path.is_dir() or not is_job_dir(path):
        below = _job_dirs_below(path) if path.is_dir() else []
        hint = "pass an avocado job dir (results/job-<date>-<id>, or results/latest)"
        if below:
            one_level = all(p.parent == path for p in below)
            pattern = path / "job-*" if one_level else path / "*" / "job-*"
            hint = f"it holds {len(below)} job dir(s) below it: pass those, e.g. {pattern}"
        raise CvmlabError(
            f"{path} is not an avocado job dir (it has neither results.json nor job.log)",
            hint,
        )
    host = _job_host(path)
    summary, problem = _read_results_json(path)
    if summary is not None:
        results = [_from_results_json(path, host, t) for t in summary["tests"]]
        job_id = str(summary.get("job_id") or _read_id(path))
        start = str(summary.get("start") or _dir_date(path))[:19]
        complete = True
    else:
        results = _from_test_dirs(path, host, _read_id(path))
        job_id = _read_id(path)
        start = _dir_date(path)
        complete = False
    for result in results:
        result.job_id = job_id
    exit_code, exit_known = _exit_code(path, results, complete)
    results.sort(key=lambda r: r.index)
    return Job(path, job_id, start, complete, problem, exit_code, exit_known, host, results)


def _job_dirs_below(path: Path, budget: int = 2000) -> list[Path]:
    """Job dirs one or two levels below `path` (a results dir, a CI artifacts dir), for a hint.

    Bounded: a mistaken argument such as `/` must not start a walk of the disk.
    """
    found: list[Path] = []
    level = [path]
    for _ in range(2):
        below: list[Path] = []
        for parent in level:
            try:
                entries = sorted(os.scandir(parent), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                budget -= 1
                if budget < 0:
                    return found
                if entry.is_dir(follow_symlinks=False):
                    child = Path(entry.path)
                    (found if is_job_dir(child) else below).append(child)
        if found:
            return found
        level = below
    return found


def _read_results_json(path: Path) -> tuple[dict[str, Any] | None, str]:
    """results.json when whole; else None and why."""
    file = path / "results.json"
    if not file.exists():
        return None, "no results.json: the runner stopped before the job ended"
    try:
        data = json.loads(file.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as error:
        return None, f"results.json is truncated or corrupt ({error.msg} at line {error.lineno})"
    if not isinstance(data, dict) or not isinstance(data.get("tests"), list):
        return None, "results.json has no list of tests"
    data["tests"] = [t for t in data["tests"] if isinstance(t, dict)]
    return data, ""


def _read_id(path: Path) -> str:
    try:
        text = (path / "id").read_text().strip()
    except OSError:
        text = ""
    return text or path.name.rsplit("-", 1)[-1]


def _dir_date(path: Path) -> str:
    match = _DIR_DATE_RE.search(path.name)
    return f"{match.group(1)} {match.group(2)}:{match.group(3)}" if match else "?"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return None


def _host_from_probe(probe: Any, fallback_name: str) -> HostInfo | None:
    """HostInfo from a probe.json: `tiers: {name: {available, reason, ...}}` plus host facts."""
    if not isinstance(probe, dict):
        return None
    tiers = probe.get("tiers")
    available: set[str] = set()
    missing: dict[str, str] = {}
    if isinstance(tiers, dict):
        for name, info in tiers.items():
            if isinstance(info, dict) and info.get("available"):
                available.add(str(name))
            elif isinstance(info, dict):
                missing[str(name)] = str(info.get("reason") or "")
            elif info is True:
                available.add(str(name))
    name = fallback_name
    host = probe.get("host")
    candidates = [probe.get("hostname")]
    detail = ""
    if isinstance(host, dict):
        candidates += [host.get("hostname"), host.get("name"), host.get("node")]
        facts = [host.get("kernel_release"), host.get("cpu_model")]
        detail = ", ".join(str(f) for f in facts if isinstance(f, str) and f)
    elif isinstance(host, str):
        candidates.append(host)
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            name = candidate
            break
    known = frozenset(available) if isinstance(tiers, dict) else None
    lab = host.get("lab") if isinstance(host, dict) else None
    kernel = str(lab.get("kernel_under_test") or "") if isinstance(lab, dict) else ""
    return HostInfo(name, known, missing, detail, kernel)


def _job_host(path: Path) -> HostInfo:
    """The host of a job (every test of a job ran on it): the first probe.json a test wrote.

    The probe has no host name: that comes from a `hostname` file next to
    results.json (written by the lab CI scripts) or avocado's sysinfo.
    """
    name = "unknown host"
    # `hostname` is written by the lab CI scripts; sysinfo's only when sysinfo is on.
    for candidate in (path / "hostname", path / "sysinfo" / "pre" / "hostname"):
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text:
            name = text
            break
    results = path / "test-results"
    if results.is_dir():
        for entry in sorted(results.iterdir()):
            probe = entry / "data" / "probe.json"
            if probe.is_file():
                info = _host_from_probe(_read_json(probe), name)
                if info is not None:
                    return info
    return HostInfo(name, None)


def _tier_tags(tags: Mapping[str, Any]) -> frozenset[str]:
    value = tags.get("tier") if isinstance(tags, Mapping) else None
    if isinstance(value, (list, tuple, set, frozenset)):
        return frozenset(str(v) for v in value)
    return frozenset()


def _tier_rank(tier: str) -> tuple[int, str]:
    return (TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER), tier)


def host_tier(test_tiers: frozenset[str], available: frozenset[str] | None) -> str:
    """The tier column of a result.

    The most specific tier both the test asks for and the host has; else the
    host's own class (its best of tdx, snp, kvm, tcg: where a CANCEL for a
    missing tier lands); else, without a probe, the test's most specific tier.
    """
    if available is not None:
        both = test_tiers & available
        if both:
            return min(both, key=_tier_rank)
        for tier in HOST_CLASSES:
            if tier in available:
                return tier
    if test_tiers:
        return min(test_tiers, key=_tier_rank)
    return UNKNOWN_TIER


# A result's tier column carries the kernel under test when it ran in the lab:
# "gmem @ 7.3.4+deb13-amd64". That is the report's kernel axis: one column per kernel.
KERNEL_SEPARATOR = " @ "


def with_kernel(tier: str, kernel: str) -> str:
    return f"{tier}{KERNEL_SEPARATOR}{kernel}" if kernel else tier


def split_kernel(tier: str) -> tuple[str, str]:
    """('gmem', '7.3.4+deb13-amd64') of a lab column; (tier, '') of a host's."""
    base, _, kernel = tier.partition(KERNEL_SEPARATOR)
    return base, kernel


def tier_sort_key(tier: str) -> tuple[int, str]:
    """Columns go from the plainest tier to the most confidential one, host before lab
    kernels, kernels by version."""
    order = ("tcg", "kvm", "gmem", "sw-protected", "snp", "tdx")
    base, kernel = split_kernel(tier)
    return (order.index(base) if base in order else len(order), kernel)


# Names of variants-file nodes that group, rather than name, a variant.
_STRUCTURAL_NODES = frozenset({"run", "machine", "backend", "variants"})


def split_name(name: str) -> tuple[str, str]:
    """(row, variant) of an avocado test name.

    "scenarios/boot.py:Boot.test_x;run-machine-anon-6f5e" gives
    ("boot:Boot.test_x", "anon"): the file's stem, and the variant without
    avocado's 4-digit hash and the variants file's grouping nodes.
    """
    reference, _, variant_id = name.partition(";")
    file, sep, rest = reference.partition(":")
    if sep:
        stem = file.rsplit("/", 1)[-1]
        stem = stem[:-3] if stem.endswith(".py") else stem
        row = f"{stem}:{rest}"
    else:
        row = reference
    variant = _VARIANT_HASH_RE.sub("", variant_id)
    # Variant ids are the mux path: "run-machine-anon" (boot) and "run-backend-anon-machine"
    # (host_punch) are the same backend. Dropping the structural node names makes one
    # backend one column across scenarios; a variant of only those names is "default".
    words = [w for w in variant.split("-") if w not in _STRUCTURAL_NODES]
    return row, "-".join(words) or ("default" if variant else "")


def _test_dir(job: Path, logdir: Any, index: int, name: str) -> Path | None:
    """The test's dir inside `job`, wherever the job dir was when the test ran."""
    if isinstance(logdir, str) and logdir:
        candidate = job / "test-results" / Path(logdir).name
        if candidate.is_dir():
            return candidate
    # avocado names the dir after the id, made safe for file systems.
    guess = job / "test-results" / _UNSAFE_RE.sub("_", f"{index}-{name}")
    return guess if guess.is_dir() else None


def _from_results_json(job: Path, job_host: HostInfo, test: dict[str, Any]) -> TestResult:
    test_id = str(test.get("id") or test.get("name") or "?")
    match = _INDEX_RE.match(test_id)
    index = int(match.group(1)) if match else 0
    name = str(test.get("name") or (test_id[match.end() :] if match else test_id))
    row, variant = split_name(name)
    status = str(test.get("status") or "INCOMPLETE").upper()
    reason = str(test.get("fail_reason") or "")
    if reason == "<unknown>" or status == "PASS":
        reason = ""
    tags = test.get("tags") if isinstance(test.get("tags"), dict) else {}
    assert isinstance(tags, dict)
    logdir = _test_dir(job, test.get("logdir"), index, name)
    host = job_host
    elapsed = test.get("time_elapsed")
    return TestResult(
        job_id="",
        index=index,
        test_id=test_id,
        name=name,
        row=row,
        variant=variant,
        status=status,
        reason=reason,
        tags=tags,
        tier=with_kernel(host_tier(_tier_tags(tags), host.available), host.kernel_under_test),
        host=host.name,
        elapsed=float(elapsed) if isinstance(elapsed, (int, float)) else None,
        logdir=logdir,
    )


def _head_and_tail(path: Path) -> tuple[str, str]:
    try:
        with path.open("rb") as file:
            head = file.read(_LOG_HEAD)
            size = file.seek(0, 2)
            file.seek(max(size - _LOG_TAIL, 0))
            tail = file.read()
    except OSError:
        return "", ""
    return head.decode(errors="replace"), tail.decode(errors="replace")


def _from_test_dirs(job: Path, job_host: HostInfo, job_id: str) -> list[TestResult]:
    """Results of a job whose results.json is missing: one per test-results/<n>-<name>/."""
    results = []
    base = job / "test-results"
    entries = sorted(base.iterdir()) if base.is_dir() else []
    names: dict[str, str] | None = None
    for entry in entries:
        match = _INDEX_RE.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        index = int(match.group(1))
        head, tail = _head_and_tail(entry / "debug.log")
        init = _INIT_RE.search(head)
        if init:
            name = _INDEX_RE.sub("", init.group(1))
        else:
            names = _names_from_logs(job) if names is None else names
            rest = entry.name[match.end() :]
            name = names.get(entry.name) or names.get(rest) or rest
        status, reason = "INCOMPLETE", "no result: the runner stopped before this test ended"
        finals = list(_STATUS_RE.finditer(tail))
        if finals:
            last = finals[-1]
            status = last.group(1)
            reason = "" if status == "PASS" else (last.group(4) or "").strip()
        row, variant = split_name(name)
        host = job_host
        results.append(
            TestResult(
                job_id=job_id,
                index=index,
                test_id=f"{index}-{name}",
                name=name,
                row=row,
                variant=variant,
                status=status,
                reason=reason,
                tags={},
                tier=with_kernel(host_tier(frozenset(), host.available), host.kernel_under_test),
                host=host.name,
                elapsed=None,
                logdir=entry,
            )
        )
    return results


def _names_from_logs(job: Path) -> dict[str, str]:
    """Test names keyed by their dir name (with the index) or by its rest (without it).

    A test killed early may not have flushed its debug.log. full.log names
    every task by its id from the moment it is queued; job.log names a test
    (without its index) once it started.
    """
    names: dict[str, str] = {}
    for path, pattern in ((job / "full.log", _TASK_RE), (job / "job.log", _STARTED_RE)):
        try:
            with path.open(encoding="utf-8", errors="replace") as file:
                for line in file:
                    found = pattern.search(line)
                    if found is not None:
                        test_id = found.group(1)
                        names.setdefault(_UNSAFE_RE.sub("_", test_id), _INDEX_RE.sub("", test_id))
        except OSError:
            continue
    return names


def _exit_code(path: Path, results: list[TestResult], complete: bool) -> tuple[int | None, bool]:
    """avocado's exit status: the runner's own when recorded, else what the results imply."""
    try:
        return int((path / EXIT_FILE).read_text().strip()), True
    except (OSError, ValueError):
        pass
    if not complete:
        return None, False
    statuses = {r.status for r in results}
    code = 0
    if "INTERRUPTED" in statuses:
        code |= 8
    if statuses & {"FAIL", "ERROR"}:
        code |= 1
    tail = _head_and_tail(path / "job.log")[1]
    if "Avocado crashed" in tail:
        code |= 4
    if "Avocado job failed" in tail:
        code |= 2
    return code, False
