"""H2 on host memory: a discard frees what it must, per backend (balloon, virtio-mem, punch).

Observations come from orchestrator.memory (BackingSample: st_blocks, mapping Rss and
Anonymous; the per-backend DiscardExpectation table with its QEMU sources; settled
host-wide counters); these functions judge them. Verdicts speak KiB.

A reading taken while its counter was still moving (`BackingSample.settled` False,
`Settled.ok` False) cannot be judged: the verdict is incomplete (the test WARNs), with
the readings as evidence, never a pass and never a guessed fail.
"""

from __future__ import annotations

from orchestrator.host.settle import Settled
from orchestrator.invariants.verdict import Tolerance, Verdict, incomplete, within
from orchestrator.memory.backing import BackingSample
from orchestrator.memory.expectations import DiscardExpectation, host_move
from orchestrator.units import MiB, kib

#: H2 tolerance on host drops: 10% (tp-qemu's balloon_check) or 4 MiB, whichever is larger.
#: Both in KiB, the unit of every memory verdict here.
DROP_TOLERANCE = Tolerance(absolute=4 * 1024, relative=0.10)
#: Host-wide counters also carry the rest of QEMU and of the host: 8 MiB more slack.
HOST_TOLERANCE = Tolerance(absolute=8 * 1024, relative=0.10)


def discard_verdict(
    summary: str, expected: int, discarded: int, failed: int, **evidence: object
) -> Verdict:
    """H2 from QEMU's own trace: the RAM discards that succeeded add up to exactly
    `expected` bytes (the trace counts what QEMU did, not what it was asked)."""
    return within(
        "H2",
        summary,
        expected=kib(expected),
        seen=kib(discarded),
        tolerance=Tolerance(),
        unit="KiB",
        failed_discards=failed,
        **evidence,
    )


def unsettled(*samples: BackingSample) -> list[BackingSample]:
    """The samples read while their backing was still moving (None: a single reading)."""
    return [s for s in samples if s.settled is False]


def settled_or_incomplete(verdict: Verdict, *samples: BackingSample) -> Verdict:
    """`verdict` when every sample it was judged on had settled; else the same check as
    incomplete, carrying its numbers (a moving backing can neither pass nor fail it)."""
    moving = unsettled(*samples)
    if not moving:
        return verdict
    return incomplete(
        verdict.invariant,
        f"{verdict.summary}: the backing was still moving when read, so it cannot be judged",
        expected=verdict.expected,
        seen=verdict.seen,
        unsettled=[s.to_json() for s in moving],
    )


def drop_verdicts(
    invariant: str,
    what: str,
    expect: DiscardExpectation,
    amount: int,
    before: BackingSample,
    after: BackingSample,
    tolerance: Tolerance = DROP_TOLERANCE,
) -> list[Verdict]:
    """H2 verdicts for a discard of `amount` bytes between two samples of one backend.

    One for what the host holds in total (`held`), one per part that can be read on
    its own (the fd's st_blocks; the private copies; QEMU's mapping's Rss), each
    with expected and seen in KiB; each incomplete when a sample had not settled.
    """
    info = before.info
    context = {
        "unit": "KiB",
        "backend": info.label,
        "mechanism": expect.mechanism,
        "source": expect.source,
        "note": expect.note,
        "before": before.to_json(),
        "after": after.to_json(),
    }
    size = f"{amount // MiB} MiB"
    summary = (
        f"{what} of {size}: the host's hold on {info.memdev} ({info.label}) fell by "
        f"{expect.held:g} x {size}"
        if expect.frees
        else f"{what} of {size}: by design the host keeps {info.memdev} ({info.label})"
    )
    verdicts = [
        within(invariant, summary, kib(expect.held * amount), kib(before.held - after.held),
               tolerance, **context)
    ]  # fmt: skip
    if before.file_allocated is not None and after.file_allocated is not None:
        verdicts.append(
            within(invariant, f"{what}: st_blocks of the backing fd fell by "
                   f"{expect.file or 0:g} x {size}", kib((expect.file or 0) * amount),
                   kib(before.file_allocated - after.file_allocated), tolerance, unit="KiB")
        )  # fmt: skip
        if not info.share and not info.hugetlb:
            verdicts.append(
                within(invariant, f"{what}: the private copies (Anonymous) fell by "
                       f"{expect.anonymous:g} x {size}", kib(expect.anonymous * amount),
                       kib(before.mapping_anonymous - after.mapping_anonymous), tolerance,
                       unit="KiB")
            )  # fmt: skip
        elif not info.hugetlb:
            verdicts.append(
                within(invariant, f"{what}: QEMU's mapping no longer maps the pages (Rss fell "
                       f"by {expect.held:g} x {size})", kib(expect.held * amount),
                       kib(before.mapping_rss - after.mapping_rss), tolerance, unit="KiB")
            )  # fmt: skip
    return [settled_or_incomplete(v, before, after) for v in verdicts]


# Host-wide counters other work on the host moves by tens or hundreds of MiB at any time
# (a Python test runner's heap, a developer's own VM booting on a memfd): they corroborate,
# they cannot judge; QEMU's own backing (fd st_blocks, mapping Rss) is the judge. Huge
# pages are reserved and handed out only to those who ask, so HugePages_Free is judged.
SHARED_HOST_COUNTERS = frozenset({"AnonPages", "Shmem", "Cached"})


def host_verdict(
    invariant: str,
    what: str,
    counter: str,
    expected: int,
    host_before: Settled,
    host_after: Settled,
    tolerance: Tolerance = HOST_TOLERANCE,
) -> Verdict:
    """H2 on a host-wide counter: judged only when both readings settled.

    A counter that kept moving (another guest booting on the host) cannot be judged:
    the verdict is then incomplete (the test WARNs), with the samples, never a guess.
    """
    seen = kib(host_move(counter, host_before.value, host_after.value))
    if counter in SHARED_HOST_COUNTERS:
        return Verdict(
            invariant,
            "not-applicable",
            f"{what}: host-wide {counter} moves with every process on the host, so it is"
            " recorded, not judged (QEMU's own backing above is the judge)",
            expected=kib(expected),
            seen=seen,
            evidence={"unit": "KiB", "before": host_before.value, "after": host_after.value},
        )
    if not (host_before.ok and host_after.ok):
        return Verdict(
            invariant,
            "incomplete",
            f"{what}: host-wide {counter} did not settle (other work on the host moved it), "
            "so it cannot be judged",
            evidence={"before": list(host_before.samples), "after": list(host_after.samples)},
        )
    return within(
        invariant,
        f"{what}: host-wide {counter} moved by what QEMU's backing gave back",
        kib(expected),
        seen,
        tolerance,
        unit="KiB",
        counter=counter,
        before=host_before.value,
        after=host_after.value,
    )


def counter_move_verdict(
    invariant: str,
    summary: str,
    expected: int,
    seen: int,
    tolerance: Tolerance,
    settled: bool,
    **evidence: object,
) -> Verdict:
    """A host counter moved by `expected` around one step, within `tolerance`; judged only
    when its reading after the step settled, else incomplete with the numbers."""
    if not settled:
        return incomplete(
            invariant,
            f"{summary}: the counter was still moving after the step, so it cannot be judged",
            expected=expected,
            seen=seen,
            **evidence,
        )
    return within(invariant, summary, expected, seen, tolerance, **evidence)
