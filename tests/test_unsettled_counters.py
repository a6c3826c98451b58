"""An unsettled counter gives an incomplete verdict, never a pass (issue 11's audit).

Each site that judges a host counter is fed an observation that never settled and must
answer "incomplete"; each is also fed the bug it names, settled, and must fail:

- memory backings (balloon, virtio-mem: `drop_verdicts`, `settled_or_incomplete`), and
  `BackingProbe.settle` marking the sample it returns;
- the balloon on a confidential guest (`private_half_kept`, coco_memory_ops.py's 8 MiB
  check: QEMU's balloon only knows the shared half, system/physmem.c
  `ram_block_discard_range`; only accel/kvm/kvm-all.c `kvm_convert_memory` punches
  guest_memfd through `ram_block_discard_guest_memfd_range`);
- H9 after teardown (`TeardownWatch` counters: a converge that gave up while its last
  samples average inside the tolerance flapped) and after a host-level test
  (`counter_return_verdict`, kvm_scenario.py and gmem_uapi.py);
- a counter's move around one uAPI step (`counter_move_verdict`, gmem_uapi.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from orchestrator.host.baseline import CounterBack, CounterReturn, TeardownObservation
from orchestrator.host.settle import Settled
from orchestrator.invariants.conversions import private_half_kept
from orchestrator.invariants.host_memory import (
    counter_move_verdict,
    drop_verdicts,
    settled_or_incomplete,
)
from orchestrator.invariants.teardown import counter_return_verdict, teardown_verdict
from orchestrator.invariants.verdict import Tolerance, holds, within
from orchestrator.memory.backing import BackendInfo, BackingProbe, BackingSample
from orchestrator.memory.expectations import expect_discard
from orchestrator.units import MiB

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def memfd() -> BackendInfo:
    return BackendInfo(
        memdev="ram0", kind="memfd", share=True, hugetlb=False, size=512 * MiB,
        page_size=4096, hva=0x7F0000000000, used=512 * MiB,
    )  # fmt: skip


def held(nbytes: int, settled: bool | None = True) -> BackingSample:
    """A shared memfd backing holding `nbytes` (st_blocks), settled or not."""
    return BackingSample(0.0, memfd(), nbytes, 0, 0, nbytes, settled=settled)


def observation(*counters: CounterBack) -> TeardownObservation:
    return TeardownObservation(None, False, None, False, (), counters)


# --- memory backings: balloon, virtio-mem ----------------------------------------------------


def test_drop_verdicts_on_a_backing_that_never_settled_are_incomplete_even_when_numbers_agree() -> (
    None
):
    expect = expect_discard(memfd(), "balloon")
    for before, after in (
        (held(450 * MiB, settled=False), held(322 * MiB)),
        (held(450 * MiB), held(322 * MiB, settled=False)),
    ):
        verdicts = drop_verdicts("H2", "inflate", expect, 128 * MiB, before, after)
        assert verdicts and all(v.status == "incomplete" for v in verdicts)
        assert all("still moving" in v.summary for v in verdicts)
        assert all(v.evidence["unsettled"] for v in verdicts)


def test_drop_verdicts_on_settled_samples_fail_the_discard_that_freed_nothing() -> None:
    expect = expect_discard(memfd(), "balloon")
    same = held(450 * MiB)
    verdicts = drop_verdicts("H2", "inflate", expect, 128 * MiB, same, same)
    assert verdicts and all(v.failed for v in verdicts)
    good = drop_verdicts("H2", "inflate", expect, 128 * MiB, same, held(322 * MiB))
    assert all(v.status == "pass" for v in good)


def test_a_single_reading_is_judged_and_an_unsettled_one_turns_a_verdict_incomplete() -> None:
    passing = within("H2", "nothing held", 0, 0, Tolerance(absolute=2048))
    failing = holds("H2", "cover what came back", False)
    assert settled_or_incomplete(passing, held(0, settled=None)) is passing
    assert settled_or_incomplete(failing, held(0)) is failing
    for verdict in (passing, failing):
        moved = settled_or_incomplete(verdict, held(0), held(5 * MiB, settled=False))
        assert moved.status == "incomplete" and moved.invariant == "H2"


def test_backing_probe_marks_the_sample_it_returns_with_whether_held_settled() -> None:
    """BackingProbe.settle's own wiring, with `held` readings fed instead of QEMU's smaps."""

    class Fed(BackingProbe):
        def __init__(self, readings: list[int]) -> None:  # no QEMU: readings are fed
            self.readings = iter(readings)
            self.last = 0

        def held(self) -> int:
            self.last = next(self.readings, self.last + MiB * 10)
            return self.last

        def sample(self, host: bool = False, record: bool = True) -> BackingSample:
            return held(self.last, settled=None)

    growing = Fed([])  # grows by 10 MiB per reading: never within 1 MiB
    settled, sample = growing.settle(MiB, window=3, interval=0.0, timeout=0.05)
    assert not settled.ok and sample.settled is False
    still = Fed([100 * MiB] * 5)
    settled, sample = still.settle(MiB, window=3, interval=0.0, timeout=5.0)
    assert settled.ok and sample.settled is True


# --- the balloon on a confidential guest (coco_memory_ops.py) --------------------------------


def test_balloon_keeping_private_memory_is_incomplete_when_unevictable_did_not_settle() -> None:
    kept = private_half_kept(128 * MiB, 900 * MiB, 900 * MiB, settled=False)
    assert kept.status == "incomplete" and "did not settle" in kept.summary


def test_balloon_that_punched_guest_memfd_fails_and_one_that_kept_it_passes() -> None:
    punched = private_half_kept(128 * MiB, 900 * MiB, 772 * MiB)
    assert punched.failed and punched.seen == 128 * 1024
    assert private_half_kept(128 * MiB, 900 * MiB, 897 * MiB).status == "pass"


# --- H9 after teardown (TeardownWatch) and after a host-level test (HostBaseline) ------------


def test_teardown_counter_that_flapped_inside_its_tolerance_is_incomplete_not_a_pass() -> None:
    # converge gave up (never two readings in a row within 8 MiB) but the last ones
    # average 4 MiB off: the old code judged the average and passed.
    flapping = CounterBack("Unevictable", 100 * MiB, 104 * MiB, 8 * MiB, returned=False)
    assert teardown_verdict(observation(flapping)).status == "incomplete"
    assert not flapping.judgeable and "not settled" in flapping.describe()


def test_teardown_counter_that_stayed_up_fails_whether_or_not_converge_gave_up() -> None:
    leak = CounterBack("Unevictable", 100 * MiB, 228 * MiB, 8 * MiB, returned=False)
    assert leak.judgeable and teardown_verdict(observation(leak)).failed
    back = CounterBack("Unevictable", 100 * MiB, 101 * MiB, 8 * MiB, returned=True)
    assert teardown_verdict(observation(back)).status == "pass"


def settled(value: int, ok: bool) -> Settled:
    return Settled(value, ok, (value,), 0.1)


@pytest.mark.parametrize(
    ("counter", "status"),
    [
        # the baseline never settled: whatever came after cannot be judged
        (CounterReturn("Unevictable", 100 * MiB, settled(100 * MiB, True), 4 * MiB, False),
         "incomplete"),
        # converge gave up, last samples average inside the tolerance: flapping
        (CounterReturn("Unevictable", 100 * MiB, settled(102 * MiB, False), 4 * MiB),
         "incomplete"),
        # the bug: 128 MiB still held after release
        (CounterReturn("Unevictable", 100 * MiB, settled(228 * MiB, False), 4 * MiB), "fail"),
        (CounterReturn("Unevictable", 100 * MiB, settled(101 * MiB, True), 4 * MiB), "pass"),
    ],
)  # fmt: skip
def test_counter_return_verdict_judges_only_settled_counters(
    counter: CounterReturn, status: str
) -> None:
    verdict = counter_return_verdict(counter)
    assert verdict.invariant == "H9" and verdict.status == status


# --- a counter's move around one step (gmem_uapi.py accounting) ------------------------------


def test_counter_move_is_incomplete_when_the_step_did_not_settle_even_if_numbers_agree() -> None:
    tol = Tolerance(absolute=4 * MiB, relative=0.10)
    moving = counter_move_verdict("H2", "allocate moves Unevictable", 128 * MiB, 128 * MiB,
                                  tol, settled=False)  # fmt: skip
    assert moving.status == "incomplete" and moving.evidence["seen"] == 128 * MiB
    # The bug it names, settled: the allocation did not show in Unevictable.
    assert counter_move_verdict("H2", "allocate", 128 * MiB, 0, tol, settled=True).failed
    assert counter_move_verdict("H2", "allocate", 128 * MiB, 126 * MiB, tol, True).status == "pass"


# --- scenarios do not hide the base class's steps ---------------------------------------------


def _methods_of_scenario_classes() -> list[tuple[str, str, str]]:
    """(file, class, method) of every method defined in a class of scenarios/*.py."""
    found = []
    for path in sorted(SCENARIOS.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        found.append((path.name, node.name, item.name))
    return found


def test_no_scenario_redefines_record_check_or_start_guest() -> None:
    """Scenario.check() calls self.record(verdict) and MachineScenario.setUp() calls
    self.start_guest(): a scenario method of that name with another meaning made every
    check an ERROR (conversion_driver.py, conversion.py) or setUp run inside itself
    (coco_memory_ops.py)."""
    reserved = {"record", "check", "start_guest"}
    hiding = [f"{f}:{c}.{m}" for f, c, m in _methods_of_scenario_classes() if m in reserved]
    assert not hiding, hiding
