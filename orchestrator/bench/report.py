"""Avocado job dirs shaped like real ones, for `cvmlab bench report` and the report's tests.

`write_synthetic_job` lays out what `avocado run` (113) and cvmlab's scenarios leave
behind: results.json, job.log, id, and per test `test-results/<n>-<name>/` with
debug.log and data/{probe.json, verdicts.json, timeline.jsonl}. The sizes are those
of real results, not toy ones: a balloon test measured here (scenarios/balloon.py,
memfd, TCG) wrote 222 timeline lines and 17 verdicts; a test that follows the host's
counters and QEMU's trace for a minute writes thousands of lines. So by default each
test has REAL_SAMPLES host samples (with punch, conversion, balloon, serial and trace
records among them: about 1,200 lines) and REAL_VERDICTS verdicts (H2 per backing
part, G2, G3, H8, H9, an S self-check). `bench_report` times `cvmlab report` over
1,000 such results, wall-clock against its 2 s budget (CPU time beside it); the job
is written before the clock starts.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.bench.core import Budget

REPORT_TARGET_S = 2.0
BENCH_RESULTS = 1000
#: Host samples per test: with the other records, about 1,200 timeline lines.
REAL_SAMPLES = 1000
#: Verdicts per test, as a balloon or conversion test records them.
REAL_VERDICTS = 17
VARIANTS = (
    "anon",
    "memfd-shared",
    "memfd-private",
    "file",
    "gmem",
    "gmem-mmap",
    "balloon",
    "virtio-mem",
    "hugepages",
    "numa",
)


def _timeline(rng: random.Random, start: float, samples: int, verdict: str) -> list[str]:
    records: list[dict[str, object]] = []
    # As the real writers record them: counters in whole KiB (orchestrator.memory.backing
    # divides bytes by 1024), times on the monotonic clock to the microsecond
    # (orchestrator.timeline rounds to 6 decimals), with a sampler's jitter.
    shmem, unevictable, cached = 524288, 0, 1048576
    punch_at, convert_at = samples // 3, samples // 2
    for i in range(samples):
        t = round(start + i * 0.5 + rng.random() * 0.01, 6)
        if i == punch_at:
            records.append(
                {
                    "t": round(t - 0.1, 6),
                    "source": "op",
                    "kind": "punch",
                    "offset": 0,
                    "length": 64 << 20,
                }
            )
            shmem -= 65536
        if i == convert_at:
            records.append(
                {
                    "t": round(t - 0.1, 6),
                    "source": "op",
                    "kind": "convert",
                    "to": "private",
                    "gpa": 1 << 30,
                    "length": 2 << 20,
                }
            )
            unevictable += 2048
        if i == samples - 5:
            records.append(
                {
                    "t": round(t - 0.2, 6),
                    "source": "qmp",
                    "kind": "event",
                    "event": "BALLOON_CHANGE",
                    "data": {"actual": 256 << 20},
                }
            )
        if i % 6 == 0:
            records.append(
                {
                    "t": round(t + 0.01, 6),
                    "source": "serial",
                    "kind": "line",
                    "text": f"[ {i:5d}.000] guest line",
                }
            )
        records.append(
            {
                "t": t,
                "source": "host",
                "kind": "sample",
                "counters": {
                    "Shmem": shmem + rng.randint(-64, 64),
                    "Unevictable": unevictable,
                    "Cached": cached + shmem + rng.randint(-128, 128),
                },
            }
        )
    records.append(
        {"t": start + samples * 0.5, "source": "verdict", "kind": verdict, "invariant": "H2"}
    )
    return [json.dumps(r, separators=(",", ":")) for r in records]


def _verdicts(count: int, first_h2: str) -> list[dict[str, object]]:
    """`count` verdicts shaped like a balloon test's: H2 per backing part, then G2, an S
    self-check, G3, H9 and H8 at the end (the finish phase's order)."""
    tail = [("G2", "guest data intact"), ("S1", "cvmlab refused a bad size"),
            ("G3", "guest kernel log is clean"), ("H9", "teardown returned everything"),
            ("H8", "host kernel log is clean through the end of the test")]  # fmt: skip
    out: list[dict[str, object]] = []
    for i in range(max(0, count - len(tail))):
        out.append(
            {"invariant": "H2", "status": first_h2 if i == 0 else "pass",
             "summary": f"balloon inflation of 128 MiB: part {i} fell by 1 x 128 MiB",
             "expected": 131072, "seen": 0 if first_h2 == "fail" and i == 0 else 131072,
             "tolerance": "±4096 or ±10%",
             "evidence": {"unit": "KiB", "backend": "memfd", "before": {"held": 536870912},
                          "after": {"held": 402653184}}}
        )  # fmt: skip
    for invariant, summary in tail[-count:] if count else []:
        out.append({"invariant": invariant, "status": "pass", "summary": summary,
                    "expected": None, "seen": None, "tolerance": None,
                    "evidence": {"problems": []}})  # fmt: skip
    return out


def write_synthetic_job(
    root: Path,
    results: int = BENCH_RESULTS,
    *,
    seed: int = 1,
    host: str = "lab-tcg-1",
    available: Sequence[str] = ("tcg", "gmem"),
    samples: int = REAL_SAMPLES,
    verdicts_per_test: int = REAL_VERDICTS,
    status_of: Callable[[int, str, str], str] | None = None,
) -> Path:
    """A complete job dir under `root` with `results` tests (rows x VARIANTS); returns its path.

    `status_of(index, row, variant)` picks each status (default: mostly PASS,
    some FAIL, CANCEL and ERROR, seeded).
    """
    rng = random.Random(seed)
    job_id = f"{rng.getrandbits(160):040x}"
    job = root / f"job-2026-01-0{seed % 9 + 1}T00.00-{job_id[:7]}"
    (job / "test-results").mkdir(parents=True)
    (job / "id").write_text(job_id + "\n")
    probe = {
        "host": {"hostname": host},
        "tiers": {
            name: {
                "available": name in available,
                "reason": "" if name in available else f"{name}: not on this host",
                "evidence": {},
            }
            for name in ("tcg", "kvm", "gmem", "sw-protected", "snp", "tdx")
        },
    }
    probe_text = json.dumps(probe)
    tests = []
    log = []
    clock = 93_600.0  # monotonic seconds of a host up for a day, as real timelines have them
    for n in range(1, results + 1):
        variant = VARIANTS[(n - 1) % len(VARIANTS)]
        scenario = f"scenario{(n - 1) // len(VARIANTS):03d}"
        method = f"Scenario.test_{scenario}_memory"
        name = f"scenarios/{scenario}.py:{method};run-machine-{variant}-{n % 9973:04x}"
        row = f"{scenario}:{variant}"
        if status_of is not None:
            status = status_of(n, row, variant)
        else:
            roll = rng.random()
            status = (
                "FAIL"
                if roll < 0.04
                else "ERROR"
                if roll < 0.05
                else "CANCEL"
                if roll < 0.15
                else "PASS"
            )
        reason = {
            "FAIL": "H2 FAIL: Shmem fell by the punched amount (expected 65536, seen 0)",
            "ERROR": "GuestError: ssh: guest did not answer in 60 s",
            "CANCEL": "tier tdx missing: kvm_intel is not loaded",
        }.get(status, "<unknown>")
        tier = "tdx" if status == "CANCEL" else "tcg"
        # avocado's dir name: the id with ':', ';' and '/' turned into '_'.
        dirname = f"{n}-{name}".replace(":", "_").replace(";", "_").replace("/", "_")
        logdir = job / "test-results" / dirname
        data = logdir / "data"
        data.mkdir(parents=True)
        (logdir / "debug.log").write_text(f"[stdlog] INIT 1-{name}\n[stdlog] {status} 1-{name}\n")
        (data / "probe.json").write_text(probe_text)
        verdict_status = "fail" if status == "FAIL" else "pass"
        (data / "verdicts.json").write_text(
            json.dumps(_verdicts(verdicts_per_test, verdict_status))
        )
        lines = _timeline(rng, clock, samples, verdict_status)
        (data / "timeline.jsonl").write_text("\n".join(lines) + "\n")
        elapsed = samples * 0.5
        tests.append(
            {
                "id": f"{n}-{name}",
                "name": name,
                "status": status,
                "fail_reason": reason,
                "tags": {"tier": [tier], "smoke": None},
                "logdir": f"/elsewhere/{logdir.name}",
                "logfile": f"/elsewhere/{logdir.name}/debug.log",
                "time_elapsed": elapsed,
                "time_start": clock,
                "time_end": clock + elapsed,
                "whiteboard": "",
            }
        )
        log.append(f"2026-01-01 00:00:00,000 avocado.job testlogs L0138 INFO | {name}: {status}")
        clock += elapsed
    counts = {
        s: sum(1 for t in tests if t["status"] == s)
        for s in ("PASS", "FAIL", "ERROR", "CANCEL", "SKIP", "WARN", "INTERRUPTED")
    }
    (job / "job.log").write_text("\n".join(log) + "\n")
    (job / "results.json").write_text(
        json.dumps(
            {
                "job_id": job_id,
                "start": "2026-01-01 00:00:00.000000",
                "tests": tests,
                "total": len(tests),
                "pass": counts["PASS"],
                "failures": counts["FAIL"],
                "errors": counts["ERROR"],
                "cancel": counts["CANCEL"],
                "skip": counts["SKIP"],
                "warn": counts["WARN"],
                "interrupt": counts["INTERRUPTED"],
                "debuglog": str(job / "job.log"),
                "time": clock - 93_600.0,
            }
        )
    )
    return job


@dataclass(frozen=True)
class ReportTiming:
    wall_s: float
    cpu_s: float  # this process's CPU time: what other tenants of a shared machine cannot inflate
    summary: str


def time_report(results: int = BENCH_RESULTS) -> ReportTiming:
    """Time `cvmlab report` (HTML, pages, report.json, Markdown) over a synthetic job."""
    from orchestrator.report.cli import make_report

    with tempfile.TemporaryDirectory(prefix="cvmlab-bench-report-") as tmp:
        root = Path(tmp)
        job = write_synthetic_job(root, results)
        wall, cpu = time.monotonic(), time.process_time()
        report = make_report([job], root / "report")
        return ReportTiming(time.monotonic() - wall, time.process_time() - cpu, report.summary())


def bench_report(runs: int, binary: str, progress: Callable[[str], None]) -> Budget:
    """`cvmlab report` over 1,000 results shaped like real ones, wall-clock against 2 s."""
    del binary  # no guest involved
    timings = []
    for i in range(1, runs + 1):
        timing = time_report(BENCH_RESULTS)
        progress(
            f"bench report: run {i}/{runs}: {timing.summary} in {timing.wall_s:.2f} s wall "
            f"(CPU {timing.cpu_s:.2f} s)"
        )
        timings.append(timing)
    return Budget(
        "report",
        f"cvmlab report over {BENCH_RESULTS} results shaped like real ones",
        REPORT_TARGET_S,
        [t.wall_s for t in timings],
        [t.cpu_s for t in timings],
    )
