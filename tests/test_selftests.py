"""KVM selftests: TAP parsing, judging TAP with the exit status, running, choosing the build.

The outputs fed to `judge` are those of real kselftest programs (the skip line is what
`guest_memfd_test` printed on a host without guest_memfd; the assertion block is the
format of tools/testing/selftests/kvm/lib/assert.c `test_assert`, which exits 254), and
each rule is fed the bug it names. Programs are run for real (small shell scripts standing
for selftest binaries, so the host's KVM does not decide the result), and the
make-target lookup runs on Debian's real 7.3 source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_kernel_build import assert_ends

from orchestrator.lab import kernel_build as kb
from orchestrator.lab import selftests as st
from orchestrator.lab.selftests import (
    KSFT_SKIP,
    SelftestBuild,
    judge,
    locate_test,
    parse_tap,
    run_selftest,
    selftests_for,
    series_of,
)

SKIP_ALL = (
    "Random seed: 0x22ba5792\n"
    "1..0 # SKIP - Requirement not met: kvm_check_cap(KVM_CAP_VM_TYPES) & "
    "BIT(KVM_X86_SW_PROTECTED_VM)\n"
)
ASSERTION = (
    "==== Test Assertion Failure ====\n"
    "  set_memory_region_test.c:606: exit_reason == (17)\n"
    "  pid=18424 tid=18424 errno=0 - Success\n"
    "  Wanted KVM exit reason: 17 (INTERNAL_ERROR), got: 8 (SHUTDOWN)\n"
)
HARNESS = """TAP version 13
1..4
# Starting 4 tests from 1 test cases.
#  RUN           guest_memfd.file_read_write ...
#            OK  guest_memfd.file_read_write
ok 1 guest_memfd.file_read_write
ok 2 guest_memfd.mmap_supported
ok 3 guest_memfd.numa_allocation # SKIP need at least 2 NUMA nodes
ok 4 guest_memfd.fault_overflow
# PASSED: 4 / 4 tests passed.
# Totals: pass:3 fail:0 xfail:0 xpass:0 skip:1 error:0
"""


# --------------------------------------------------------------------------- TAP


def test_parse_skip_all_keeps_the_reason() -> None:
    tap = parse_tap(SKIP_ALL)
    assert tap.planned == 0
    assert tap.skip_all == (
        "Requirement not met: kvm_check_cap(KVM_CAP_VM_TYPES) & BIT(KVM_X86_SW_PROTECTED_VM)"
    )
    assert tap.tests == ()


def test_parse_harness_output() -> None:
    tap = parse_tap(HARNESS)
    assert tap.planned == 4
    assert [(t.number, t.name, t.ok, t.directive) for t in tap.tests] == [
        (1, "guest_memfd.file_read_write", True, ""),
        (2, "guest_memfd.mmap_supported", True, ""),
        (3, "guest_memfd.numa_allocation", True, "SKIP"),
        (4, "guest_memfd.fault_overflow", True, ""),
    ]
    assert tap.tests[2].reason == "need at least 2 NUMA nodes"


def test_parse_ignores_diagnostics_and_nested_lines() -> None:
    tap = parse_tap("# ok 9 not a test\n    not ok 1 nested\nokay\n1..1\nnot ok 1 - real one\n")
    assert [(t.number, t.name, t.ok) for t in tap.tests] == [(1, "real one", False)]
    assert not parse_tap("Testing KVM_RUN with zero added memory regions\n").is_tap


# --------------------------------------------------------------------------- judging


def test_crash_after_ok_lines_is_a_fail() -> None:
    """avocado 113's tap runner calls this PASS (it ignores the exit status)."""
    outcome = judge("1..1\nok 1 first\n", ASSERTION, 254, 1.0)
    assert outcome.status == "FAIL"
    assert "exit status 254" in outcome.reason
    assert "Wanted KVM exit reason: 17" in outcome.reason


def test_skip_all_is_a_skip_with_its_reason() -> None:
    """avocado 113's tap runner drops this reason ("<unknown>")."""
    outcome = judge(SKIP_ALL, "", KSFT_SKIP, 0.1)
    assert outcome.status == "SKIP"
    assert "KVM_X86_SW_PROTECTED_VM" in outcome.reason


def test_plain_text_program_is_judged_by_its_exit_status() -> None:
    text = "Random seed: 0x1\nTesting KVM_RUN with zero added memory regions\n"
    assert judge(text, "", 0, 26.0).status == "PASS"
    failed = judge(text, ASSERTION, 254, 3.0)
    assert failed.status == "FAIL" and "SHUTDOWN" in failed.reason
    skipped = judge("", "Requirement not met: KVM_CAP_X", KSFT_SKIP, 0.1)
    assert skipped.status == "SKIP" and skipped.reason == "Requirement not met: KVM_CAP_X"


def test_a_signal_is_a_fail_naming_it() -> None:
    outcome = judge("1..2\nok 1 a\n", "", -11, 1.0)
    assert outcome.status == "FAIL"
    assert "SIGSEGV" in outcome.reason


def test_a_not_ok_subtest_fails_by_name_even_with_exit_0() -> None:
    outcome = judge("1..2\nok 1 a\nnot ok 2 guest_memfd.punch\n", "", 0, 1.0)
    assert outcome.status == "FAIL"
    assert outcome.reason == "subtests failed: 2 guest_memfd.punch"


def test_fewer_subtests_than_planned_is_a_fail() -> None:
    outcome = judge("1..3\nok 1 a\nok 2 b\n", "", 0, 1.0)
    assert outcome.status == "FAIL"
    assert "plan said 3" in outcome.reason


