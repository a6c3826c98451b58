"""H9, teardown returns everything: no QEMU or child left, run dir gone, no fd left,
host counters back to their baseline within a stated tolerance.

`TeardownObservation` is what the scenario saw after the guest was shut down
(gathered by `orchestrator.host.baseline.TeardownWatch.observe`); `teardown_verdict`
judges it. Counters are compared with the value settled before the guest was launched;
each carries its own tolerance (bytes), stated in the verdict. A counter whose
readings did not settle (`judgeable` False) is incomplete, never a pass.

`counter_return_verdict` is the same judgement for a host-level scenario's
`HostBaseline` (no QEMU): one meminfo counter back at its baseline after release.
"""

from __future__ import annotations

from orchestrator.host.baseline import CounterReturn, TeardownObservation
from orchestrator.invariants.verdict import Verdict, holds, incomplete


def teardown_problems(seen: TeardownObservation) -> list[str]:
    """Every leftover, one line each (empty: teardown returned everything)."""
    problems: list[str] = []
    if seen.qemu_alive:
        problems.append(f"QEMU pid {seen.qemu_pid} is still running")
    if seen.rundir_exists:
        problems.append(f"run dir {seen.rundir} is still there")
    problems.extend(seen.leftovers)
    problems.extend(c.describe() for c in seen.counters if c.judgeable and not c.ok)
    return problems


def teardown_verdict(seen: TeardownObservation) -> Verdict:
    """H9: fail naming each leftover."""
    problems = teardown_problems(seen)
    unsettled = [c.describe() for c in seen.counters if not c.judgeable]
    if not problems and unsettled:
        return incomplete(
            "H9",
            "teardown left no process, run dir or fd, but a host counter did not settle, so "
            "whether it came back cannot be judged",
            unsettled=unsettled,
            qemu_pid=seen.qemu_pid,
        )
    return holds(
        "H9",
        "teardown returned everything: no QEMU or child left, run dir gone, no fd left, "
        "host counters back to baseline",
        not problems,
        problems=problems,
        counters=[c.describe() for c in seen.counters],
        qemu_pid=seen.qemu_pid,
    )


def counter_return_verdict(counter: CounterReturn) -> Verdict:
    """H9: a meminfo counter came back to its baseline after the test released everything;
    incomplete when either reading never settled (`CounterReturn.judgeable`)."""
    summary = f"meminfo {counter.name} back to its baseline after release"
    evidence = {
        "unit": "bytes",
        "samples": list(counter.settled.samples[-20:]),
        "waited_s": round(counter.settled.elapsed, 3),
    }
    if not counter.judgeable:
        why = (
            "the baseline never settled"
            if not counter.baseline_settled
            else "it kept moving around its baseline"
        )
        return incomplete("H9", f"{summary}: {why}", baseline=counter.baseline, **evidence)
    return Verdict(
        "H9",
        "pass" if counter.ok else "fail",
        summary,
        expected=counter.baseline,
        seen=counter.settled.value,
        tolerance=f"±{counter.tolerance}",
        evidence=evidence,
    )
