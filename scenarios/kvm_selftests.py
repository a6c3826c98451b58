"""The kernel's own KVM selftests for guest_memfd and private memory, as avocado tests.

One avocado test per upstream program (`guest_memfd_test`, `set_memory_region_test`,
`pre_fault_memory_test`, `private_mem_conversions_test`, `private_mem_kvm_exits_test`),
built from the source of the kernel under test by `orchestrator.lab.selftests` and run
on the running kernel's `/dev/kvm`. Meant to run inside the lab (`cvmlab lab --kernel
7.3 -- avocado run scenarios/kvm_selftests.py`), where KVM is the kernel under test.

Status: PASS when the program's TAP and its exit status both say so; FAIL when a subtest
failed or the program died (the reason names the subtests, or the assertion's last
lines); CANCEL when the program skipped itself (its own reason, e.g. "Requirement not
met: ... KVM_X86_SW_PROTECTED_VM"), when the running kernel's series has no selftests
built, or when its source has no such program; ERROR when it did not finish in time.
Each TAP subtest is a verdict `KST` (kernel selftest) in verdicts.json; the host's kernel
log must stay clean (H8, judged by the base class at the end). The programs' stdout and
stderr are kept as evidence.

Parameters: `selftests` (a build directory, instead of the one matching `uname -r`),
`selftest_timeout` (seconds per program, default 900).

    cvmlab lab selftests build --series 7.3
    cvmlab lab --kernel 7.3 -- .venv/bin/avocado run scenarios/kvm_selftests.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestrator.invariants.verdict import Verdict, holds
from orchestrator.lab.selftests import SelftestBuild, run_selftest, selftests_for, series_of
from orchestrator.scenario import Scenario

DEFAULT_TIMEOUT_S = 900.0


def subtest_verdict(
    program: str, number: int, name: str, ok: bool, directive: str, reason: str
) -> Verdict:
    """One TAP line as a verdict: a skipped subtest is not-applicable, never a pass."""
    summary = f"{program} subtest {number} {name}".rstrip()
    if directive == "SKIP":
        return Verdict("KST", "not-applicable", f"{summary}: skipped ({reason})")
    return holds("KST", summary, ok or directive in ("TODO", "XFAIL"), directive=directive)


class KvmSelftests(Scenario):
    """Upstream KVM selftests of the running kernel's own source, judged from TAP.

    :avocado: enable
    :avocado: tags=kernels,tier:kvm
    """

    tiers = ("kvm",)
    scenario_keys = frozenset({"selftests", "selftest_timeout"})
    # One program (selftest_timeout, 900 s by default) plus set-up: avocado's deadline is above.
    timeout = 1200

    def selftest_build(self) -> SelftestBuild:
        """The build for this kernel: the `selftests` parameter or the one matching uname -r."""
        release = os.uname().release
        chosen = self.params.get("selftests", default=None)
        if chosen:
            build = SelftestBuild(Path(str(chosen)))
            if not (build.directory / "manifest.json").exists():
                self.error(
                    f"selftests={chosen} is not a selftests build (no manifest.json): "
                    "give the directory `cvmlab lab selftests build` printed"
                )
            if build.series != series_of(release):
                self.error(
                    f"selftests={chosen} were built from {build.series}, but this kernel is "
                    f"{release}: selftests must come from the kernel under test's source"
                )
            return build
        found = selftests_for(release)
        if found is None:
            self.cancel(
                f"no KVM selftests built for this kernel's series {series_of(release)} "
                f"({release}): run `cvmlab lab selftests build --series {series_of(release)}`"
            )
        assert found is not None  # cancel() raised
        return found

    def run_program(self, name: str) -> None:
        """Run one selftest program and turn its outcome into this test's status."""
        build = self.selftest_build()
        binary = build.binary(name)
        if binary is None:
            self.cancel(build.absent_reason(name))
        assert binary is not None
        if not binary.exists():
            self.error(f"{binary} is missing from its build: rebuild with --force")
        timeout = float(self.params.get("selftest_timeout", default=DEFAULT_TIMEOUT_S))
        self.log.info("running %s (built from %s)", binary, build.manifest["source"])
        self.timeline.record("selftest", "start", program=name, binary=str(binary))
        outcome = run_selftest(binary, timeout, self.evidence_dir)
        self.timeline.record("selftest", "end", program=name, status=outcome.status)
        record = {"program": name, "build": str(build.directory), **outcome.to_json()}
        (self.evidence_dir / "selftest.json").write_text(json.dumps(record, indent=2) + "\n")
        self.log.info(
            "%s: %s after %.1f s: %s", name, outcome.status, outcome.seconds, outcome.reason
        )
        if outcome.status == "SKIP":
            self.cancel(f"{name} skipped itself: {outcome.reason}")
        if outcome.status == "ERROR":
            self.error(f"{name} {outcome.reason}")
        for test in outcome.tap.tests:
            self.record(
                subtest_verdict(name, test.number, test.name, test.ok, test.directive, test.reason)
            )
        self.check(
            holds(
                "KST",
                f"{name}: {outcome.reason}",
                outcome.status == "PASS",
                exit_status=outcome.exit_status,
                seconds=outcome.seconds,
            )
        )

    def test_guest_memfd_test(self) -> None:
        """guest_memfd uAPI: create flags, mmap, fallocate/punch, file ops, binding, NUMA."""
        self.run_program("guest_memfd_test")

    def test_set_memory_region_test(self) -> None:
        """Memslots: add/delete/move while vCPUs run, limits, KVM_SET_USER_MEMORY_REGION2."""
        self.run_program("set_memory_region_test")

    def test_pre_fault_memory_test(self) -> None:
        """KVM_PRE_FAULT_MEMORY against the memslots (and private memory where supported)."""
        self.run_program("pre_fault_memory_test")

    def test_private_mem_conversions_test(self) -> None:
        """Private<->shared conversions from the guest, with data checks on both sides."""
        self.run_program("private_mem_conversions_test")

    def test_private_mem_kvm_exits_test(self) -> None:
        """KVM_EXIT_MEMORY_FAULT for private accesses without a backing memslot."""
        self.run_program("private_mem_kvm_exits_test")
