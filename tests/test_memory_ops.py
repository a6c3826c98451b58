"""Balloon, virtio-mem, backing samples, trace lines and the H2 verdict arithmetic.

Pure parts run on facts: trace lines exactly as QEMU 10.0.2 printed them here
(scenario and bench runs), QEMU's own refusals, the per-backend rules of
`ram_block_discard_range`. `follow` runs against a real QEMU's QMP (no guest:
nothing ever moves, which is what a stall looks like). The `vm` tests boot one
guest with a balloon and a virtio-mem device.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_process import started_qemu

from orchestrator.errors import MemoryOpError
from orchestrator.host.settle import Settled
from orchestrator.image import ImageManifest
from orchestrator.invariants.host_memory import DROP_TOLERANCE, drop_verdicts, host_verdict
from orchestrator.invariants.verdict import Tolerance
from orchestrator.memory.backing import BackendInfo, BackingSample, held_bytes
from orchestrator.memory.balloon import (
    BALLOON_PAGE,
    DEFAULT_FLOOR,
    balloon_actual,
    check_balloon_target,
    guest_ram_size,
    set_balloon,
)
from orchestrator.memory.expectations import (
    expect_discard,
    expected_host_move,
    host_move,
    hugetlb_shortfall,
)
from orchestrator.memory.guest_view import parse_guest_memory
from orchestrator.memory.progress import follow
from orchestrator.memory.virtio_mem import check_requested_size, resize, virtio_mem_device
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.qmp import QmpEvent, QmpSession
from orchestrator.qemu.spec import KernelBoot, MemfdBackend, spec_from_params
from orchestrator.qemu.trace import TraceCollector, TraceTotals, parse_line
from orchestrator.timeline import Timeline, now
from orchestrator.units import GiB, MiB

QEMU = os.environ.get("CVMLAB_QEMU", "qemu-system-x86_64")

# --- bad input: refused before anything is sent -------------------------------------------


def test_balloon_target_above_guest_ram_is_refused_naming_the_limit() -> None:
    with pytest.raises(MemoryOpError, match=r"above the guest's RAM \(512M\).*at most 512M"):
        check_balloon_target(640 * MiB, 512 * MiB)


def test_balloon_target_below_the_floor_is_refused() -> None:
    with pytest.raises(MemoryOpError, match="below the floor 128M"):
        check_balloon_target(64 * MiB, 512 * MiB)


def test_balloon_floor_can_be_lowered_on_purpose() -> None:
    check_balloon_target(64 * MiB, 512 * MiB, floor=32 * MiB)


def test_balloon_target_must_be_whole_balloon_pages() -> None:
    with pytest.raises(MemoryOpError, match="multiple of the balloon's 4096-byte page"):
        check_balloon_target(384 * MiB + 100, 512 * MiB)


def test_balloon_target_must_be_an_integer() -> None:
    with pytest.raises(MemoryOpError, match="not a number of bytes"):
        check_balloon_target("384M", 512 * MiB)  # type: ignore[arg-type]


def test_balloon_target_at_guest_ram_and_at_floor_are_accepted() -> None:
    check_balloon_target(512 * MiB, 512 * MiB)
    check_balloon_target(DEFAULT_FLOOR, 512 * MiB)


def test_virtio_mem_size_off_the_block_size_is_refused_with_neighbours() -> None:
    with pytest.raises(MemoryOpError, match=r"not a multiple of .* block size 2M.* 2M or 4M"):
        check_requested_size(3 * MiB, 2 * MiB, 512 * MiB)


def test_virtio_mem_size_above_the_backend_is_refused() -> None:
    with pytest.raises(MemoryOpError, match="exceeds the device's memory backend"):
        check_requested_size(1 * GiB, 2 * MiB, 512 * MiB)


def test_virtio_mem_negative_size_is_refused() -> None:
    with pytest.raises(MemoryOpError, match="not a byte count"):
        check_requested_size(-2 * MiB, 2 * MiB, 512 * MiB)


def test_virtio_mem_zero_and_full_sizes_are_accepted() -> None:
    check_requested_size(0, 2 * MiB, 512 * MiB)
    check_requested_size(512 * MiB, 2 * MiB, 512 * MiB)


# --- trace lines (as QEMU 10.0.2 printed them) -------------------------------------------

DISCARD_MEMFD = (
    "ram_block_discard_range ram0@0x7fea10d38000 + 0x1000: madvise: 1 fallocate: 1 ret: 0"
)
DISCARD_VMEM = (
    "ram_block_discard_range 0000:00:02.0/vmem0@0x7fb61bdff000 + 0x8000000: madvise: 1 "
    "fallocate: 1 ret: 0"
)
HANDLE_OUTPUT = "virtio_balloon_handle_output section name: ram0 gpa: 0x18d39000"
TO_TARGET = "virtio_balloon_to_target balloon target: 0x18000000 num_pages: 32768"
SET_CONFIG = "virtio_balloon_set_config actual: 256 oldactual: 0"
UNPLUG = "virtio_mem_unplug_request addr=0x108000000 nb_blocks=64"
RESIZED = "virtio_mem_resized_usable_region old_size=0x0new_size=0x20000000"
QEMU_WARNING = (
    "qemu-system-x86_64: warning: ram_block_discard_range: Discarding RAM in private file "
    "mappings is possibly dangerous, because it will modify the underlying file and will "
    "affect other users of the file"
)


def test_discard_line_gives_ramblock_address_length_and_result() -> None:
    record = parse_line(DISCARD_MEMFD, 1.0, 0.0)
    assert record is not None
    assert record.args == {
        "ramblock": "ram0", "hva": 0x7FEA10D38000, "length": 4096, "madvise": 1,
        "fallocate": 1, "ret": 0,
    }  # fmt: skip
    assert record.discarded == 4096 and not record.failed_discard


def test_discard_line_of_a_device_ramblock_keeps_its_qdev_prefix() -> None:
    record = parse_line(DISCARD_VMEM, 1.0, 0.0)
    assert record is not None
    assert record.args["ramblock"] == "0000:00:02.0/vmem0"
    assert record.discarded == 128 * MiB


def test_failed_discard_counts_no_bytes() -> None:
    record = parse_line(DISCARD_MEMFD.replace("ret: 0", "ret: -22"), 1.0, 0.0)
    assert record is not None and record.failed_discard and record.discarded == 0


def test_two_word_keys_become_one_identifier() -> None:
    output = parse_line(HANDLE_OUTPUT, 1.0, 0.0)
    target = parse_line(TO_TARGET, 1.0, 0.0)
    assert output is not None and output.args == {"section_name": "ram0", "gpa": 0x18D39000}
    assert target is not None and target.args == {"balloon_target": 0x18000000, "num_pages": 32768}


def test_key_equals_value_lines_parse() -> None:
    record = parse_line(UNPLUG, 1.0, 0.0)
    assert record is not None and record.args == {"addr": 0x108000000, "nb_blocks": 64}


def test_resized_region_line_without_a_space_parses() -> None:
    record = parse_line(RESIZED, 1.0, 0.0)
    assert record is not None and record.args == {"old_size": 0, "new_size": 512 * MiB}


def test_qemu_warnings_are_not_trace_records() -> None:
    assert parse_line(QEMU_WARNING, 1.0, 0.0) is None


def test_lines_of_unwanted_events_are_skipped() -> None:
    assert parse_line(SET_CONFIG, 1.0, 0.0, names=("ram_block_discard_range",)) is None
    assert parse_line(SET_CONFIG, 1.0, 0.0, names=("virtio_balloon_*",)) is not None


def test_timestamped_line_gets_qemus_time_on_our_clock() -> None:
    # -msg timestamp=on: "%d@%zu.%06zu:" before the name (scripts/tracetool/backend/log.py).
    record = parse_line(f"4242@1700000000.250000:{SET_CONFIG}", 99.0, 1_699_999_000.0)
    assert record is not None
    assert record.tid == 4242 and record.qemu_wall == pytest.approx(1_700_000_000.25)
    assert record.t == pytest.approx(1000.25)
    assert record.args == {"actual": 256, "oldactual": 0}


# QEMU 11.1.3 (-msg timestamp=on, measured here): an ISO-8601 UTC time and a space, no
# thread id; the discard is ram_block_discard_shared_range with 10.0's arguments.
ISO_PREFIX = "2026-11-21T06:53:45.332569Z "
ISO_WALL = 1_795_244_025.332569  # that time as seconds since the epoch
DISCARD_SHARED = DISCARD_MEMFD.replace("ram_block_discard_range", "ram_block_discard_shared_range")


def test_qemu_11_1_discard_name_is_a_discard_with_the_same_arguments() -> None:
    old, new = parse_line(DISCARD_MEMFD, 1.0, 0.0), parse_line(DISCARD_SHARED, 1.0, 0.0)
    assert old is not None and new is not None
    assert new.name == "ram_block_discard_shared_range" and new.args == old.args
    assert new.discarded == 4096 and not new.failed_discard
    failed = parse_line(DISCARD_SHARED.replace("ret: 0", "ret: -22"), 1.0, 0.0)
    assert failed is not None and failed.failed_discard and failed.discarded == 0


def test_qemu_11_1_iso_prefix_gives_qemus_time_on_our_clock() -> None:
    record = parse_line(ISO_PREFIX + DISCARD_SHARED, 99.0, ISO_WALL - 1000.0)
    assert record is not None and record.name == "ram_block_discard_shared_range"
    assert record.qemu_wall == pytest.approx(ISO_WALL) and record.tid is None
    assert record.t == pytest.approx(1000.0)
    assert record.discarded == 4096


def test_a_warning_after_an_iso_time_is_not_a_trace_record() -> None:
    assert parse_line(ISO_PREFIX + QEMU_WARNING, 1.0, 0.0) is None


def test_collector_counts_both_discard_names_as_discards(tmp_path: Path) -> None:
    log = tmp_path / "trace.log"
    log.write_text("")
    collector = TraceCollector(log).start(follow=False)
    with log.open("a") as out:
        out.write(f"{DISCARD_MEMFD}\n{ISO_PREFIX}{DISCARD_SHARED}\n{ISO_PREFIX}{UNPLUG}\n")
    totals = collector.stop()
    assert totals.discards == 2 and totals.discarded_bytes == 8192
    assert totals.lines == {
        "ram_block_discard_range": 1, "ram_block_discard_shared_range": 1,
        "virtio_mem_unplug_request": 1,
    }  # fmt: skip


def test_collector_totals_complete_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "qemu.stderr"
    log.write_text("old line before start\n")
    timeline_path = tmp_path / "timeline.jsonl"
    with Timeline(timeline_path) as timeline:
        collector = TraceCollector(log, timeline).start(follow=False)
        with log.open("a") as out:
            out.write(f"{DISCARD_MEMFD}\n{DISCARD_MEMFD}\n{QEMU_WARNING}\n{UNPLUG}\n{SET_CONFIG}")
        first = collector.totals()
        with log.open("a") as out:
            out.write("\n")  # the unfinished line is complete now
        second = collector.totals()
    assert first.lines == {"ram_block_discard_range": 2, "virtio_mem_unplug_request": 1}
    assert first.discarded_bytes == 8192 and first.discards == 2
    assert second.minus(first).lines == {"virtio_balloon_set_config": 1}
    records = [json.loads(line) for line in timeline_path.read_text().splitlines()]
    batch = next(r for r in records if r["kind"] == "ram_block_discard_range")
    assert (batch["source"], batch["count"], batch["bytes"], batch["stamp"]) == (
        "trace", 2, 8192, "read",
    )  # fmt: skip


def test_collector_follows_the_file_in_its_thread(tmp_path: Path) -> None:
    log = tmp_path / "trace.log"
    log.write_text("")
    collector = TraceCollector(log, interval=0.01).start()
    try:
        with log.open("a") as out:
            out.write(DISCARD_VMEM + "\n")
        deadline = now() + 5
        pause = threading.Event()
        while not collector.records() and now() < deadline:
            pause.wait(0.01)  # polling with a deadline: the follower thread must read it
        assert [r.name for r in collector.records()] == ["ram_block_discard_range"]
    finally:
        totals = collector.stop()
    assert totals.discarded_bytes == 128 * MiB


def test_totals_difference_drops_unchanged_events() -> None:
    earlier = TraceTotals({"a": 2, "b": 1}, discarded_bytes=10, discards=1)
    later = TraceTotals({"a": 5, "b": 1}, discarded_bytes=30, discards=3, failed_discards=1)
    assert later.minus(earlier) == TraceTotals({"a": 3}, 20, 2, 1)


# --- backing arithmetic and per-backend expectations ----------------------------------------


def info(kind: str, share: bool = True, hugetlb: bool = False, memdev: str = "ram0") -> BackendInfo:
    return BackendInfo(
        memdev=memdev, kind=kind, share=share, hugetlb=hugetlb, size=512 * MiB,
        page_size=2 * MiB if hugetlb else 4096, hva=0x7F0000000000, used=512 * MiB,
        mem_path="/dev/shm" if kind == "file" else None,
    )  # fmt: skip


def sample(
    backend: BackendInfo, rss: int, anonymous: int = 0, file: int | None = None
) -> BackingSample:
    return BackingSample(0.0, backend, rss, anonymous, 0, file)


def test_held_is_the_fds_blocks_for_shared_memfd() -> None:
    assert held_bytes(info("memfd"), 300 * MiB, 0, 200 * MiB) == 200 * MiB


def test_held_counts_file_and_private_copies_for_share_off() -> None:
    assert held_bytes(info("memfd", share=False), 300 * MiB, 250 * MiB, 300 * MiB) == 550 * MiB


def test_held_is_the_mappings_rss_for_anonymous_ram() -> None:
    assert held_bytes(info("anon", share=False), 300 * MiB, 300 * MiB, None) == 300 * MiB


def test_held_without_the_fd_is_an_error_not_a_zero() -> None:
    with pytest.raises(MemoryOpError, match="no readable fd allocation"):
        held_bytes(info("file"), 1, 0, None)


def test_labels_and_host_counters_per_backend() -> None:
    assert (info("memfd").label, info("memfd").host_counter()) == ("memfd", "Shmem")
    private = info("memfd", share=False)
    assert (private.label, private.host_counter()) == ("memfd-private", "Shmem")
    huge = info("memfd", hugetlb=True)
    assert (huge.label, huge.host_counter()) == ("memfd-hugetlb", "HugePages_Free")
    assert info("anon", share=False).host_counter() == "AnonPages"
    assert info("anon", share=True).host_counter() == "Shmem"
    assert info("file").host_counter() == "Shmem"  # /dev/shm is tmpfs


def test_counters_go_to_the_timeline_in_kib() -> None:
    counters = sample(info("memfd"), 8 * MiB, 0, 8 * MiB).counters_kib()
    assert counters == {"ram0.held": 8192, "ram0.rss": 8192, "ram0.file": 8192}


def test_balloon_on_hugetlb_is_expected_to_free_nothing_and_warn() -> None:
    row = expect_discard(info("memfd", hugetlb=True), "balloon")
    assert not row.frees and row.held == 0.0
    assert row.qemu_warning is not None and "page size > 4kiB" in row.qemu_warning


def test_hugetlb_gives_back_whole_pages_to_reporting_and_virtio_mem() -> None:
    huge = info("memfd", hugetlb=True)
    assert expect_discard(huge, "free-page-reporting").held == 1.0
    assert expect_discard(huge, "virtio-mem-unplug").held == 1.0


def test_share_off_memfd_gives_back_twice_and_warns() -> None:
    row = expect_discard(info("memfd", share=False), "balloon")
    assert row.held == 2.0 and row.file == 1.0 and row.anonymous == 1.0
    assert row.qemu_warning is not None and "private file mappings" in row.qemu_warning


def test_shared_and_anonymous_backends_give_back_the_amount() -> None:
    for backend in (info("memfd"), info("file"), info("anon", share=False), info("anon")):
        assert expect_discard(backend, "balloon").held == 1.0, backend.label


def test_drop_verdicts_pass_within_ten_percent_and_report_kib() -> None:
    backend = info("memfd")
    row = expect_discard(backend, "balloon")
    before = sample(backend, 450 * MiB, 0, 450 * MiB)
    after = sample(backend, 326 * MiB, 0, 326 * MiB)  # 124 of 128 MiB, as measured
    verdicts = drop_verdicts("H2", "inflate", row, 128 * MiB, before, after)
    assert [v.status for v in verdicts] == ["pass", "pass", "pass"]
    assert (verdicts[0].expected, verdicts[0].seen) == (131072, 126976)


def test_drop_verdicts_fail_a_discard_that_freed_nothing() -> None:
    backend = info("memfd")
    before = sample(backend, 450 * MiB, 0, 450 * MiB)
    verdicts = drop_verdicts(
        "H2", "inflate", expect_discard(backend, "balloon"), 128 * MiB, before, before
    )
    assert all(v.failed for v in verdicts)


def test_drop_verdicts_check_file_and_copies_separately_for_share_off() -> None:
    backend = info("memfd", share=False)
    row = expect_discard(backend, "balloon")
    before = sample(backend, 450 * MiB, 450 * MiB, 450 * MiB)
    only_file = sample(backend, 450 * MiB, 450 * MiB, 322 * MiB)  # the copies stayed
    statuses = [v.status for v in drop_verdicts("H2", "x", row, 128 * MiB, before, only_file)]
    assert statuses == ["fail", "pass", "fail"]


def test_drop_verdicts_pass_hugetlb_balloon_only_when_nothing_moved() -> None:
    backend = info("memfd", hugetlb=True)
    row = expect_discard(backend, "balloon")
    before = sample(backend, 0, 0, 512 * MiB)
    assert not any(v.failed for v in drop_verdicts("H2", "x", row, 128 * MiB, before, before))
    freed = sample(backend, 0, 0, 384 * MiB)
    assert all(v.failed for v in drop_verdicts("H2", "x", row, 128 * MiB, before, freed))


def test_expected_host_move_follows_the_backends_counter() -> None:
    memfd = info("memfd")
    assert expected_host_move(sample(memfd, 0, 0, 10 * MiB), sample(memfd, 0, 0, 4 * MiB)) == (
        6 * MiB
    )
    anon = info("anon", share=False)
    assert expected_host_move(sample(anon, 9 * MiB, 9 * MiB), sample(anon, 2 * MiB, 2 * MiB)) == (
        7 * MiB
    )


def test_free_huge_pages_count_up_when_memory_is_freed() -> None:
    assert host_move("HugePages_Free", 100, 300) == 200
    assert host_move("Shmem", 300, 100) == 200


def settled(value: int, ok: bool = True) -> Settled:
    return Settled(value, ok, (value,) * 3, 0.5)


def test_host_verdict_judges_only_settled_counters_and_an_unsettled_one_is_incomplete() -> None:
    # HugePages_Free counts up when pages are freed.
    judged = host_verdict(
        "H2", "x", "HugePages_Free", 128 * MiB, settled(100 * MiB), settled(228 * MiB)
    )
    assert judged.status == "pass" and judged.tolerance == "±8192 or ±10%"
    moving = host_verdict(
        "H2", "x", "HugePages_Free", 128 * MiB, settled(100 * MiB), settled(1, False)
    )
    assert moving.status == "incomplete" and "did not settle" in moving.summary


def test_host_verdict_fails_when_the_host_kept_the_memory() -> None:
    verdict = host_verdict(
        "H2", "x", "HugePages_Free", 128 * MiB, settled(100 * MiB), settled(101 * MiB)
    )
    assert verdict.failed and verdict.seen == 1024


@pytest.mark.parametrize("counter", ["AnonPages", "Shmem", "Cached"])
def test_counters_other_work_moves_are_recorded_not_judged(counter: str) -> None:
    # Another process or a developer's own VM moves these; QEMU's own backing is the judge.
    verdict = host_verdict("H2", "x", counter, 128 * MiB, settled(400 * MiB), settled(390 * MiB))
    assert verdict.status == "not-applicable"
    assert verdict.expected == 128 * 1024 and verdict.seen == 10 * 1024


def test_hugetlb_variant_cancels_with_the_count_needed() -> None:
    boot = KernelBoot(kernel="k")
    spec = spec_from_params({"backend": "memfd", "hugetlb": "on", "memory": "512M"}, boot=boot)
    assert isinstance(spec.backend, MemfdBackend)
    none_free = {"HugePages_Total": 0, "HugePages_Free": 0, "Hugepagesize": 2 * MiB}
    reason = hugetlb_shortfall(spec, none_free)
    assert reason is not None and "needs 256" in reason and "nr_hugepages" in reason
    assert hugetlb_shortfall(spec, {**none_free, "HugePages_Free": 256}) is None
    plain = spec_from_params({"backend": "memfd"}, boot=boot)
    assert hugetlb_shortfall(plain, none_free) is None


def test_virtio_mem_hugetlb_backend_counts_too() -> None:
    spec = spec_from_params(
        {"virtio_mem_size": "512M", "virtio_mem_backend": "memfd", "virtio_mem_hugetlb": "on"},
        boot=KernelBoot(kernel="k"),
    )
    reason = hugetlb_shortfall(spec, {"HugePages_Free": 10, "Hugepagesize": 2 * MiB})
    assert reason is not None and "needs 256" in reason


def test_guest_view_parses_meminfo_and_memory_blocks() -> None:
    text = (
        "MemTotal:         475024 kB\nMemFree:          442248 kB\nMemAvailable:     436796 kB\n"
        "@@blocks\n8000000\nonline\nonline\noffline\n"
    )
    view = parse_guest_memory(text)
    assert (view.mem_total, view.block_size, view.online_blocks, view.offline_blocks) == (
        475024 * 1024, 128 * MiB, 2, 1,
    )  # fmt: skip


def test_tolerance_of_drop_verdicts_is_the_tp_qemu_ten_percent() -> None:
    assert Tolerance(absolute=4096, relative=0.10) == DROP_TOLERANCE


# --- follow() against a real QEMU (no guest: nothing moves) ---------------------------------


@pytest.fixture
def idle_qmp() -> Iterator[QmpSession]:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    with started_qemu(QEMU, "-machine", "none", "-S") as qemu:
        yield qemu.qmp


def _actual(event: QmpEvent) -> int | None:
    return int(event.data["actual"]) if "actual" in event.data else None


def test_follow_stops_at_a_stall_and_reports_where_it_stopped(idle_qmp: QmpSession) -> None:
    values = iter([100, 90, 80])
    started = now()
    progress = follow(
        lambda: next(values, 80), 0, idle_qmp, "BALLOON_CHANGE", _actual, before=100,
        mark=idle_qmp.mark(), started=started, timeout=10, stall=0.3, interval=0.02,
        event_grace=0.1,
    )  # fmt: skip
    assert progress.stalled and not progress.reached and progress.after == 80
    assert [v for _, v in progress.samples] == [90, 80]
    assert progress.event_seconds is None  # no guest, no BALLOON_CHANGE
    assert 0.3 <= progress.seconds < 3


def test_follow_returns_at_once_when_already_at_target(idle_qmp: QmpSession) -> None:
    started = now()
    progress = follow(
        lambda: 50, 50, idle_qmp, "BALLOON_CHANGE", _actual, before=50,
        mark=idle_qmp.mark(), started=started, timeout=10, stall=5,
    )  # fmt: skip
    assert progress.reached and progress.moved == 0 and progress.seconds < 1


def test_follow_gives_up_at_the_deadline(idle_qmp: QmpSession) -> None:
    counter = iter(range(1000, 0, -1))
    progress = follow(
        lambda: next(counter), -1, idle_qmp, "BALLOON_CHANGE", _actual, before=1001,
        mark=idle_qmp.mark(), started=now(), timeout=0.3, stall=5, interval=0.02,
        event_grace=0.1,
    )  # fmt: skip
    assert not progress.reached and not progress.stalled and progress.after < 1001


def test_balloon_on_a_machine_without_one_says_how_to_add_it(idle_qmp: QmpSession) -> None:
    with pytest.raises(MemoryOpError, match=r"no balloon device.*balloon=on"):
        balloon_actual(idle_qmp)


# --- one real guest: bad input never reaches QEMU, good input does what it says --------------


def _commands(evidence: Path) -> list[str]:
    lines = (evidence / "qmp.jsonl").read_text().splitlines()
    return [
        json.loads(line)["msg"].get("execute", "")
        for line in lines
        if json.loads(line).get("kind") == "command"
    ]


@pytest.mark.vm
def test_balloon_and_virtio_mem_refuse_bad_sizes_then_move_on_both_sides(
    guest_image: ImageManifest, evidence_dir: Path, qemu_binary: str
) -> None:
    boot = KernelBoot(
        kernel=str(guest_image.kernel), initrd=str(guest_image.initrd),
        cmdline=f"{guest_image.cmdline} memhp_default_state=online_movable",
    )  # fmt: skip
    spec = spec_from_params(
        {"balloon": "on", "memory": "512M", "virtio_mem_size": "256M",
         "virtio_mem_block_size": "2M"},
        boot=boot,
    )  # fmt: skip
    timeline = Timeline(evidence_dir / "timeline.jsonl")
    with timeline, Machine(
        spec, evidence_dir, binary=qemu_binary, timeline=timeline,
        ready_marker=guest_image.ready_marker,
    ) as machine:  # fmt: skip
        machine.start()
        machine.wait_ready()
        shell = machine.ssh(guest_image.ssh_user, guest_image.ssh_key, guest_image.host_key)
        qmp = machine.qmp
        ram = guest_ram_size(qmp)
        assert ram == 512 * MiB
        with pytest.raises(MemoryOpError, match="above the guest's RAM"):
            set_balloon(qmp, ram + BALLOON_PAGE, guest=shell)
        with pytest.raises(MemoryOpError, match="below the floor"):
            set_balloon(qmp, 16 * MiB, guest=shell)
        with pytest.raises(MemoryOpError, match="not a multiple of the device's block size"):
            resize(qmp, 3 * MiB, guest=shell)
        with pytest.raises(MemoryOpError, match="exceeds the device's memory backend"):
            resize(qmp, 512 * MiB, guest=shell)
        sent = _commands(evidence_dir)
        assert "balloon" not in sent and "qom-set" not in sent
        assert not any("meminfo" in c for c in _guest_commands(evidence_dir))

        inflated = set_balloon(qmp, ram - 32 * MiB, guest=shell)
        assert inflated.reached and inflated.inflated == 32 * MiB
        assert inflated.guest_total_drop == 32 * MiB
        assert inflated.progress.event_seconds is not None
        plugged = resize(qmp, 64 * MiB, guest=shell)
        assert plugged.reached and plugged.plugged_change == 64 * MiB
        assert plugged.guest_total_change == 64 * MiB
        assert virtio_mem_device(qmp).size == 64 * MiB


def _guest_commands(evidence: Path) -> list[str]:
    records = [json.loads(line) for line in (evidence / "timeline.jsonl").read_text().splitlines()]
    return [r["cmd"] for r in records if (r["source"], r["kind"]) == ("ssh", "command")]


def test_discard_verdict_passes_only_on_exactly_the_expected_bytes() -> None:
    from orchestrator.invariants.host_memory import discard_verdict

    exact = discard_verdict("x", 128 * MiB, 128 * MiB, 0)
    assert exact.status == "pass" and exact.expected == exact.seen == 128 * 1024
    short = discard_verdict("x", 128 * MiB, 128 * MiB - 4096, 0)
    assert short.failed and short.seen == 128 * 1024 - 4
