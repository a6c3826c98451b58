"""Every check of invariants/gmem_vcpu.py and gmem_host.py fed the observation of the bug it
names: each must FAIL on it (and PASS on the healthy observation)."""

from __future__ import annotations

import errno

from orchestrator.invariants import gmem_host, gmem_vcpu
from orchestrator.invariants.verdict import Tolerance

MiB = 1 << 20
TOL = Tolerance(absolute=2 * MiB, relative=0.1)
UNEVICTABLE = 1 << gmem_host.KPF_UNEVICTABLE


def test_values_match_fails_on_a_lost_write_and_on_missing_pages() -> None:
    assert gmem_vcpu.values_match("G2", "x", [1, 2, 3], [1, 2, 3]).status == "pass"
    assert gmem_vcpu.values_match("G2", "x", [1, 2, 3], [1, 0, 3]).failed  # a lost write
    assert gmem_vcpu.values_match("G2", "x", [1, 2, 3], [1, 2]).failed  # a page never read


def test_reads_zero_after_punch_fails_on_stale_data() -> None:
    old = [0xAA, 0xBB]
    assert gmem_vcpu.reads_zero_after_punch("x", [0, 0], old).status == "pass"
    stale = gmem_vcpu.reads_zero_after_punch("x", [0xAA, 0], old)  # KVM mapping not invalidated
    assert stale.failed and stale.evidence["stale_pages"] == 1
    assert gmem_vcpu.reads_zero_after_punch("x", [], old).failed  # nothing read: no evidence


def test_memory_moved_fails_when_a_punch_frees_nothing() -> None:
    assert gmem_vcpu.memory_moved("H2", "x", -32 * MiB, -32 * MiB, TOL).status == "pass"
    assert gmem_vcpu.memory_moved("H2", "x", -32 * MiB, 0, TOL).failed
    # A counter still moving is never judged: neither the right nor the wrong delta.
    for seen in (-32 * MiB, 0):
        unsettled = gmem_vcpu.memory_moved("H2", "x", -32 * MiB, seen, TOL, settled=False)
        assert unsettled.status == "incomplete"


def test_race_checks_fail_without_a_race_and_on_a_stale_read() -> None:
    assert gmem_vcpu.race_ran(10, 10).status == "pass"
    assert gmem_vcpu.race_ran(0, 10).failed  # the vCPU never ran
    assert gmem_vcpu.race_ran(10, 0).failed  # the host never punched
    assert gmem_vcpu.no_stale_reads([], 10).status == "pass"
    assert gmem_vcpu.no_stale_reads([0x10000000], 10).failed


def test_errno_checks_fail_on_an_accepted_bad_binding() -> None:
    assert gmem_vcpu.errno_is("H4", "memfd", errno.EINVAL, errno.EINVAL).status == "pass"
    assert gmem_vcpu.errno_is("H4", "memfd", errno.EINVAL, 0).failed  # a memfd accepted
    assert gmem_vcpu.errno_is("H4", "rebind", 0, errno.EINVAL).failed  # a valid one refused
    assert gmem_vcpu.every_errno_is("H4", "s", errno.EINVAL, {"1": 22, "2": 22}).status == "pass"
    assert gmem_vcpu.every_errno_is("H4", "s", errno.EINVAL, {"1": 22, "4095": 0}).failed
    assert gmem_vcpu.every_errno_is("H4", "s", errno.EINVAL, {}).failed  # nothing tried


def test_prefault_fails_when_nothing_is_mapped_or_the_range_is_left() -> None:
    assert gmem_vcpu.prefault_done(2 * MiB, 0, 512).status == "pass"
    assert gmem_vcpu.prefault_done(2 * MiB, 0, 0).failed  # returned 0, mapped nothing
    assert gmem_vcpu.prefault_done(2 * MiB, 4096, 511).failed  # stopped early


def test_pages_on_node_fails_when_the_policy_is_ignored() -> None:
    assert gmem_vcpu.pages_on_node(1, [1, 1, 1]).status == "pass"
    assert gmem_vcpu.pages_on_node(1, [1, 0, 1]).failed
    assert gmem_vcpu.pages_on_node(1, []).failed


def test_no_secret_visible_fails_on_a_leak_through_any_view() -> None:
    secret = b"s3cr3t"
    assert (
        gmem_vcpu.no_secret_visible("x", secret, {"map": b"\0" * 8, "pin": None}).status == "pass"
    )
    leak = gmem_vcpu.no_secret_visible("after conversion through the pin", secret,
                                       {"pin": b"xx" + secret})  # fmt: skip
    assert leak.failed and leak.invariant == "H7"


