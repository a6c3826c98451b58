"""Host observers on synthetic /proc files, plus the few real ones that need no KVM."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.errors import HostError
from orchestrator.host.baseline import HostBaseline
from orchestrator.host.coco_host import read_kernel_log
from orchestrator.host.fdalloc import classify_target, fd_allocation, open_fds
from orchestrator.host.hostlock import HostLock
from orchestrator.host.kernel_log import (
    KMSG,
    HostLogWatch,
    KmsgRecord,
    find_signatures,
    kmsg_message,
    parse_kmsg_record,
)
from orchestrator.host.meminfo import format_delta, meminfo_field, parse_meminfo, sample_meminfo
from orchestrator.host.pagemap import decode_entry, pfns
from orchestrator.host.resources import ResourceSnapshot, leftovers
from orchestrator.host.settle import converge, settle
from orchestrator.host.smaps import (
    mapped_ranges,
    mapping_at,
    mapping_rss,
    mappings_named,
    parse_smaps,
)

MiB = 1 << 20
KMSG_READABLE = os.access("/dev/kmsg", os.R_OK)

MEMINFO = """\
MemTotal:       24684096 kB
Cached:            36556 kB
Unevictable:       12324 kB
Mlocked:           11360 kB
AnonPages:          9476 kB
Shmem:              8788 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""


def _meminfo_with(**values_kb: int) -> str:
    fields = parse_meminfo(MEMINFO)
    fields.update({name: kb * 1024 for name, kb in values_kb.items()})
    return "".join(
        f"{name}: {value // 1024} kB\n" if name != "HugePages_Total" else f"{name}: {value}\n"
        for name, value in fields.items()
    )


# --- meminfo --------------------------------------------------------------------------


def test_meminfo_values_are_bytes_and_counts_stay_counts() -> None:
    values = parse_meminfo(MEMINFO)
    assert values["Unevictable"] == 12324 * 1024
    assert values["HugePages_Total"] == 0
    assert values["Hugepagesize"] == 2 * MiB


