"""The kernel's own KVM selftests: built from a kernel's source, run and judged from TAP.

Upstream's KVM selftests (`tools/testing/selftests/kvm`) test the guest_memfd uAPI and
private memory from the kernel's side. They must match the kernel under test, so they are
built from the same `linux-source-<series>` (`kernel_build.fetch_source`) and chosen by
the running kernel's series (`uname -r`), never by whatever happens to be built.

Build: `make O=<dir> headers` for the uAPI headers, then only the named programs from the
selftests' own Makefile with `OUTPUT=` (the source tree stays untouched), cached under
`kernels/selftests/<series>-<key>/` by the hash of the source package, the compiler and
the list of tests. A test the source does not have (e.g. `pre_fault_memory_test` before
6.10) is recorded as absent with that reason, so the scenario can CANCEL it by name.

Judging (`judge`): kselftest programs print TAP (`1..N`, `ok N name`, `not ok N name`,
`# SKIP reason`) or, for the older ones, plain text with the exit status as the verdict
(0 pass, 4 = KSFT_SKIP, anything else fail). Both are combined, so a program that printed
`ok` lines and then died of an assertion (exit 254) is a FAIL, a `1..0 # SKIP reason` is a
SKIP carrying its reason, and a run cut short by the deadline is an ERROR (not judged).
avocado's own `tap` runner is not used because it ignores the exit status and drops the
skip reason (avocado 113, `avocado/plugins/runners/tap.py`: `_get_tap_result`).

    cvmlab lab selftests build [--series 7.3 | --tree DIR] [--jobs N] [--force]
    python -m orchestrator.lab.selftests build --series 6.12
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchestrator.errors import CvmlabError
from orchestrator.lab.kernel_build import (
    SW_PROTECTED_SERIES,
    KernelBuildError,
    KernelSource,
    Progress,
    cache_lock,
    chosen_source,
    digest,
    kernel_cache,
    print_error,
    run_logged,
    tool_versions,
)

#: Bumped when the build recipe changes in a way the other inputs do not capture.
RECIPE = 1
#: The selftests of issue 9/10: guest_memfd, memslots, pre-faulting, private memory.
SELFTESTS = (
    "guest_memfd_test",
    "set_memory_region_test",
    "pre_fault_memory_test",
    "private_mem_conversions_test",
    "private_mem_kvm_exits_test",
)
KVM_DIR = Path("tools/testing/selftests/kvm")
#: kselftest's exit status for "skipped" (tools/testing/selftests/kselftest.h, KSFT_SKIP).
KSFT_SKIP = 4
#: Subdirectories of the KVM selftests that hold x86 programs (renamed x86_64 -> x86 in 6.13).
X86_DIRS = ("", "x86", "x86_64")
OUTPUT_TAIL_LINES = 15

Status = Literal["PASS", "FAIL", "SKIP", "ERROR"]


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class SelftestBuild:
    """Built selftests of one kernel source: `bin/<name>` and a manifest."""

    directory: Path

    @property
    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.directory / "manifest.json").read_text())
        return data

    @property
    def series(self) -> str:
        return str(self.manifest["series"])

    def binary(self, name: str) -> Path | None:
        """The program `name`, or None when this source did not have it."""
        entry = self.manifest["tests"].get(name)
        return self.directory / "bin" / name if entry and entry.get("built") else None

    def absent_reason(self, name: str) -> str:
        """Why `name` was not built (empty when it was)."""
        entry = self.manifest["tests"].get(name)
        if entry is None:
            return f"{name} was not asked for when these selftests were built"
        return str(entry.get("reason", ""))


def locate_test(kvm_dir: Path, makefile_text: str, name: str) -> str | None:
    """The make target of `name` relative to the KVM selftests (`x86/name` or `name`).

    A program counts when its `.c` exists in an x86 location and the Makefile lists it for
    x86 (`TEST_GEN_PROGS_x86 += ...`, `TEST_GEN_PROGS_x86_64 += ...`, or the common list).
    """
    for sub in X86_DIRS:
        relative = f"{sub}/{name}" if sub else name
        if not (kvm_dir / f"{relative}.c").exists():
            continue
        listed = re.search(
            rf"^TEST_GEN_PROGS_(?:x86|x86_64|COMMON)\s*\+=\s*{re.escape(relative)}\s*$",
            makefile_text,
            re.M,
        )
        if listed:
            return relative
    return None


def kvm_makefile_text(kvm_dir: Path) -> str:
    """The KVM selftests' Makefile(s): `Makefile.kvm` holds the lists since 6.11."""
    texts = [
        (kvm_dir / name).read_text(errors="replace")
        for name in ("Makefile", "Makefile.kvm")
        if (kvm_dir / name).exists()
    ]
    if not texts:
        raise KernelBuildError(
            f"{kvm_dir} has no Makefile", "this kernel source has no KVM selftests"
        )
    return "\n".join(texts)


