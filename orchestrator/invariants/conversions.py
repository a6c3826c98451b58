"""Conversions judged: the guest's conversions against QEMU's, and no GPA backed twice (G2, H2).

Observations come from orchestrator.memory.conversions (QEMU's trace ledger, guest_memfd
fds, the shared half's holes: its `ledger`, `gmem` and `shared_half` modules) and
orchestrator.guest.convert (what the guest's driver did); the functions here judge them.

No double backing has two halves, each judged on its own evidence:
- to private, QEMU must discard the shared half: `conversion_verdicts` (trace bytes) and
  `shared_half_verdict` (SEEK_DATA on the shared backing per range);
- to shared, QEMU must punch the private half out of guest_memfd
  (`ram_block_discard_guest_memfd_range`, accel/kvm/kvm-all.c `kvm_convert_memory`),
  which has no trace event; guest_memfd folios count in /proc/meminfo Unevictable, so
  `private_half_released` asks Unevictable to FALL by the converted bytes (the guest
  wrote them while private, so they were backed). "Did not grow" cannot catch the
  bug: a QEMU that never frees the private half leaves Unevictable unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from orchestrator.invariants.verdict import Tolerance, Verdict, holds, incomplete, within
from orchestrator.memory.conversions.asked import GuestAsked
from orchestrator.memory.conversions.gmem import GmemSample
from orchestrator.memory.conversions.ledger import ConversionCounts
from orchestrator.memory.conversions.shared_half import HoleReport
from orchestrator.units import kib

#: What else may move Unevictable meanwhile (the guest's other activity, mlock noise).
UNEVICTABLE_SLACK = 1 << 20
#: "Nothing private freed": how far Unevictable may move for other reasons, bytes.
PRIVATE_KEPT_TOLERANCE = 8 << 20


def conversion_verdicts(
    asked: GuestAsked, seen: ConversionCounts, allowance: int = 0, invariant: str = "G2"
) -> list[Verdict]:
    """The guest's conversions against QEMU's trace over the same window.

    - Explicit conversions (hypercalls) per direction cover what the guest asked, and
      exceed it by at most `allowance` bytes (conversions of the rest of the guest
      kernel, e.g. a driver's dma_alloc_coherent, in the same window).
    - Each guest call reached QEMU as at least one hypercall (KVM splits TDX MapGPA in
      2 MiB pieces; SNP PSC in runs of 2M/4K entries).
    - QEMU converted every request: convert bytes = hypercall + fault bytes per direction.
    - Every conversion to private discarded the shared half (H2): discarded = to_private.
    - No discard failed (H2).
    """
    tolerance = Tolerance(absolute=kib(allowance) / 2)
    verdicts: list[Verdict] = []
    for way, want, got, calls, hypercalls in (
        ("shared", asked.to_shared, seen.hypercall_to_shared, asked.calls_to_shared,
         seen.hypercalls_to_shared),
        ("private", asked.to_private, seen.hypercall_to_private, asked.calls_to_private,
         seen.hypercalls_to_private),
    ):  # fmt: skip
        # Centre the window on want + allowance/2, so [want, want + allowance] passes.
        verdicts.append(
            within(
                invariant,
                f"QEMU saw the guest's conversions to {way}: KVM_HC_MAP_GPA_RANGE covered the "
                f"{kib(want)} KiB the driver converted (plus at most {kib(allowance)} KiB of "
                "the rest of the guest)",
                expected=kib(want + allowance / 2),
                seen=kib(got),
                tolerance=tolerance,
                unit="KiB",
                asked=kib(want),
                allowance=kib(allowance),
            )
        )
        verdicts.append(
            holds(
                invariant,
                f"each of the driver's {calls} calls to {way} reached QEMU as at least one "
                "hypercall",
                hypercalls >= calls,
                calls=calls,
                hypercalls=hypercalls,
            )
        )
    verdicts.append(
        holds(
            invariant,
            "QEMU converted every request: kvm_convert_memory bytes = hypercall + memory-fault "
            "bytes, per direction",
            seen.to_private == seen.hypercall_to_private + seen.fault_to_private
            and seen.to_shared == seen.hypercall_to_shared + seen.fault_to_shared,
            counts=seen.to_json(),
        )
    )
    verdicts.append(
        within(
            "H2",
            "every conversion to private discarded the shared half (ram_block_discard_* "
            "bytes = shared_to_private bytes)",
            expected=kib(seen.to_private),
            seen=kib(seen.shared_discarded),
            tolerance=Tolerance(),
            unit="KiB",
            discards=seen.shared_discards,
        )
    )
    verdicts.append(
        holds("H2", "no discard of the shared half failed", seen.failed_discards == 0,
              failed_discards=seen.failed_discards)
    )  # fmt: skip
    return verdicts


def gmem_covers_ram_verdict(sample: GmemSample, guest_ram: int) -> Verdict:
    """QEMU backs guest RAM with guest_memfd: its kvm-gmem fds add up to at least the RAM."""
    return holds(
        "G1",
        f"QEMU holds guest_memfd fds covering the guest's {guest_ram // 2**20} MiB of RAM "
        f"({len(sample.fds)} fds, {sample.total_size // 2**20} MiB)",
        bool(sample.fds) and sample.total_size >= guest_ram,
        fds=[dataclasses.asdict(f) for f in sample.fds],
    )


def _judge_unevictable(
    summary: str,
    before: int,
    after: int,
    settled: bool,
    judge: Callable[[dict[str, Any]], Verdict],
) -> Verdict:
    """`judge(evidence)` on two readings of host-wide Unevictable, only when both settled:
    a reading that did not settle cannot be judged (incomplete)."""
    evidence: dict[str, Any] = {"unit": "KiB", "unevictable_before": before,
                                "unevictable_after": after}  # fmt: skip
    if not settled:
        return incomplete("H2", summary + ": Unevictable did not settle", **evidence)
    return judge(evidence)


def private_half_released(
    converted: int,
    unevictable_before: int,
    unevictable_after: int,
    settled: bool = True,
    slack: int = UNEVICTABLE_SLACK,
) -> Verdict:
    """H2: after `converted` bytes went private->shared, guest_memfd gave them up.

    Host-wide Unevictable (bytes, both readings settled and taken under the host lock)
    must have fallen by at least `converted - slack`. Double backing (QEMU keeps the
    private half) leaves it where it was: FAIL. Unsettled readings: incomplete.
    """
    fell = unevictable_before - unevictable_after
    summary = (
        f"no GPA backed twice: guest_memfd gave up the {kib(converted)} KiB converted to "
        "shared (host-wide Unevictable fell by at least that, less "
        f"{kib(slack)} KiB)"
    )
    return _judge_unevictable(
        summary, unevictable_before, unevictable_after, settled,
        lambda evidence: Verdict(
            "H2",
            "pass" if fell >= converted - slack else "fail",
            summary,
            expected=f">= {kib(converted - slack)}",
            seen=kib(fell),
            tolerance=f"-{kib(slack)}",
            evidence=evidence,
        ),
    )  # fmt: skip


def private_half_kept(
    ballooned: int,
    unevictable_before: int,
    unevictable_after: int,
    settled: bool = True,
    tolerance: int = PRIVATE_KEPT_TOLERANCE,
) -> Verdict:
    """H2: a balloon on a confidential guest frees nothing private.

    QEMU's balloon discards with `ram_block_discard_range()`, which knows only the shared
    half; only a conversion punches guest_memfd (`ram_block_discard_guest_memfd_range()`,
    accel/kvm/kvm-all.c kvm_convert_memory). So host-wide Unevictable (guest_memfd's
    folios; bytes, both readings settled and taken under the host lock) stays within
    `tolerance` of where it was: a QEMU that punched the private half of the `ballooned`
    bytes makes it fall by them: FAIL. Unsettled readings: incomplete.
    """
    summary = (
        "nothing private was freed: guest_memfd keeps the ballooned pages (host-wide "
        f"Unevictable did not fall by the {kib(ballooned)} KiB ballooned)"
    )
    return _judge_unevictable(
        summary, unevictable_before, unevictable_after, settled,
        lambda evidence: within(
            "H2",
            summary,
            expected=0,
            seen=kib(unevictable_before - unevictable_after),
            tolerance=Tolerance(absolute=kib(tolerance)),
            **evidence,
        ),
    )  # fmt: skip


def shared_half_verdict(report: HoleReport) -> Verdict:
    """H2: every range whose last conversion went to private is a hole in the shared half.

    Nothing checked (no RAM range) is not a pass: incomplete."""
    summary = (
        "no GPA is backed twice: every range whose last conversion went to private "
        f"({kib(report.checked)} KiB of RAM) is a hole in the shared backing"
    )
    if report.checked == 0:
        return incomplete("H2", summary + ": no range of RAM was checked", **report.to_json())
    return holds("H2", summary, report.clean, **report.to_json())
