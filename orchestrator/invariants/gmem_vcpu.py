"""Checks for guest_memfd under a running vCPU: pure functions from observations to verdicts.

Each check names the bug it catches in its docstring; `tests/test_invariants_gmem_vcpu.py`
feeds every one the observation of that bug and sees it fail. IDs are DESIGN.md section 4.
Where a kernel behaviour decides the expectation, the docstring cites the source.
"""

from __future__ import annotations

import errno as errno_module
import os
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.invariants.verdict import Tolerance, Verdict, holds, incomplete, within

PAGE = 4096


def _name(err: int) -> str:
    if err == 0:
        return "success"
    if err == errno_module.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errno_module.errorcode.get(err, f"errno {err}")


def values_match(
    invariant: str, what: str, expected: Sequence[int], seen: Sequence[int]
) -> Verdict:
    """G2/H3: per page, the value one side wrote is the value the other side read.

    Bug caught: the guest and the host look at different pages for one GPA (a
    stale KVM mapping, a slot on the wrong backing), or a write got lost.
    """
    wrong = [
        {"page": page, "expected": hex(want), "seen": hex(got)}
        for page, (want, got) in enumerate(zip(expected, seen, strict=False))
        if want != got
    ]
    complete = len(expected) == len(seen)
    return holds(
        invariant,
        f"{what}: {len(seen)} of {len(expected)} pages as written",
        complete and not wrong,
        pages=len(expected),
        mismatches=len(wrong),
        first_mismatches=wrong[:8],
        missing=max(0, len(expected) - len(seen)),
    )


def reads_zero_after_punch(what: str, seen: Sequence[int], old: Sequence[int]) -> Verdict:
    """H3: after a punch every page reads zero, none its old value.

    Bug caught: a punch that does not invalidate KVM's mapping of the page
    (`kvm_gmem_punch_hole` -> `kvm_gmem_invalidate_begin` ->
    `kvm_mmu_unmap_gfn_range`, virt/kvm/guest_memfd.c): the guest keeps
    reading the freed page's old data.
    """
    stale = [page for page, (value, before) in enumerate(zip(seen, old, strict=False))
             if value == before and before != 0]  # fmt: skip
    nonzero = [page for page, value in enumerate(seen) if value != 0]
    return holds(
        "H3",
        f"{what}: every punched page reads zero",
        not nonzero and len(seen) > 0,
        pages=len(seen),
        nonzero_pages=len(nonzero),
        stale_pages=len(stale),
        first_stale=stale[:8],
        first_nonzero=nonzero[:8],
    )


def memory_moved(
    invariant: str,
    what: str,
    expected: int,
    seen: int,
    tolerance: Tolerance,
    settled: bool = True,
    **evidence: Any,
) -> Verdict:
    """H2/H6: a counter moved by `expected` bytes (negative: fell); `seen` is its delta.

    Judged only when both readings settled (`settled`), else incomplete: a counter
    still moving could pass or fail by chance. Bug caught: a punch that frees
    nothing (pages leaked with the mapping), or an allocation not charged where it
    should be.
    """
    if not settled:
        return incomplete(invariant, f"{what}: the counter was still moving, so it cannot "
                          "be judged", expected=expected, seen=seen, **evidence)  # fmt: skip
    return within(invariant, what, expected, seen, tolerance, unit="bytes", **evidence)


def race_ran(scans: int, punches: int, minimum: int = 1) -> Verdict:
    """H5: both sides of the punch-vs-populate race really ran, so its verdicts mean something.

    Bug caught: a race test whose vCPU never got scheduled (or whose puncher
    never punched) would otherwise PASS on no evidence.
    """
    return holds(
        "H5",
        f"the vCPU completed {scans} scans while the host punched {punches} times",
        scans >= minimum and punches >= minimum,
        scans=scans,
        punches=punches,
        minimum=minimum,
    )


def no_stale_reads(stale_gpas: Sequence[int], scans: int) -> Verdict:
    """H3/H5: the guest never read a value the host had punched away.

    Bug caught: punch and populate racing in KVM's fault path leave a stale
    PFN in the page tables (the mmu_invalidate_seq retry not taken).
    """
    return holds(
        "H3",
        f"no stale read in {scans} guest scans racing host punches",
        not stale_gpas,
        stale_reads=len(stale_gpas),
        first_stale_gpas=[hex(gpa) for gpa in stale_gpas[:8]],
        scans=scans,
    )


def errno_is(invariant: str, what: str, expected: int, seen: int, message: str = "") -> Verdict:
    """H4: a call failed with the errno the kernel documents (0 expected = accepted).

    Bug caught: a binding the kernel should refuse (a regular memfd, a VM fd)
    is accepted, or a valid request is refused.
    """
    ok = seen == expected
    return Verdict(
        invariant,
        "pass" if ok else "fail",
        f"{what}: {'accepted' if expected == 0 else 'refused with ' + _name(expected)}",
        expected=_name(expected),
        seen=_name(seen),
        evidence={"error": message, "kernel": os.uname().release},
    )