def source_label(source: KernelSource) -> str:
    """'linux-source-7.3 7.3.4-1~bpo13+1' or 'tree /src/linux (7.4.0-rc1)'."""
    if source.from_archive:
        return f"{source.identity['package']} {source.identity['version']}"
    return f"tree {source.identity['tree']} ({source.identity['kernelversion']})"


def build_selftests(
    source: KernelSource,
    progress: Progress,
    tests: tuple[str, ...] = SELFTESTS,
    jobs: int | None = None,
    force: bool = False,
) -> SelftestBuild:
    """Build `tests` from `source` (or reuse the cached build of the same inputs)."""
    inputs = {
        "recipe": RECIPE,
        "source": source.identity,
        "tools": tool_versions(),
        "tests": sorted(tests),
    }
    name = f"{source.series}-{digest(inputs)}"
    final = kernel_cache() / "selftests" / name
    with cache_lock(f"selftests-{name}", progress):
        if force:
            shutil.rmtree(final, ignore_errors=True)
        if source.from_archive and (final / "manifest.json").exists():
            progress(f"KVM selftests of {source.series} are cached: {final}")
            return SelftestBuild(final)
        kvm_dir = source.tree / KVM_DIR
        makefile = kvm_makefile_text(kvm_dir)
        targets = {test: locate_test(kvm_dir, makefile, test) for test in tests}
        work = kernel_cache() / "build" / f"selftests-{name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700, parents=True)
        log = work / "build.log"
        log.write_text(f"cvmlab selftests build {name}\n{json.dumps(inputs, indent=2)}\n")
        headers, output = work / "headers", work / "out"
        output.mkdir()
        started = time.monotonic()
        run_logged(
            ["make", "-C", str(source.tree), f"O={headers}", "headers"],
            log,
            "selftests: uAPI headers",
            progress,
        )
        wanted = [str(output / target) for target in targets.values() if target]
        if wanted:
            run_logged(
                [
                    "make",
                    "-C",
                    str(kvm_dir),
                    f"-j{jobs or os.cpu_count() or 1}",
                    f"OUTPUT={output}",
                    f"KHDR_INCLUDES=-isystem {headers / 'usr' / 'include'}",
                    *wanted,
                ],
                log,
                f"selftests: {', '.join(t for t in tests if targets[t])}",
                progress,
            )
        manifest = {
            "series": source.series,
            "source": source.identity,
            "inputs": inputs,
            "seconds": round(time.monotonic() - started, 1),
            "tests": {
                test: (
                    {"built": True, "target": target}
                    if target
                    else {
                        "built": False,
                        "reason": f"{test} is not an x86 KVM selftest of this kernel's source "
                        f"({source_label(source)})",
                    }
                )
                for test, target in targets.items()
            },
        }
        staging = final.parent / f".staging-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "bin").mkdir(mode=0o700, parents=True)
        for test, target in targets.items():
            if target:
                shutil.copy2(output / target, staging / "bin" / test)
        shutil.copy2(log, staging / "build.log")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        shutil.rmtree(work, ignore_errors=True)
    progress(f"KVM selftests of {source.series} built in {manifest['seconds']} s: {final}")
    return SelftestBuild(final)


# --------------------------------------------------------------------------- which build


