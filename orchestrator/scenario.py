"""The avocado base class every scenario inherits: probe, tiers, timeline, verdicts.

`Scenario` probes the host once, writes `probe.json`, and CANCELs with the
probe's reason when a tier the scenario needs is missing: a missing
capability is never a FAIL and never a silent PASS. It also owns the test's
timeline and verdicts. Scenarios with a guest build on
`orchestrator.machine_scenario`, the guest_memfd and KVM ones on
`orchestrator.kvm_scenario`.

Status semantics (README "What a status means", orchestrator.invariants.outcome):
the end-of-test invariants (G3 guest health, H9 teardown, H8 host log) are judged
in a finish phase that runs right after the test method, inside avocado's test
phase, so a failure there is a FAIL with its verdict, never an ERROR raised from
tearDown; `tearDown` only releases what is left and writes evidence.

Kept to what every test needs: a test without a guest (the lab's guest_memfd
suites, Python under TCG) imports nothing of QEMU, images or guests through it.
"""

from __future__ import annotations

import difflib
import os
import shlex
import time
from pathlib import Path

from avocado import Test
from avocado.core import exceptions as avocado_exceptions

from orchestrator.errors import HostError
from orchestrator.host.hostlock import HostLock
from orchestrator.host.kernel_log import HostLogWatch
from orchestrator.host.probe import HostProbe, shared_probe
from orchestrator.invariants.host_log import host_log_verdict
from orchestrator.invariants.outcome import Raised, decide
from orchestrator.invariants.verdict import Verdict, VerdictLog
from orchestrator.qemu.keys import MACHINE_KEYS, SCENARIO_KEYS
from orchestrator.timeline import Timeline, now

DEFAULT_QEMU = "qemu-system-x86_64"


def default_qemu_binary() -> str | list[str]:
    """The QEMU a test runs without a `qemu` parameter: $CVMLAB_QEMU, else DEFAULT_QEMU."""
    return _qemu_words(os.environ.get("CVMLAB_QEMU", DEFAULT_QEMU))


def _qemu_words(value: str) -> str | list[str]:
    """A path, or an argv prefix split like a shell would (`env QEMU_MODULE_DIR=... ld.so
    --library-path ... qemu-system-x86_64`, a private build through its loader)."""
    words = shlex.split(value)
    return words[0] if len(words) == 1 else words


# Parameters avocado itself reads from every test.
AVOCADO_KEYS = frozenset({"timeout", "timeout_factor"})


