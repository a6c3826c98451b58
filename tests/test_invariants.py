"""Every check can fail: each is fed the observation of the bug it names and must FAIL.

Pure checks (orchestrator.invariants) get the observation as the observer would
produce it; where the observation can be made for real here (a leftover memfd, a
live child process, a run dir) it is. Sources of the facts are cited per test.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestrator.guest.serial import CrashReport
from orchestrator.host.baseline import CounterBack, TeardownObservation, TeardownWatch
from orchestrator.host.kernel_log import KmsgRecord, LogDelta, find_signatures
from orchestrator.invariants.conversions import (
    private_half_released,
    shared_half_verdict,
)
from orchestrator.invariants.guest_health import guest_crash_verdict, guest_log_verdict
from orchestrator.invariants.host_log import host_log_verdict
from orchestrator.invariants.outcome import decide
from orchestrator.invariants.teardown import teardown_verdict
from orchestrator.invariants.verdict import holds, incomplete, is_self_check
from orchestrator.memory.conversions.shared_half import HoleReport

MiB = 1 << 20


def _delta(*messages: str, facility: int = 0, lost: bool = False) -> LogDelta:
    records = tuple(
        KmsgRecord(seq=i, usec=i * 1000, facility=facility, level=4, message=m)
        for i, m in enumerate(messages)
    )
    return LogDelta(records, tuple(find_signatures(list(records))), lost)


# --- H8: host log ----------------------------------------------------------------------


def test_h8_fails_on_a_splat_in_an_overwritten_log() -> None:
    verdict = host_log_verdict(
        _delta("WARNING: CPU: 0 PID: 1 at virt/kvm/guest_memfd.c:99 kvm_gmem_bug", lost=True)
    )
    assert verdict.failed and verdict.invariant == "H8"
    assert "WARNING" in verdict.evidence["problems"][0] and verdict.evidence["incomplete"]


def test_h8_with_lost_records_and_nothing_found_is_incomplete_never_pass() -> None:
    verdict = host_log_verdict(_delta("kvm: some info line", lost=True))
    assert verdict.status == "incomplete"


def test_h8_passes_a_clean_complete_log_and_ignores_user_written_lookalikes() -> None:
    assert host_log_verdict(_delta("kvm: info")).status == "pass"
    # Text a user process writes to /dev/kmsg (facility 1) cannot fake a kernel splat.
    assert host_log_verdict(_delta("WARNING: CPU: 0 fake", facility=1)).status == "pass"


# --- G3: guest health --------------------------------------------------------------------


def test_g3_fails_on_a_guest_oops_line() -> None:
    lines = ["[    1.0] virtio_net ok", "[    2.5] Oops: general protection fault, 0000 [#1]"]
    verdict = guest_log_verdict(lines)
    assert verdict.failed and verdict.evidence["bad_lines"] == [lines[1]]
    assert guest_log_verdict(lines[:1]).status == "pass"


def test_g3_fails_on_a_crash_report_with_its_console_lines() -> None:
    report = CrashReport(
        "serial", 1.0, "Kernel panic - not syncing: sysrq triggered crash",
        context=["sysrq: Trigger a crash", "Kernel panic - not syncing: sysrq triggered crash"],
    )  # fmt: skip
    verdict = guest_crash_verdict(report)
    assert verdict.failed and verdict.invariant == "G3"
    assert "sysrq: Trigger a crash" in verdict.evidence["console_lines"]
    assert guest_crash_verdict(None).status == "pass"


# --- H9: teardown -------------------------------------------------------------------------


def test_h9_fails_on_a_leftover_fd_seen_for_real() -> None:
    watch = TeardownWatch(counters={})
    fd = os.memfd_create("cvmlab-leak")
    try:
        seen = watch.observe(None, None)
    finally:
        os.close(fd)
    verdict = teardown_verdict(seen)
    assert verdict.failed
    assert any("memfd:cvmlab-leak" in p for p in verdict.evidence["problems"])
    assert teardown_verdict(watch.observe(None, None)).status == "pass"


def test_h9_fails_on_a_live_qemu_pid_and_a_run_dir_left(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "60"])  # stands for a QEMU that outlived shutdown
    try:
        watch_free = TeardownObservation(child.pid, True, str(tmp_path), True)
        verdict = teardown_verdict(watch_free)
        assert verdict.failed
        assert f"QEMU pid {child.pid} is still running" in verdict.evidence["problems"]
        assert f"run dir {tmp_path} is still there" in verdict.evidence["problems"]
    finally:
        child.kill()
        child.wait()


def test_h9_fails_when_a_host_counter_stays_up_and_is_incomplete_when_unsettled() -> None:
    leak = CounterBack("Unevictable", 100 * MiB, 228 * MiB, 8 * MiB)
    assert teardown_verdict(TeardownObservation(None, False, None, False, (), (leak,))).failed
    back = CounterBack("Unevictable", 100 * MiB, 104 * MiB, 8 * MiB)
    assert teardown_verdict(TeardownObservation(None, False, None, False, (), (back,))).status \
        == "pass"  # fmt: skip
    moving = CounterBack("Unevictable", 100 * MiB, 104 * MiB, 8 * MiB, settled=False)
    assert teardown_verdict(
        TeardownObservation(None, False, None, False, (), (moving,))
    ).status == "incomplete"


# --- H2: no GPA backed twice ----------------------------------------------------------------


def test_private_half_check_fails_on_double_backing() -> None:
    """QEMU never punched guest_memfd on private->shared (accel/kvm/kvm-all.c
    kvm_convert_memory -> ram_block_discard_guest_memfd_range skipped): Unevictable
    (where guest_memfd folios count, mm/shmem-like unevictable mapping in
    virt/kvm/guest_memfd.c) stays where it was; the old 'did not grow' check passed this."""
    chunk = 4 * MiB
    assert private_half_released(chunk, 500 * MiB, 500 * MiB).failed
    assert private_half_released(chunk, 500 * MiB, 501 * MiB).failed
    assert private_half_released(chunk, 500 * MiB, 496 * MiB).status == "pass"
    assert private_half_released(chunk, 500 * MiB, 497 * MiB).status == "pass"  # 1 MiB slack
    assert private_half_released(chunk, 500 * MiB, 499 * MiB, settled=False).status \
        == "incomplete"  # fmt: skip


def test_shared_half_check_fails_on_a_page_still_backed_and_needs_something_checked() -> None:
    backed = HoleReport(checked=0x10000, backed=((0x4003000, 0x1000),), outside_ram=0)
    assert shared_half_verdict(backed).failed
    assert shared_half_verdict(HoleReport(0x10000, (), 0)).status == "pass"
    assert shared_half_verdict(HoleReport(0, (), 0x1000)).status == "incomplete"


# --- the status rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdicts", "raised", "status"),
    [
        ([holds("H2", "x", True)], "nothing", "PASS"),
        ([holds("H2", "x", True), holds("H8", "splat", False)], "nothing", "FAIL"),
        ([holds("G3", "oops", False)], "error", "FAIL"),  # SSH broke after a guest crash
        ([holds("H2", "x", True)], "error", "ERROR"),
        ([incomplete("H8", "records lost")], "nothing", "WARN"),
        ([incomplete("H8", "records lost")], "error", "ERROR"),
        ([], "cancel", "CANCEL"),
        ([], "check", "ERROR"),  # a failed check always has its verdict: else a bug
    ],
)
def test_status_rule(verdicts: list, raised: str, status: str) -> None:  # type: ignore[type-arg]
    assert decide(verdicts, raised, "boom").status == status  # type: ignore[arg-type]


def test_the_fail_reason_is_the_first_failed_verdict() -> None:
    verdicts = [holds("H2", "first", False), holds("H8", "second", False)]
    outcome = decide(verdicts, "error", "GuestError: ssh timed out")
    assert outcome.reason.startswith("H2 FAIL: first")
    assert "1 more failed" in outcome.reason and "GuestError" in outcome.reason


def test_self_checks_are_their_own_family() -> None:
    assert is_self_check("S1") and is_self_check("S3")
    assert not is_self_check("H3") and not is_self_check("G2") and not is_self_check("SX")
