"""Real avocado job dirs for the report's tests: made by `avocado run` on tiny tests.

`run_tiny_job` runs four tests (pass, fail, cancel, error) over two variants;
they write probe.json, timeline.jsonl and verdicts.json through cvmlab's own
writers (Timeline, VerdictLog), as scenarios do. `run_killed_job` starts a
job, waits until its second test is running, and kills the runner's whole
process group: a real half-written job.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

AVOCADO = str(Path(sys.executable).with_name("avocado"))
DEADLINE_S = 120.0

PROBE = {
    "tiers": {
        "tcg": {"available": True, "reason": "QEMU 10.0.2 with TCG", "evidence": {}},
        "gmem": {"available": True, "reason": "KVM_CAP_GUEST_MEMFD=1", "evidence": {}},
        "kvm": {"available": False, "reason": "kvm_pvm cannot boot a stock guest", "evidence": {}},
        "tdx": {"available": False, "reason": "kvm_intel is not loaded", "evidence": {}},
    },
    "host": {"kernel_release": "6.18.0", "cpu_model": "test CPU"},
}

TINY_TESTS = '''
import json
from pathlib import Path

from avocado import Test

from orchestrator.invariants.verdict import Tolerance, VerdictLog, within
from orchestrator.timeline import Timeline

PROBE = {probe!r}


class Tiny(Test):
    """
    :avocado: tags=smoke,tier:tcg
    """

    def setUp(self):
        data = Path(self.outputdir)
        (data / "probe.json").write_text(json.dumps(PROBE))
        self.timeline = Timeline(data / "timeline.jsonl")
        self.verdicts = VerdictLog(data / "verdicts.json")

    def tearDown(self):
        self.timeline.close()

    def test_pass(self):
        t0 = self.timeline.start
        shmem = 600000
        for i in range(20):
            if i == 8:
                self.timeline.record("op", "punch", t=t0 + i - 0.5, offset=0, length=64 << 20)
                shmem -= 65536
            if i == 12:
                self.timeline.record("op", "convert", t=t0 + i - 0.5, to="private", length=2 << 20)
            if i == 15:
                self.timeline.record("qmp", "event", t=t0 + i - 0.5, event="BALLOON_CHANGE",
                                     data={{"actual": 268435456}})
            self.timeline.record("host", "sample", t=t0 + i,
                                 counters={{"Shmem": shmem, "Unevictable": 1024}})
        self.timeline.record("mystery-source", "unheard-of-kind", t=t0 + 3, payload=[1, 2])
        self.verdicts.add(within("H2", "Shmem fell by the punched amount", 65536, 65536,
                                 Tolerance(relative=0.02), unit="KiB"))
        self.timeline.record("verdict", "pass", t=t0 + 20, invariant="H2")

    def test_fail(self):
        verdict = self.verdicts.add(within("H2", "Shmem fell by the punched amount", 65536, 0,
                                           Tolerance(relative=0.02), unit="KiB"))
        self.timeline.record("verdict", "fail", invariant="H2")
        self.fail(verdict.line())

    def test_cancel(self):
        self.cancel("tier tdx is not available on this host: kvm_intel is not loaded")

    def test_error(self):
        raise RuntimeError("the guest helper crashed")
'''

VARIANTS = """
machine: !mux
  anon:
    backend: anon
  memfd-shared:
    backend: memfd
"""

SLOW_TESTS = """
import time
from pathlib import Path

from avocado import Test

RELEASE = Path({release!r})


class Slow(Test):
    def test_a_quick(self):
        pass

    def test_b_hangs(self):
        (Path(self.outputdir) / "started").write_text("")
        # Bounded: if the runner is not killed, this test still ends.
        deadline = time.monotonic() + 60
        while not RELEASE.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
"""


def _job_dirs(results: Path) -> list[Path]:
    return sorted(p for p in results.glob("job-*") if p.is_dir())


def run_tiny_job(root: Path, probe: dict[str, object] | None = None) -> Path:
    """A complete job of 8 results (4 tests x 2 variants); returns its dir.

    `probe` replaces the probe.json the tests write (e.g. one taken inside the lab)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.py").write_text(TINY_TESTS.format(probe=probe or PROBE))
    (root / "variants.yaml").write_text(VARIANTS)
    results = root / "jobs"
    proc = subprocess.run(
        [
            AVOCADO,
            "run",
            "--job-results-dir",
            str(results),
            "--disable-sysinfo",
            "--max-parallel-tasks",
            "2",
            "tiny.py",
            "-m",
            "variants.yaml",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )
    jobs = _job_dirs(results)
    assert proc.returncode == 1 and len(jobs) == 1, proc.stdout + proc.stderr
    return jobs[0]


def run_killed_job(root: Path) -> Path:
    """A job whose runner was SIGKILLed while its second test ran; returns its dir."""
    root.mkdir(parents=True, exist_ok=True)
    release = root / "release"
    (root / "slow.py").write_text(SLOW_TESTS.format(release=str(release)))
    results = root / "jobs"
    proc = subprocess.Popen(
        [
            AVOCADO,
            "run",
            "--job-results-dir",
            str(results),
            "--disable-sysinfo",
            "--max-parallel-tasks",
            "1",
            "slow.py",
        ],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        pattern = str(results / "job-*" / "test-results" / "*test_b_hangs*" / "data" / "started")
        while not glob.glob(pattern):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the slow test never started (avocado exit {proc.poll()})")
            time.sleep(0.05)
    finally:
        # The runner and its task processes share the session's process group.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        release.write_text("")  # lets any task that escaped the group end at once
    jobs = _job_dirs(results)
    assert len(jobs) == 1
    return jobs[0]