def series_of(release: str) -> str:
    """'7.3' of '7.3.4+deb13-amd64' or '7.3.4-cvmlab-sw-protected'."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if not match:
        raise KernelBuildError(f"{release!r} is not a kernel release", "e.g. 7.3.4+deb13-amd64")
    return f"{match.group(1)}.{match.group(2)}"


def _upstream(version: str) -> str:
    """'7.3.4' of '7.3.4-1~bpo13+1', '7.3.4+deb13-amd64' or '7.3.4-cvmlab-sw-protected'."""
    match = re.match(r"\d+\.\d+(?:\.\d+)?", version)
    return match.group(0) if match else version


def builds_of(series: str, root: Path | None = None) -> list[SelftestBuild]:
    """Every selftest build of `series` in the cache, newest first."""
    base = root or kernel_cache() / "selftests"
    found = []
    for manifest in base.glob(f"{series}-*/manifest.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(manifest.read_text())["series"] == series:
                found.append(SelftestBuild(manifest.parent))
    return sorted(
        found, key=lambda b: (b.directory / "manifest.json").stat().st_mtime, reverse=True
    )


def selftests_for(release: str, root: Path | None = None) -> SelftestBuild | None:
    """The build that matches kernel `release`: same series, the same upstream version if
    one was built from it (a 7.3.4 kernel gets the 7.3.4 source over a 7.3.2 one)."""
    builds = builds_of(series_of(release), root)
    wanted = _upstream(release)
    for build in builds:
        version = build.manifest["source"].get("version") or build.manifest["source"].get(
            "kernelversion", ""
        )
        if _upstream(str(version)) == wanted:
            return build
    return builds[0] if builds else None


# --------------------------------------------------------------------------- TAP and verdicts


@dataclass(frozen=True)
class TapTest:
    """One `ok`/`not ok` line."""

    number: int
    name: str
    ok: bool
    directive: str = ""  # "SKIP", "TODO", "XFAIL" or ""
    reason: str = ""

    @property
    def failed(self) -> bool:
        return not self.ok and self.directive not in ("SKIP", "TODO", "XFAIL")

    @property
    def skipped(self) -> bool:
        return self.directive == "SKIP"


@dataclass(frozen=True)
class TapReport:
    """What a program's standard output said in TAP (empty when it printed none)."""

    planned: int | None = None
    skip_all: str | None = None  # the reason of `1..0 # SKIP reason`
    tests: tuple[TapTest, ...] = ()
    bail_out: str | None = None

    @property
    def is_tap(self) -> bool:
        return self.planned is not None or bool(self.tests) or self.bail_out is not None


_TEST_LINE = re.compile(r"^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?([^#]*?)\s*(?:#\s*(.*))?$")
_PLAN_LINE = re.compile(r"^1\.\.(\d+)\s*(?:#\s*(.*))?$")
_DIRECTIVE = re.compile(r"^(SKIP|TODO|XFAIL)\S*\s*[:-]?\s*(.*)$", re.I)


def _directive(comment: str | None) -> tuple[str, str]:
    if not comment:
        return "", ""
    match = _DIRECTIVE.match(comment.strip())
    if not match:
        return "", comment.strip()
    return match.group(1).upper(), match.group(2).strip()


def parse_tap(text: str) -> TapReport:
    """Parse kselftest's TAP 13 output; diagnostics (`# ...`) and other lines are ignored.

    Only top-level lines count (a nested subtest is indented); the plan may come first or
    last.
    """
    planned: int | None = None
    skip_all: str | None = None
    bail_out: str | None = None
    tests: list[TapTest] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("Bail out!"):
            bail_out = line[len("Bail out!") :].strip() or "bailed out"
            continue
        plan = _PLAN_LINE.match(line)
        if plan:
            planned = int(plan.group(1))
            directive, reason = _directive(plan.group(2))
            if planned == 0:
                skip_all = reason or (plan.group(2) or "").strip() or "no tests to run"
            elif directive == "SKIP":
                skip_all = reason
            continue
        match = _TEST_LINE.match(line)
        if match:
            number = int(match.group(2)) if match.group(2) else len(tests) + 1
            directive, reason = _directive(match.group(4))
            tests.append(
                TapTest(number, match.group(3).strip(), match.group(1) == "ok", directive, reason)
            )
    return TapReport(planned, skip_all, tuple(tests), bail_out)


@dataclass(frozen=True)
class Outcome:
    """The verdict on one selftest program: status, why, and the evidence."""

    status: Status
    reason: str
    exit_status: int | None
    seconds: float
    tap: TapReport = field(default_factory=TapReport)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(text: str, lines: int = OUTPUT_TAIL_LINES) -> str:
    return "\n".join(line for line in text.splitlines()[-lines:] if line.strip())


def _skip_reason(tap: TapReport, stdout: str, stderr: str) -> str:
    if tap.skip_all:
        return tap.skip_all
    reasons = sorted({t.reason or t.name for t in tap.tests if t.skipped})
    if reasons:
        return "; ".join(reasons)
    last = _tail(stderr, 1) or _tail(stdout, 1)
    return last or "skipped without a reason"