def every_errno_is(invariant: str, what: str, expected: int, seen: Mapping[str, int]) -> Verdict:
    """H4: each of many calls (e.g. every unaligned size) failed with `expected`.

    Bug caught: one size in the range slips through the alignment check.
    """
    wrong = {key: _name(err) for key, err in seen.items() if err != expected}
    outcome = "accepted" if expected == 0 else "refused with " + _name(expected)
    return Verdict(
        invariant,
        "pass" if seen and not wrong else "fail",
        f"{what}: all {len(seen)} {outcome}",
        expected=_name(expected),
        seen=dict(list(wrong.items())[:8]) or _name(expected),
        evidence={"tried": len(seen), "wrong": len(wrong)},
    )


def prefault_done(requested: int, remaining: int, pages_mapped: int) -> Verdict:
    """KVM_PRE_FAULT_MEMORY consumed the whole range and KVM mapped at least that many pages.

    Bug caught: the ioctl returns 0 but maps nothing (pages_4k/2m of the VM's
    binary stats do not move), or stops early without saying so.
    """
    return holds(
        "H3",
        f"KVM_PRE_FAULT_MEMORY mapped {pages_mapped} pages for {requested // PAGE} requested",
        remaining == 0 and pages_mapped * PAGE >= requested,
        requested=requested,
        remaining=remaining,
        pages_mapped=pages_mapped,
    )


def pages_on_node(node: int, page_nodes: Sequence[int]) -> Verdict:
    """NUMA: every page of a range mbind()-ed to `node` sits on `node` (move_pages status).

    Bug caught: guest_memfd ignoring the VMA's mempolicy
    (`kvm_gmem_get_policy`/`set_policy`, virt/kvm/guest_memfd.c, 6.18+).
    """
    elsewhere = {page: status for page, status in enumerate(page_nodes) if status != node}
    return holds(
        "H6",
        f"all {len(page_nodes)} pages are on node {node}",
        bool(page_nodes) and not elsewhere,
        node=node,
        elsewhere=len(elsewhere),
        first_elsewhere=dict(list(elsewhere.items())[:8]),
    )


def no_secret_visible(what: str, secret: bytes, observed: Mapping[str, bytes | None]) -> Verdict:
    """H1/H7: no host view (mapping, pin, syscall buffer) holds the guest's private secret.

    Bug caught: a private write landing in the shared backing, or a pin taken
    while shared keeping access to the page after it turned private.
    """
    leaks = sorted(path for path, data in observed.items() if data is not None and secret in data)
    return holds(
        "H1" if "pin" not in what else "H7",
        f"{what}: the private secret is in none of {len(observed)} host views",
        not leaks,
        leaks=leaks,
        views=sorted(observed),
    )


def memory_fault_exit(
    exit_name: str, detail: Mapping[str, int], gpa: int, size: int, flags: int
) -> Verdict:
    """KVM_EXIT_MEMORY_FAULT names the faulting GPA, size and flags (api.rst, kvm_run.memory_fault).

    Bug caught: an access to private memory that cannot be served silently
    maps something else, or exits without saying where.
    """
    seen = {"exit": exit_name, "gpa": detail.get("gpa"), "size": detail.get("size"),
            "flags": detail.get("flags")}  # fmt: skip
    expected = {"exit": "MEMORY_FAULT", "gpa": gpa, "size": size, "flags": flags}
    return Verdict(
        "H1",
        "pass" if seen == expected else "fail",
        f"the access to GPA {gpa:#x} exits with KVM_EXIT_MEMORY_FAULT naming it",
        expected={k: hex(v) if isinstance(v, int) else v for k, v in expected.items()},
        seen={k: hex(v) if isinstance(v, int) else v for k, v in seen.items()},
    )


def conversion_counts(what: str, requested: int, done: int, verified: int) -> Verdict:
    """G2: every conversion the storm asked for happened and the guest verified each one.

    Bug caught: a conversion that fails quietly (an ioctl error swallowed) or
    whose contents the guest does not see.
    """
    return holds(
        "G2",
        f"{what}: {done} of {requested} conversions done, {verified} verified by the guest",
        requested > 0 and requested == done == verified,
        requested=requested,
        done=done,
        verified=verified,
    )


def backed_once(private_and_shared: Sequence[int]) -> Verdict:
    """H2: no GPA is backed twice (private and shared) after a conversion.

    `private_and_shared` lists the page indexes allocated in both backings.
    Bug caught: userspace (or the kernel) leaving the old half allocated.
    """
    return holds(
        "H2",
        "no page is allocated in both the shared and the private backing",
        not private_and_shared,
        doubly_backed=len(private_and_shared),
        first=list(private_and_shared[:8]),
    )
