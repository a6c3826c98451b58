"""Checks for host access to guest_memfd and its accounting (H1, H2, H6): pure functions.

Each check names the bug it catches; `tests/test_invariants_gmem_vcpu.py` feeds
it that bug's observation and sees it fail. IDs are DESIGN.md section 4.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.invariants.verdict import (
    Tolerance,
    Verdict,
    holds,
    incomplete,
    not_applicable,
    within,
)

# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
KPF_LRU = 5
KPF_UNEVICTABLE = 18
KPF_NOPAGE = 20


def access_as_expected(flags: str, path: str, expect_accessible: bool, result: str) -> Verdict:
    """H1: one host access path on a guest_memfd mapping ends as its flags promise.

    Private memory (MMAP without INIT_SHARED, or a private page) must refuse
    every path (SIGBUS or an errno); shared memory must let it through.
    `result` is "ok", "SIGBUS", an errno name, or "unavailable: why" (then the
    verdict is not-applicable: never a PASS on no evidence).
    Bug caught: a path that bypasses the fault handler's SIGBUS (GUP through
    /proc/pid/mem, a pin) and reads private memory.
    """
    if result.startswith("unavailable"):
        return not_applicable("H1", f"{flags}: {path} could not be tried ({result})")
    accessible = result == "ok"
    want = "accessible" if expect_accessible else "refused (SIGBUS or an errno)"
    return Verdict(
        "H1",
        "pass" if accessible == expect_accessible else "fail",
        f"{flags}: {path} is {want}",
        expected=want,
        seen=result,
    )


def pin_survives_punch(old: bytes, through_pin: bytes, through_mapping: bytes) -> list[Verdict]:
    """H2/H3: a punch while a pin is held: the mapping reads zero, the pin still the old bytes.

    Bug caught: a punch that frees a page someone still references (the pin
    then reads another user's data), or a mapping still showing old data.
    """
    return [
        holds("H3", "after the punch the mapping reads zero", through_mapping.count(0) == len(
            through_mapping) and len(through_mapping) > 0, first=through_mapping[:16].hex()),
        holds("H2", "the pin still holds the old bytes (the page was not reused)",
              through_pin[: len(old)] == old and len(old) > 0,
              expected=old[:16].hex(), seen=through_pin[:16].hex()),
    ]  # fmt: skip


def released_only_when_pin_drops(
    size: int,
    freed_at_punch: int,
    freed_at_unpin: int,
    tolerance: Tolerance,
    settled: tuple[bool, bool] = (True, True),
) -> list[Verdict]:
    """H2: pinned pages stay allocated through a punch and are freed when the pin drops.

    `freed_*` are byte deltas of a host counter that falls when the pages are
    freed; `settled` says whether the readings behind each delta settled (a delta
    of a counter still moving is incomplete, never judged). Bug caught: a punch
    freeing pinned pages (use after free), or pages never freed after the pin drops
    (a leak).
    """
    steps = (
        ("the punch frees nothing while the pin is held", 0, freed_at_punch),
        ("dropping the pin frees the punched pages", size, freed_at_unpin),
    )
    return [
        within("H2", what, expected, seen, tolerance, unit="bytes") if ok
        else incomplete("H2", f"{what}: the counter was still moving, so it cannot be "
                        "judged", expected=expected, seen=seen)
        for (what, expected, seen), ok in zip(steps, settled, strict=True)
    ]  # fmt: skip


def charged_unevictable(allocated: int, unevictable_delta: int, tolerance: Tolerance) -> Verdict:
    """H6: guest_memfd pages are charged to the allocating memcg as unevictable.

    Bug caught: pages charged nowhere (a tenant escaping its limit) or on an
    evictable LRU (reclaim could then take guest memory).
    """
    return within("H6", "memory.stat unevictable grows by the allocation", allocated,
                  unevictable_delta, tolerance, unit="bytes")  # fmt: skip


def reclaim_freed_none(before: int, after: int, tolerance: Tolerance, asked: int) -> Verdict:
    """H6: `memory.reclaim` of the whole cgroup takes none of the guest_memfd pages.

    Bug caught: private pages on an evictable list, reclaimed under the guest.
    """
    return within("H6", f"memory.reclaim of {asked} bytes leaves the pages charged", before,
                  after, tolerance, unit="bytes", asked=asked)  # fmt: skip


def limit_refuses(allocated: int, limit: int, fallocate_result: str, oom_kills: int) -> Verdict:
    """H6: with memory.max below the allocation, fallocate does not get past the limit.

    The kernel either fails the fallocate (ENOMEM) or kills the allocating
    task (memcg OOM); both keep the charge within the limit.
    Bug caught: guest_memfd allocations not charged, so the limit is ignored.
    """
    ok = allocated <= limit and (fallocate_result != "ok" or oom_kills > 0)
    return holds(
        "H6",
        f"an allocation above memory.max={limit} is refused or OOM-killed",
        ok,
        allocated=allocated,
        limit=limit,
        fallocate=fallocate_result,
        oom_kills=oom_kills,
    )


#: Folios a CPU collects before they join an LRU list (FOLIO_BATCH_SIZE in
#: include/linux/folio_batch.h, 7.3): until then a page has neither LRU nor UNEVICTABLE.
LRU_BATCH_PAGES = 31


def kpageflags_unevictable(flags: Sequence[int | None], cpus: int = 1) -> Verdict:
    """H6: /proc/kpageflags has UNEVICTABLE on every PFN of the guest_memfd pages, except
    the few still in a CPU's LRU batch (on no LRU list yet, so not reclaimable either).

    Bug caught: pages on an evictable LRU list (LRU without UNEVICTABLE), pages not
    present, or more pages off every LRU than the CPUs' batches can hold. `None` is a
    page not present. The sw-protected lab saw 17 of 1024 pages still batched.
    """
    evictable = [i for i, value in enumerate(flags)
                 if value is not None and value & (1 << KPF_LRU)
                 and not value & (1 << KPF_UNEVICTABLE)]  # fmt: skip
    absent = [i for i, value in enumerate(flags) if value is None]
    on_a_list = (1 << KPF_LRU) | (1 << KPF_UNEVICTABLE)
    batched = [i for i, value in enumerate(flags) if value is not None and not value & on_a_list]
    limit = LRU_BATCH_PAGES * max(1, cpus)
    return holds(
        "H6",
        f"all {len(flags)} PFNs are UNEVICTABLE in /proc/kpageflags "
        f"(or still in a CPU's LRU batch, at most {limit})",
        bool(flags) and not evictable and not absent and len(batched) <= limit,
        pages=len(flags),
        on_evictable_lru=len(evictable),
        absent=len(absent),
        in_lru_batch=len(batched),
        first_evictable=evictable[:8],
        first_absent=absent[:8],
    )


def pfns_kept(before: Sequence[int | None], after: Sequence[int | None]) -> Verdict:
    """H6: compaction neither moves nor drops a guest_memfd page (same PFN, still present).

    Bug caught: `migrate_folio` moving pages KVM has mapped (the guest then
    writes a page the host reuses), or pages lost.
    """
    moved = [index for index, (a, b) in enumerate(zip(before, after, strict=False)) if a != b]
    absent = sum(1 for value in (*before, *after) if value is None)
    return holds(
        "H6",
        f"none of {len(before)} pages moved or vanished during compaction",
        bool(before) and len(before) == len(after) and not moved and not absent,
        moved=len(moved),
        absent=absent,
        first_moved=moved[:8],
    )