def test_bail_out_is_a_fail() -> None:
    assert judge("1..2\nBail out! no /dev/kvm\n", "", 1, 0.1).status == "FAIL"


def test_timeout_is_an_error_not_a_verdict() -> None:
    outcome = judge("1..2\nok 1 a\n", "", None, 900.0, timed_out=True)
    assert outcome.status == "ERROR"
    assert "did not finish" in outcome.reason


def test_all_subtests_skipped_is_a_skip_never_a_pass() -> None:
    outcome = judge("1..2\nok 1 a # SKIP no NUMA\nok 2 b # SKIP no MMAP\n", "", 0, 0.2)
    assert outcome.status == "SKIP"
    assert outcome.reason == "no MMAP; no NUMA"


def test_partly_skipped_passes_and_says_what_was_skipped() -> None:
    outcome = judge(HARNESS, "", 0, 2.0)
    assert outcome.status == "PASS"
    assert outcome.reason == "3 subtests passed; skipped: guest_memfd.numa_allocation"


def test_todo_failures_do_not_fail() -> None:
    assert judge("1..2\nok 1 a\nnot ok 2 b # TODO later\n", "", 0, 0.1).status == "PASS"


# --------------------------------------------------------------------------- running


def _program(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_run_keeps_the_output_and_judges(tmp_path: Path) -> None:
    program = _program(
        tmp_path / "crashes_test", "echo 1..1; echo ok 1 a; echo boom >&2; exit 254\n"
    )
    evidence = tmp_path / "evidence"
    outcome = run_selftest(program, 60, evidence)
    assert outcome.status == "FAIL" and outcome.exit_status == 254
    assert (evidence / "crashes_test.stdout").read_text() == "1..1\nok 1 a\n"
    assert (evidence / "crashes_test.stderr").read_text() == "boom\n"


def test_run_past_the_deadline_stops_the_program_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    program = _program(tmp_path / "hangs_test", f"sleep 300 & echo $! > {pidfile}; wait\n")
    outcome = run_selftest(program, 2, tmp_path / "evidence")
    assert outcome.status == "ERROR"
    assert_ends(int(pidfile.read_text()))


# --------------------------------------------------------------------------- choosing builds


def _fake_build(root: Path, series: str, version: str, mtime: float) -> SelftestBuild:
    directory = root / f"{series}-{abs(hash(version)) % 10**8:08d}"
    (directory / "bin").mkdir(parents=True)
    manifest = {
        "series": series,
        "source": {"package": f"linux-source-{series}", "version": version},
        "tests": {
            "guest_memfd_test": {"built": True, "target": "guest_memfd_test"},
            "pre_fault_memory_test": {"built": False, "reason": "not in 6.9"},
        },
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    os.utime(directory / "manifest.json", (mtime, mtime))
    return SelftestBuild(directory)


def test_the_build_matches_the_running_kernel(tmp_path: Path) -> None:
    old = _fake_build(tmp_path, "7.3", "7.3.2-1~bpo13+1", 1000)
    new = _fake_build(tmp_path, "7.3", "7.3.4-1~bpo13+1", 500)
    _fake_build(tmp_path, "6.12", "6.12.95-1~bpo12+1", 2000)
    assert selftests_for("7.3.4+deb13-amd64", tmp_path) == new
    assert selftests_for("7.3.2-cvmlab-sw-protected", tmp_path) == old
    # No build of that exact version: the newest of the series, never another series.
    assert selftests_for("7.3.9+deb13-amd64", tmp_path) == old
    assert selftests_for("7.2.12+deb13-amd64", tmp_path) is None


def test_an_absent_program_says_why(tmp_path: Path) -> None:
    build = _fake_build(tmp_path, "6.9", "6.9.1-1", 1)
    assert build.binary("guest_memfd_test") == build.directory / "bin" / "guest_memfd_test"
    assert build.binary("pre_fault_memory_test") is None
    assert build.absent_reason("pre_fault_memory_test") == "not in 6.9"
    assert "was not asked for" in build.absent_reason("other_test")


def test_series_of_releases() -> None:
    assert series_of("7.3.4+deb13-amd64") == "7.3"
    assert series_of("6.12.95+deb12-amd64") == "6.12"
    assert series_of("7.3.4-cvmlab-sw-protected") == "7.3"
    with pytest.raises(kb.KernelBuildError, match="is not a kernel release"):
        series_of("unknown")


def test_show_without_a_build_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(kb.CACHE_ENV, str(tmp_path))
    assert st.selftests_main(["show", "--release", "5.10.0-1-amd64"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "cvmlab: error: no KVM selftests built for series 5.10: "
        "run `cvmlab lab selftests build --series 5.10`"
    ]


# --------------------------------------------------------------------------- the real source


@pytest.mark.parametrize(("series", "x86_dir"), [("7.3", "x86"), ("6.12", "x86_64")])
def test_targets_in_the_real_sources(series: str, x86_dir: str) -> None:
    """x86 programs live in x86_64/ up to 6.12 and x86/ since; common ones at the top."""
    source = kb.fetch_source(series, lambda line: None)
    kvm_dir = source.tree / st.KVM_DIR
    makefile = st.kvm_makefile_text(kvm_dir)
    for common in ("guest_memfd_test", "set_memory_region_test", "pre_fault_memory_test"):
        assert locate_test(kvm_dir, makefile, common) == common
    for private in ("private_mem_conversions_test", "private_mem_kvm_exits_test"):
        assert locate_test(kvm_dir, makefile, private) == f"{x86_dir}/{private}"
    assert locate_test(kvm_dir, makefile, "no_such_test") is None