def judge(
    stdout: str, stderr: str, exit_status: int | None, seconds: float, timed_out: bool = False
) -> Outcome:
    """One verdict from TAP and the exit status together (module docstring for the rules).

    `exit_status` is negative for a signal (as subprocess reports it); None if it never
    ended. A FAIL's reason names the failed subtests or the last lines of the output.
    """
    tap = parse_tap(stdout)

    def outcome(status: Status, reason: str) -> Outcome:
        return Outcome(status, reason, exit_status, round(seconds, 2), tap)

    if timed_out:
        return outcome("ERROR", f"did not finish in {seconds:.0f} s: not judged")
    failed = [t for t in tap.tests if t.failed]
    passed = [t for t in tap.tests if t.ok and t.directive not in ("SKIP", "TODO")]
    if failed:
        names = ", ".join(f"{t.number} {t.name}".strip() for t in failed)
        return outcome("FAIL", f"subtests failed: {names}")
    if tap.bail_out is not None:
        return outcome("FAIL", f"bailed out: {tap.bail_out}")
    if exit_status is None or exit_status < 0:
        how = _signal_name(-exit_status) if exit_status is not None else "no exit status"
        return outcome("FAIL", f"killed by {how}: {_tail(stderr) or _tail(stdout)}")
    if exit_status == KSFT_SKIP and not passed:
        return outcome("SKIP", _skip_reason(tap, stdout, stderr))
    if exit_status != 0:
        return outcome(
            "FAIL", f"exit status {exit_status}: {_tail(stderr) or _tail(stdout) or 'no output'}"
        )
    if tap.planned is not None and tap.skip_all is None and len(tap.tests) < tap.planned:
        return outcome("FAIL", f"the plan said {tap.planned} subtests, {len(tap.tests)} ran")
    if tap.is_tap and not passed:
        return outcome("SKIP", _skip_reason(tap, stdout, stderr))
    skipped = [t for t in tap.tests if t.skipped]
    note = f"; skipped: {', '.join(t.name or str(t.number) for t in skipped)}" if skipped else ""
    counted = f"{len(passed)} subtests passed" if tap.is_tap else "exit status 0"
    return outcome("PASS", counted + note)


# --------------------------------------------------------------------------- running


def run_selftest(binary: Path, timeout: float, evidence: Path) -> Outcome:
    """Run one program (in its own process group, stopped at the deadline) and judge it.

    Its stdout and stderr are written to `evidence/<name>.stdout|.stderr`.
    """
    evidence.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(binary)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=binary.parent,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - started
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    (evidence / f"{binary.name}.stdout").write_text(stdout)
    (evidence / f"{binary.name}.stderr").write_text(stderr)
    return judge(stdout, stderr, None if timed_out else proc.returncode, seconds, timed_out)


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    """`cvmlab lab selftests`'s options."""
    cli = argparse.ArgumentParser(
        prog="cvmlab lab selftests",
        description="Build the kernel's own KVM selftests "
        f"({', '.join(SELFTESTS)}) from a kernel's source, cached by its inputs.",
    )
    commands = cli.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build", help="build them and print their directory")
    where = build.add_mutually_exclusive_group()
    where.add_argument(
        "--series",
        default=SW_PROTECTED_SERIES,
        help=f"linux-source-<series> from the archive [{SW_PROTECTED_SERIES}]",
    )
    where.add_argument("--tree", type=Path, help="a kernel source tree instead")
    build.add_argument("--jobs", "-j", type=int, help="parallel make jobs [number of CPUs]")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    show = commands.add_parser("show", help="which build matches a kernel release")
    show.add_argument("--release", default=os.uname().release, help="[the running kernel's]")
    return cli


def selftests_main(argv: list[str]) -> int:
    """`cvmlab lab selftests build|show`: 0 when done."""
    args = parser().parse_args(argv)
    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"selftests [{time.monotonic() - started:.0f}s] {line}", flush=True)

    try:
        if args.command == "show":
            build = selftests_for(args.release)
            if build is None:
                raise KernelBuildError(
                    f"no KVM selftests built for series {series_of(args.release)}",
                    f"run `cvmlab lab selftests build --series {series_of(args.release)}`",
                )
            print(build.directory)
            return 0
        source = chosen_source(args.tree, args.series, args.jobs, progress)
        build = build_selftests(source, progress, jobs=args.jobs, force=args.force)
    except CvmlabError as error:
        return print_error(error)
    for test in SELFTESTS:
        binary = build.binary(test)
        print(f"  {test:<30} {binary or 'absent: ' + build.absent_reason(test)}")
    print(build.directory)
    return 0


if __name__ == "__main__":
    sys.exit(selftests_main(sys.argv[1:]))