def test_one_meminfo_field_reads_as_the_whole_file_parsed(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    # "SwapCached" before "Cached": a field is found by its whole name.
    path.write_text("SwapCached: 7 kB\n" + MEMINFO)
    whole = parse_meminfo(path.read_text())
    assert {name: meminfo_field(name, str(path)) for name in whole} == whole
    with pytest.raises(KeyError, match="no 'Bogus'"):
        meminfo_field("Bogus", str(path))
    with pytest.raises(KeyError, match="no 'Swap'"):
        meminfo_field("Swap", str(path))


def test_meminfo_rejects_an_unknown_unit() -> None:
    with pytest.raises(ValueError, match="unknown unit"):
        parse_meminfo("Cached: 5 MB\n")


def test_meminfo_delta_between_two_synthetic_samples(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    before = sample_meminfo(str(path))
    path.write_text(_meminfo_with(Cached=36556 + 131072, Unevictable=12324 + 131072))
    after = sample_meminfo(str(path))
    delta = after.delta(before)
    assert delta == {
        "Cached": 128 * MiB,
        "Unevictable": 128 * MiB,
        "Shmem": 0,
        "Mlocked": 0,
        "AnonPages": 0,
    }
    assert format_delta({"Unevictable": 128 * MiB}) == "Unevictable +128.0 MiB"
    with pytest.raises(KeyError, match="no 'Bogus'"):
        _ = after["Bogus"]


# --- fd allocation --------------------------------------------------------------------


def test_classify_targets() -> None:
    regular = 0o100600
    assert classify_target("anon_inode:[kvm-gmem]", regular) == "guest_memfd"
    assert classify_target("/memfd:ram (deleted)", regular) == "memfd"
    assert classify_target("/var/lib/disk.img", regular) == "file"
    assert classify_target("pipe:[1234]", 0o010600) == "other"


def test_fd_allocation_of_a_synthetic_proc_entry(tmp_path: Path) -> None:
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"x" * 8192)
    fd_dir = tmp_path / "proc" / "4242" / "fd"
    fd_dir.mkdir(parents=True)
    (fd_dir / "7").symlink_to(backing)
    alloc = fd_allocation(7, pid=4242, proc=str(tmp_path / "proc"))
    assert alloc.kind == "file" and alloc.size == 8192
    assert alloc.allocated == alloc.blocks * 512
    assert open_fds(4242, proc=str(tmp_path / "proc")) == {7: str(backing)}


def test_memfd_allocation_follows_fallocate() -> None:
    fd = os.memfd_create("cvmlab-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * MiB)
        assert fd_allocation(fd).allocated == 0
        os.posix_fallocate(fd, 0, 2 * MiB)
        alloc = fd_allocation(fd)
        assert alloc.kind == "memfd" and alloc.allocated == 2 * MiB
    finally:
        os.close(fd)


# --- smaps ----------------------------------------------------------------------------

SMAPS = """\
7f0000000000-7f0000400000 rw-s 00000000 00:0f 1234                       anon_inode:[kvm-gmem]
Size:               4096 kB
Rss:                  12 kB
Private_Dirty:        12 kB
Anonymous:             0 kB
VmFlags: rd wr sh mr mw ms
7f0000400000-7f0000401000 r--p 00000000 08:01 99                         /usr/lib/libc.so.6
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd mr mw me
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  8 kB
"""


def test_smaps_entries_carry_range_name_flags_and_rss() -> None:
    entries = parse_smaps(SMAPS)
    assert [e.name for e in entries] == ["anon_inode:[kvm-gmem]", "/usr/lib/libc.so.6", "[stack]"]
    gmem = entries[0]
    assert (gmem.start, gmem.size, gmem.perms) == (0x7F0000000000, 4 * MiB, "rw-s")
    assert gmem.rss == 12 * 1024 and gmem.fields["Anonymous"] == 0
    assert gmem.vm_flags == ("rd", "wr", "sh", "mr", "mw", "ms")


def test_mapping_lookup_by_address_and_name_in_a_synthetic_proc(tmp_path: Path) -> None:
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "smaps").write_text(SMAPS)
    proc = str(tmp_path)
    assert mapping_rss(0x7F0000001000, pid=77, proc=proc) == 12 * 1024
    assert mapping_at(0x1000, pid=77, proc=proc) is None
    assert mapping_rss(0x1000, pid=77, proc=proc) == 0
    assert [e.start for e in mappings_named("kvm-gmem", pid=77, proc=proc)] == [0x7F0000000000]


def test_rss_of_a_real_mapping_counts_touched_pages() -> None:
    with mmap.mmap(-1, 64 * mmap.PAGESIZE) as memory:
        for page in range(16):
            memory[page * mmap.PAGESIZE] = 1
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        try:
            assert mapping_rss(address) >= 16 * mmap.PAGESIZE
            present = pfns(address, 16)
        finally:
            del address
    if os.geteuid() == 0:  # PFNs read as 0 without CAP_SYS_ADMIN
        assert all(pfn for pfn in present)


def test_maps_ranges_agree_with_smaps_and_filter_by_name() -> None:
    fd = os.memfd_create("cvmlab-maps-test")
    try:
        os.ftruncate(fd, 4 * mmap.PAGESIZE)
        with mmap.mmap(fd, 4 * mmap.PAGESIZE) as memory:
            address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
            try:
                named = mapped_ranges(names=("cvmlab-maps-test",))
                from_smaps = [(e.start, e.end, e.name) for e in mappings_named("cvmlab-maps-test")]
                everything = mapped_ranges()
            finally:
                del address
    finally:
        os.close(fd)
    assert named == from_smaps and len(named) == 1
    assert named[0][1] - named[0][0] == 4 * mmap.PAGESIZE
    assert named[0] in everything and len(everything) > len(named)
    # Only the name counts: every writable mapping's line holds "rw", no name does here.
    assert all("rw" in name for _, _, name in mapped_ranges(names=("rw",)))


def test_pagemap_entries_decode_present_and_absent() -> None:
    assert decode_entry((1 << 63) | 0x1234) == 0x1234
    assert decode_entry(0x1234) is None


# --- kernel log -----------------------------------------------------------------------


def _record(message: str, facility: int = 0, seq: int = 1) -> KmsgRecord:
    return KmsgRecord(seq=seq, usec=1_500_000, facility=facility, level=4, message=message)


def test_kmsg_record_with_continuation_lines() -> None:
    record = parse_kmsg_record(
        "4,1023,12345678,-;WARNING: CPU: 1 PID: 42 at mm/x.c:1 f+0x1/0x2\n"
        " SUBSYSTEM=kvm\n DEVICE=c10:232\n"
    )
    assert (record.seq, record.usec, record.facility, record.level) == (1023, 12345678, 0, 4)
    assert record.message.startswith("WARNING: CPU: 1")
    assert record.context == {"SUBSYSTEM": "kvm", "DEVICE": "c10:232"}
    assert record.render().startswith("[   12.345678] WARNING")


def test_kmsg_record_from_user_space_has_facility_one() -> None:
    record = parse_kmsg_record("12,5,100,-;cvmlab marker\n")
    assert (record.facility, record.level, record.message) == (1, 4, "cvmlab marker")


def test_kmsg_message_is_the_parsed_records_message() -> None:
    for raw in (
        "4,1023,12345678,-;WARNING: CPU: 1 PID: 42 at mm/x.c:1 f+0x1/0x2\n SUBSYSTEM=kvm\n",
        "12,5,100,-;cvmlab marker\n",
        "6,7,8,-;a message; with a semicolon\n",
    ):
        assert kmsg_message(raw) == parse_kmsg_record(raw).message


def test_real_kernel_log_lines_are_the_records_messages() -> None:
    # The probe's fast read of the whole ring buffer against the full parser, same records.
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        pytest.skip(f"{KMSG} not readable here: {error.strerror}")
    messages = []
    try:
        while len(messages) < 50:
            try:
                messages.append(parse_kmsg_record(os.read(fd, 16384).decode(errors="replace")))
            except BlockingIOError:
                break
    finally:
        os.close(fd)
    first = [record.message for record in messages]
    lines = list(read_kernel_log().lines)
    # Records may leave the ring buffer between the two reads: skip those.
    assert first and any(first[k:] == lines[: len(first) - k] for k in range(len(first)))


def test_malformed_kmsg_record_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_kmsg_record("no prefix here")


@pytest.mark.parametrize(
    ("message", "signature"),
    [
        ("WARNING: CPU: 0 PID: 7 at virt/kvm/guest_memfd.c:120 kvm_gmem_get_folio", "WARNING"),
        ("BUG: unable to handle page fault for address: ffff", "BUG"),
        ("watchdog: BUG: soft lockup - CPU#1 stuck for 22s!", "BUG"),
        ("kernel BUG at mm/filemap.c:1500!", "BUG"),
        ("Oops: general protection fault, probably for non-canonical address", "Oops"),
        ("rcu: INFO: rcu_preempt self-detected stall on CPU", "RCU stall"),
        ("gmem: Failed to prepare folio for index 10 GFN 10 PFN 99 error -5.", "gmem prepare"),
        ("kvm_intel: SEAMCALL TDH_MEM_PAGE_AUG failed: 0x8000", "SEAMCALL"),
        ("SEV-SNP: RMP entry for PFN 0x1234 is assigned", "RMP"),
        ("mce: [Hardware Error]: Machine check events logged", "MCE"),
        ("INFO: task qemu:123 blocked for more than 120 seconds.", "hung task"),
    ],
)
def test_signature_is_found(message: str, signature: str) -> None:
    assert [name for name, _ in find_signatures([_record(message)])] == [signature]


@pytest.mark.parametrize(
    "message",
    [
        "python (6936): drop_caches: 3",
        "kvm: exiting hardware virtualization",
        "EXT4-fs (vda): mounted filesystem r/w",
    ],
)
def test_ordinary_kernel_lines_are_clean(message: str) -> None:
    assert find_signatures([_record(message)]) == []


def test_user_space_lines_cannot_fake_a_kernel_bug() -> None:
    assert find_signatures([_record("WARNING: CPU: 0 PID: 1 at fake", facility=1)]) == []


def test_unreadable_kernel_log_is_a_host_error() -> None:
    with pytest.raises(HostError, match="cannot read the host kernel log"):
        HostLogWatch("/nonexistent/kmsg")


@pytest.mark.skipif(not KMSG_READABLE, reason="/dev/kmsg is not readable")
def test_log_watch_sees_only_records_after_its_baseline() -> None:
    marker = f"cvmlab test marker {uuid.uuid4()}"
    with open("/dev/kmsg", "w", encoding="ascii") as kmsg:
        kmsg.write(f"{marker} before\n")
    with HostLogWatch() as watch:
        with open("/dev/kmsg", "w", encoding="ascii") as kmsg:
            kmsg.write(f"{marker} after\n")
        messages = [record.message for record in watch.delta().records]
    assert f"{marker} after" in messages
    assert f"{marker} before" not in messages
    assert watch.delta().clean  # user-space lines never count as problems


# --- settle ---------------------------------------------------------------------------


class FakeTime:
    """A clock that advances only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _reader(values: list[int]) -> Iterator[int]:
    yield from values
    while True:
        yield values[-1]


def test_settle_waits_until_the_window_agrees() -> None:
    fake = FakeTime()
    samples = _reader([100, 180, 250, 300, 301, 302, 302])
    result = settle(
        lambda: next(samples), tolerance=2, window=3, clock=fake.clock, sleep=fake.sleep
    )
    assert result.ok and result.value == 301
    assert result.samples == (100, 180, 250, 300, 301, 302)


def test_settle_gives_up_at_the_deadline() -> None:
    fake = FakeTime()
    counter = iter(range(0, 10_000, 100))
    result = settle(
        lambda: next(counter),
        tolerance=10,
        timeout=1.0,
        interval=0.1,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert not result.ok
    assert 1.0 <= fake.now <= 1.2  # stops within one interval of the deadline


def test_converge_tolerates_one_noisy_sample() -> None:
    fake = FakeTime()
    samples = _reader([5000, 1003, 9000, 1001, 999])
    result = converge(
        lambda: next(samples), 1000, tolerance=4, window=2, clock=fake.clock, sleep=fake.sleep
    )
    assert result.ok and result.samples == (5000, 1003, 9000, 1001, 999)


# --- resources, lock, baseline ---------------------------------------------------------


def test_leftovers_name_a_new_memfd_and_a_new_child() -> None:
    before = ResourceSnapshot.take()
    fd = os.memfd_create("cvmlab-leftover", os.MFD_CLOEXEC)
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
    try:
        found = leftovers(before, ResourceSnapshot.take())
        assert f"fd {fd} -> /memfd:cvmlab-leftover (deleted)" in found
        assert f"child process {child.pid}" in found
    finally:
        os.close(fd)
        child.communicate(timeout=10)
    assert leftovers(before, ResourceSnapshot.take()) == []


@pytest.fixture
def lock_name() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    Path(HostLock(name).path).unlink(missing_ok=True)


def test_second_holder_of_a_host_lock_waits_and_times_out(lock_name: str) -> None:
    with HostLock(lock_name), pytest.raises(HostError, match="still held"):
        HostLock(lock_name, timeout=0.2).acquire()
    with HostLock(lock_name, timeout=0.2) as again:
        assert again.waited < 0.2


@pytest.mark.skipif(not KMSG_READABLE, reason="/dev/kmsg is not readable")
def test_baseline_reports_a_counter_that_does_not_come_back(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    with HostBaseline(counters=("Unevictable",), meminfo=str(meminfo)) as baseline:
        assert baseline.report(timeout=0.2).clean
        meminfo.write_text(_meminfo_with(Unevictable=12324 + 65536))
        report = baseline.report(timeout=0.2)
    (counter,) = report.counters
    assert not counter.ok and counter.difference == 64 * MiB
    assert not report.clean