class Scenario(Test):  # type: ignore[misc]  # avocado ships no type hints
    """Base of every cvmlab scenario: probe, tiers, timeline, verdicts.

    :avocado: disable
    """

    #: Tiers (DESIGN.md section 1) this scenario needs; missing ones CANCEL.
    tiers: tuple[str, ...] = ()
    #: Parameters the scenario itself reads (beyond machine keys), so `-p` typos are caught.
    scenario_keys: frozenset[str] = frozenset()

    probe: HostProbe
    timeline: Timeline
    verdicts: VerdictLog
    evidence_dir: Path
    host_log: HostLogWatch
    #: now() when the test method ended and the finish phase began (repro steps end there).
    test_ended: float | None = None
    #: The finish phase ran (its verdicts are in); tearDown then only releases.
    finished: bool = False
    #: The host lock `meminfo`, held from `take_host_lock()` until tearDown.
    host_lock: HostLock | None = None

    def setUp(self) -> None:
        self.evidence_dir = Path(self.outputdir)
        self.evidence_dir.mkdir(parents=True, exist_ok=True)
        self.timeline = Timeline(self.evidence_dir / "timeline.jsonl")
        self.verdicts = VerdictLog(self.evidence_dir / "verdicts.json")
        # Baseline of the host kernel log: host-dmesg.txt is everything after it.
        self.host_log = HostLogWatch()
        self.refuse_unknown_cli_params()
        shared = shared_probe(self.qemu_binary())
        self.probe = shared.probe
        if shared.measured_by != os.getpid():
            self.log.info("host probe: measured %.1f s ago, before this test was forked, "
                          "by process %d for every test of the job",
                          time.time() - shared.measured_at, shared.measured_by)  # fmt: skip
        (self.evidence_dir / "probe.json").write_text(shared.json_text)
        self.require_tiers(*self.tiers)

    # --- the finish phase: end-of-test invariants, judged before avocado's tearDown ------

    def _run_test(self) -> None:
        """avocado's setUp + test, then `end_of_test()`; the status follows outcome.decide.

        Overrides avocado.core.test.Test._run_test (avocado 113): a verdict that fails
        in `end_of_test` is a FAIL (tearDown's exceptions would be ERRORs replacing it).
        """
        raised: BaseException | None = None
        try:
            super()._run_test()
        except BaseException as exc:  # judged below, by kind
            raised = exc
        kind = _raised_kind(raised)
        if kind == "cancel" or isinstance(raised, avocado_exceptions.TestInterrupt):
            assert raised is not None
            raise raised
        try:
            self.end_of_test()
        except Exception as exc:  # the harness broke while judging: ERROR unless a verdict failed
            self.log.exception("the finish phase could not complete")
            if raised is None:
                raised, kind = exc, "error"
        self.finished = True
        outcome = decide(self.verdicts.verdicts, kind, _error_text(raised))
        self.log.info("outcome: %s %s", outcome.status, outcome.reason)
        if outcome.status == "FAIL":
            raise avocado_exceptions.TestFail(outcome.reason) from raised
        if outcome.status == "ERROR":
            assert raised is not None or outcome.reason
            raise raised if raised is not None else avocado_exceptions.TestError(outcome.reason)
        if outcome.status == "WARN":
            raise avocado_exceptions.TestWarn(outcome.reason)

    def end_of_test(self) -> None:
        """End-of-test invariants; subclasses judge theirs, then call this (H8 last)."""
        if self.test_ended is None:
            self.test_ended = now()
        host_log = getattr(self, "host_log", None)
        if host_log is None:
            return
        delta = host_log.delta()
        (self.evidence_dir / "host-dmesg.txt").write_text(delta.text())
        self.record(host_log_verdict(delta, "host kernel log is clean through the end of the test"))

    def tearDown(self) -> None:
        """Release what is left and keep the evidence; never judges (see `end_of_test`)."""
        try:
            host_log = getattr(self, "host_log", None)
            if host_log is not None:
                if not self.finished:
                    (self.evidence_dir / "host-dmesg.txt").write_text(host_log.delta().text())
                host_log.close()
        finally:
            timeline = getattr(self, "timeline", None)
            if timeline is not None:
                timeline.close()
            if self.host_lock is not None:
                self.host_lock.release()
                self.host_lock = None

    # --- helpers for scenarios ----------------------------------------------------

    def qemu_binary(self) -> str | list[str]:
        """The QEMU to run: a path, or an argv prefix (a private build through its loader).

        From the parameter `qemu`, else $CVMLAB_QEMU (see `default_qemu_binary`).
        """
        value = self.params.get("qemu", default=None)
        return default_qemu_binary() if value is None else _qemu_words(str(value))

    def refuse_unknown_cli_params(self) -> None:
        """ERROR on a `-p key=value` nobody reads: a typo must not pass silently."""
        known = MACHINE_KEYS | SCENARIO_KEYS | self.scenario_keys | AVOCADO_KEYS
        for path, key, _ in self.params.iteritems():
            if path == "/" and key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.error(
                    f"unknown parameter {key}{hint}: machine keys are listed in "
                    "orchestrator.qemu.spec.MACHINE_KEYS; this scenario also reads: "
                    f"{', '.join(sorted(self.scenario_keys)) or 'nothing else'}"
                )

    def timeout_factor(self) -> float:
        """avocado's `timeout_factor` (the lab passes one: a nested guest boots under TCG's
        emulated SVM, several times slower), applied to our own waits as to the test's."""
        try:
            return max(1.0, float(self.params.get("timeout_factor", default=1.0)))
        except (TypeError, ValueError):
            return 1.0

    def take_host_lock(self, timeout: float) -> None:
        """Hold the host lock `meminfo` until tearDown: the one place a test takes it.

        Tests that judge host-wide counters take it once their tiers are known present
        (no queueing only to CANCEL) and before they boot or allocate (a guest booting
        next door moves the counters by hundreds of MiB). Another holder past `timeout`
        seconds (times the timeout factor: in the lab a holder runs several times longer,
        a nested balloon test 350 s) is a CANCEL naming the lock."""
        if self.host_lock is not None:
            return
        lock = HostLock("meminfo", timeout=timeout * self.timeout_factor())
        try:
            lock.acquire()
        except HostError as error:
            self.cancel(str(error))
        self.host_lock = lock
        self.log.info("host lock %s after %.1f s", lock.path, lock.waited)

    def require_tiers(self, *tiers: str) -> None:
        """CANCEL with the probe's reason unless every tier is available."""
        reason = self.probe.require(tiers)
        if reason:
            self.cancel(reason)

    def check_host_log_clean(self) -> Verdict:
        """H8: no WARN/BUG/Oops/RCU stall/SEAMCALL/RMP/MCE in the host kernel log since setUp.

        Lost records with nothing found are "incomplete" (the test ends WARN, never PASS)."""
        return self.check(host_log_verdict(self.host_log.delta()))

    def record(self, verdict: Verdict) -> Verdict:
        """Record a verdict (verdicts.json, timeline, log) without ending the test."""
        self.verdicts.add(verdict)
        self.timeline.record("verdict", verdict.status, invariant=verdict.invariant)
        self.log.info("%s", verdict.line())
        return verdict

    def check(self, verdict: Verdict) -> Verdict:
        """Record a verdict; a failed one fails the test at once (its line is the reason)."""
        self.record(verdict)
        if verdict.failed:
            self.fail(verdict.line())
        return verdict


def _raised_kind(raised: BaseException | None) -> Raised:
    """What ended the test method, for outcome.decide."""
    if raised is None:
        return "nothing"
    if isinstance(raised, (avocado_exceptions.TestCancel, avocado_exceptions.TestSkipError)):
        return "cancel"
    if isinstance(raised, (avocado_exceptions.TestFail, AssertionError)):
        return "check"
    return "error"


def _error_text(raised: BaseException | None) -> str:
    if raised is None:
        return ""
    return f"{type(raised).__name__}: {raised}"