def test_memory_fault_exit_fails_on_a_silent_mapping_or_a_wrong_gpa() -> None:
    detail = {"gpa": 0x1000, "size": 4096, "flags": 8}
    assert gmem_vcpu.memory_fault_exit("MEMORY_FAULT", detail, 0x1000, 4096, 8).status == "pass"
    assert gmem_vcpu.memory_fault_exit("HLT", {}, 0x1000, 4096, 8).failed  # served silently
    assert gmem_vcpu.memory_fault_exit("MEMORY_FAULT", {**detail, "gpa": 0}, 0x1000, 4096, 8).failed


def test_conversion_counts_and_backed_once_fail_on_their_bugs() -> None:
    assert gmem_vcpu.conversion_counts("x", 10, 10, 10).status == "pass"
    assert gmem_vcpu.conversion_counts("x", 10, 9, 9).failed  # one conversion swallowed
    assert gmem_vcpu.conversion_counts("x", 10, 10, 9).failed  # the guest did not see one
    assert gmem_vcpu.backed_once([]).status == "pass"
    assert gmem_vcpu.backed_once([3]).failed


def test_access_matrix_fails_when_a_path_reads_private_memory() -> None:
    assert gmem_host.access_as_expected("MMAP", "vmsplice", False, "EFAULT").status == "pass"
    assert gmem_host.access_as_expected("MMAP", "cpu read", False, "SIGBUS").status == "pass"
    assert gmem_host.access_as_expected("MMAP", "/proc/pid/mem", False, "ok").failed
    assert gmem_host.access_as_expected("SHARED", "vmsplice", True, "EFAULT").failed
    missing = gmem_host.access_as_expected("MMAP", "io_uring", False, "unavailable: disabled")
    assert missing.status == "not-applicable"  # never a pass on no evidence


def test_pin_checks_fail_on_use_after_free_and_leaks() -> None:
    old = b"old!"
    ok = gmem_host.pin_survives_punch(old, old + b"..", b"\0\0\0\0")
    assert not any(v.failed for v in ok)
    reused = gmem_host.pin_survives_punch(old, b"new!", b"\0\0\0\0")  # pinned page freed, reused
    assert reused[1].failed
    stale_map = gmem_host.pin_survives_punch(old, old, old)  # mapping still shows old data
    assert stale_map[0].failed
    healthy = gmem_host.released_only_when_pin_drops(16 * MiB, 0, 16 * MiB, TOL)
    assert not any(v.failed for v in healthy)
    assert gmem_host.released_only_when_pin_drops(16 * MiB, 16 * MiB, 0, TOL)[0].failed
    assert gmem_host.released_only_when_pin_drops(16 * MiB, 0, 0, TOL)[1].failed  # leaked
    # Readings that did not settle: that step is incomplete, the other still judged.
    use_after_free = gmem_host.released_only_when_pin_drops(
        16 * MiB, 16 * MiB, 16 * MiB, TOL, settled=(False, True)
    )
    assert [v.status for v in use_after_free] == ["incomplete", "pass"]
    leak = gmem_host.released_only_when_pin_drops(16 * MiB, 0, 0, TOL, settled=(True, False))
    assert [v.status for v in leak] == ["pass", "incomplete"]


def test_accounting_checks_fail_on_evictable_or_uncharged_pages() -> None:
    assert gmem_host.charged_unevictable(64 * MiB, 64 * MiB, TOL).status == "pass"
    assert gmem_host.charged_unevictable(64 * MiB, 0, TOL).failed  # charged nowhere
    assert gmem_host.reclaim_freed_none(64 * MiB, 64 * MiB, TOL, 64 * MiB).status == "pass"
    assert gmem_host.reclaim_freed_none(64 * MiB, 0, TOL, 64 * MiB).failed  # reclaimed
    assert gmem_host.limit_refuses(16 * MiB, 32 * MiB, "ENOMEM", 0).status == "pass"
    assert gmem_host.limit_refuses(16 * MiB, 32 * MiB, "ok", 1).status == "pass"  # OOM kill
    assert gmem_host.limit_refuses(64 * MiB, 32 * MiB, "ok", 0).failed  # limit ignored
    assert gmem_host.kpageflags_unevictable([UNEVICTABLE, UNEVICTABLE]).status == "pass"
    assert gmem_host.kpageflags_unevictable([UNEVICTABLE, 1 << gmem_host.KPF_LRU]).failed
    assert gmem_host.kpageflags_unevictable([None]).failed
    # A few pages still in the CPU's LRU batch (no flag yet) are not reclaimable: fine.
    batched = [UNEVICTABLE] * 1007 + [0] * 17
    assert gmem_host.kpageflags_unevictable(batched, cpus=1).status == "pass"
    # More than the batches can hold: the pages never reached an LRU list.
    assert gmem_host.kpageflags_unevictable([0] * 64, cpus=2).failed
    assert gmem_host.pfns_kept([1, 2], [1, 2]).status == "pass"
    assert gmem_host.pfns_kept([1, 2], [1, 3]).failed  # migrated
    assert gmem_host.pfns_kept([1, 2], [1, None]).failed  # lost
