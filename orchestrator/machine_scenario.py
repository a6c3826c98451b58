"""Scenarios with a guest: `MachineScenario` boots one per test, `MemoryScenario` measures it.

`MachineScenario` turns the variant's `machine` parameters into a `MachineSpec`
(around the default image), checks the spec against QEMU's rules and this QEMU's
introspection, starts the guest (cold, or restored from a snapshot), waits for its
readiness marker, connects SSH, and always tears everything down, keeping the
evidence of DESIGN.md section 5 in the test's data dir.

Parameters: machine keys (see `orchestrator.qemu.spec.spec_from_params`) are
read from the variant's `machine` subtree (`/run/machine/...` in a YAML
variants file) or given with `-p key=value`; `qemu` names the QEMU binary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from orchestrator.errors import CvmlabError, HostError, ImageError, QemuError
from orchestrator.guest.memhelper import MemHelper
from orchestrator.host.baseline import TeardownWatch
from orchestrator.host.confidential import prepare_confidential, required_tiers
from orchestrator.host.settle import Settled
from orchestrator.image import (
    ImageManifest,
    build_image,
    default_image,
    load_manifest,
    pvh,
    verify_image,
)
from orchestrator.image.pvh import KernelEntry
from orchestrator.invariants.guest_health import guest_crash_verdict, guest_log_verdict
from orchestrator.invariants.host_memory import SHARED_HOST_COUNTERS
from orchestrator.invariants.teardown import teardown_verdict
from orchestrator.invariants.verdict import Verdict, holds, incomplete
from orchestrator.memory.backing import BackingProbe, BackingSample, host_meminfo
from orchestrator.memory.measured import MeasuredMemory, host_shortfall, judges_host_counter
from orchestrator.qemu.argv import RAM_ID
from orchestrator.qemu.keys import MACHINE_KEYS
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.rules import validate
from orchestrator.qemu.snapshot import StartRecord
from orchestrator.qemu.spec import KernelBoot, MachineSpec, spec_from_params
from orchestrator.qemu.trace import TraceCollector, trace_output
from orchestrator.qemu.warm import finish_start, start_guest
from orchestrator.repro import FAILED_STATUSES, write_repro_bundle
from orchestrator.scenario import Scenario
from orchestrator.timeline import now

if TYPE_CHECKING:
    from orchestrator.guest.ssh import GuestShell

# Seconds for the guest's sshd to answer once the readiness marker is seen.
SSH_UP_TIMEOUT_S = 60.0


def direct_entry(
    spec: MachineSpec, image_kernel: Path, entry_for: Callable[[Path], KernelEntry]
) -> tuple[MachineSpec, KernelEntry | None]:
    """`spec` booting the ELF kernel `entry_for(image_kernel)` gives, where it boots the
    image's bzImage as a plain guest; and how the kernel is entered (None: not the image's).

    A plain guest skips the bzImage's decompressor under TCG (orchestrator/image/pvh.py:
    2.2 s of every cold boot). Confidential guests (their firmware boots the EFI stub),
    firmware boots and a kernel given with -p kernel= boot exactly as given.
    """
    boot = spec.boot
    if not isinstance(boot, KernelBoot) or boot.kernel != str(image_kernel):
        return spec, None
    if spec.confidential is not None or boot.firmware is not None:
        why = "a confidential guest" if spec.confidential is not None else "a firmware boot"
        return spec, KernelEntry(image_kernel, False, f"bzImage boot: {why}")
    entry = entry_for(image_kernel)
    if not entry.pvh:
        return spec, entry
    return dataclasses.replace(spec, boot=dataclasses.replace(boot, kernel=str(entry.path))), entry


class MachineScenario(Scenario):
    """A scenario with one guest booted from the default image for each test.

    :avocado: disable
    """

    tiers = ("tcg",)
    #: Seconds for the guest to print its readiness marker (TCG boots in ~4 s).
    boot_timeout = 120.0
    #: Why this scenario needs a cold boot (it checks the boot or boot-time state);
    #: None: a restored snapshot of the same machine serves it as well (warm start).
    cold_boot: ClassVar[str | None] = None

    image: ImageManifest
    spec: MachineSpec
    machine: Machine
    guest: GuestShell
    start: StartRecord
    #: Set by `expect_guest_crash()`: the test crashes its guest on purpose and judges it.
    crash_expected: str | None = None
    #: How the guest's kernel is entered (image.json): set by prepared_spec().
    kernel_entry: KernelEntry | None = None

    def machine_params(self) -> dict[str, Any]:
        """The variant's `machine` subtree, plus known machine keys given with -p."""
        params: dict[str, Any] = {}
        for path, key, value in self.params.iteritems():
            if "/machine" in path or key in MACHINE_KEYS:
                params[key] = value
        return params

    def build_spec(self) -> MachineSpec:
        """The spec from parameters around the image; a bad spec is an ERROR naming the rule."""
        spec = self.prepared_spec()
        try:
            validate(spec, self.probe.qemu)
        except CvmlabError as error:
            self.error(f"bad machine spec: {error}")
        return spec

    def prepared_spec(self) -> MachineSpec:
        """The spec before QEMU's rules judge it: parsed, its tiers present (else CANCEL),
        its confidential parts completed for this host."""
        params = self.machine_params()
        params.setdefault("accel", self.probe.best_accel())
        boot = KernelBoot(
            kernel=str(self.image.kernel), initrd=str(self.image.initrd), cmdline=self.image.cmdline
        )
        try:
            spec = spec_from_params(params, boot=boot)
        except CvmlabError as error:
            self.error(f"bad machine spec: {error}")
        # A missing tier CANCELs before anything host-specific is looked up.
        self.require_tiers(*required_tiers(spec))
        try:
            # Confidential guests: firmware, SEV C-bit, host checks (a plain spec is unchanged).
            spec = prepare_confidential(spec, self.probe)
        except HostError as error:
            self.cancel(f"this host cannot run the guest: {error}")
        except CvmlabError as error:
            self.error(f"bad machine spec: {error}")
        return self.entered_directly(spec)

    def entered_directly(self, spec: MachineSpec) -> MachineSpec:
        """`spec` with the image's ELF kernel entered through PVH where that is sound
        (`direct_entry`); how, either way, goes to image.json."""
        spec, self.kernel_entry = direct_entry(spec, Path(self.image.kernel), pvh.kernel_entry)
        return spec

    def choose_image(self) -> ImageManifest:
        """The guest image: `-p image=DIR` (a built image), `-p guest_kernel_suite=S
        [-p guest_kernel_version=V]` (the default recipe around that kernel, built on
        demand), or the default image. What it is goes to `image.json` (guest kernel)."""
        directory = self.params.get("image", default=None)
        suite = self.params.get("guest_kernel_suite", default=None)
        version = self.params.get("guest_kernel_version", default=None)
        if directory and (suite or version):
            raise ImageError(
                "image= and guest_kernel_suite=/guest_kernel_version= both name the guest",
                "pass one: a built image directory, or the kernel to build one around",
            )
        if directory:
            return load_manifest(Path(str(directory)))
        if suite or version:
            return build_image(
                kernel_suite=str(suite) if suite else None,
                kernel_version=str(version) if version else None,
                progress=self.log.info,
            )
        return default_image(progress=self.log.info)

    def setUp(self) -> None:
        super().setUp()
        try:
            self.image = self.choose_image()
            # Hashes and key permissions: a changed image or an open key is refused here.
            verify_image(self.image)
        except CvmlabError as error:
            self.error(f"guest image: {error}")
        try:
            self.spec = self.build_spec()
        finally:  # a spec that is refused still leaves the guest image in the evidence
            entry = self.kernel_entry
            (self.evidence_dir / "image.json").write_text(
                json.dumps(
                    {
                        "directory": str(self.image.directory),
                        "guest_kernel": self.image.kernel_release,
                        "cmdline": self.image.cmdline,
                        "kernel_entry": entry.to_json() if entry is not None else None,
                    },
                    indent=2,
                )
            )
        self.before_launch()
        # H9's baseline: the runner's fds and children, quiet host counters, before QEMU.
        self.teardown_watch = TeardownWatch(extra_markers=(str(self.evidence_dir),))
        self.start_guest()
        self.guest = self.machine.ssh(
            self.image.ssh_user, self.image.ssh_key, self.image.host_key,
            timeout=SSH_UP_TIMEOUT_S * self.timeout_factor(),
        )  # fmt: skip
        finish_start(self.machine, self.guest, self.start, self.image.restored_clock)
        self.record_start()

    def start_guest(self) -> None:
        """Boot the guest cold, or restore a snapshot of the same machine (warm start,
        orchestrator.qemu.warm): `self.machine` is set as soon as QEMU exists, so a
        boot that fails still leaves its machine to the finish phase."""
        qemu = self.probe.qemu
        version = (qemu.version.major, qemu.version.minor, qemu.version.micro) if qemu else None
        binary = self.qemu_binary()

        def adopt(machine: Machine) -> Machine:
            self.machine = machine
            return machine

        _, self.start = start_guest(
            self.spec,
            self.evidence_dir,
            binary=[binary] if isinstance(binary, str) else binary,
            qemu_version=version,
            image_hashes={**self.image.outputs, "cmdline": self.image.cmdline},
            ready_marker=self.image.ready_marker,
            timeline=self.timeline,
            cold_reason=self.cold_boot,
            boot_timeout=self.boot_timeout * self.timeout_factor(),
            machine_factory=lambda *a, **k: adopt(Machine(*a, **k)),
        )

    def record_start(self) -> None:
        """The start in the evidence: start.json, the log, and S4 in verdicts.json."""
        start = self.start
        (self.evidence_dir / "start.json").write_text(json.dumps(start.to_json(), indent=2))
        self.log.info("guest start: %s (%s)", start.mode, start.reason)
        if self.cold_boot is not None:
            allowed = start.mode == "cold"
            why = f"a cold-only scenario booted cold ({self.cold_boot})"
        elif start.mode == "warm":
            # Ready is marked only after the restored guest answered SSH (its clock set);
            # no QMP here: whatever runs after ready is a step `cvmlab repro` replays.
            allowed = self.machine.ready_by == "snapshot" and self.machine.running
            why = f"the guest was restored and answers SSH ({start.reason})"
        else:
            allowed = True
            why = f"the guest booted cold: {start.reason}"
        self.record(holds("S4", why, allowed, **start.to_json()))

    def before_launch(self) -> None:
        """Called with `self.spec` complete and its tiers present, just before QEMU starts."""

    def expect_guest_crash(self, why: str) -> None:
        """This test crashes its guest on purpose and judges the crash itself: the
        finish phase then records no G3 verdict of its own."""
        self.crash_expected = why

    def stop_observers(self) -> None:
        """Stop followers and close files the test opened (before H9 counts fds); idempotent."""

    def end_of_test(self) -> None:
        """G3 (crash or guest log), shutdown, H9 (teardown left nothing), then H8."""
        self.test_ended = now()
        self.stop_observers()
        machine = getattr(self, "machine", None)
        if machine is not None:
            self._judge_guest_at_end(machine)
            rung = machine.shutdown()
            self.log.info("guest stopped by %s", rung)
            watch = getattr(self, "teardown_watch", None)
            if watch is not None:
                try:
                    pid: int | None = machine.pid
                except QemuError:
                    pid = None
                self.record(teardown_verdict(watch.observe(pid, machine.rundir)))
        super().end_of_test()

    def _judge_guest_at_end(self, machine: Machine) -> None:
        """G3 at the end: the console's crash report, else the guest's kernel log."""
        if self.crash_expected is not None:
            self.log.info("guest crash expected (%s): G3 judged by the test", self.crash_expected)
            return
        dmesg = self._save_guest_dmesg()
        if machine.crashed is not None:
            self.record(guest_crash_verdict(machine.crashed))
        elif dmesg is not None:
            self.record(guest_log_verdict(dmesg.splitlines()))
        elif getattr(self, "guest", None) is not None:
            self.record(incomplete("G3", "the guest's kernel log could not be read at the end"))

    def tearDown(self) -> None:
        try:
            self._write_repro_bundle()
            machine = getattr(self, "machine", None)
            if machine is not None:
                if not self.finished:
                    self._save_guest_dmesg()
                rung = machine.shutdown()
                self.log.info("guest stopped by %s", rung)
        finally:
            super().tearDown()

    def _write_repro_bundle(self) -> None:
        """On failure, repro.json for `cvmlab repro`: first in tearDown, so tearDown's own
        commands (dmesg, shutdown) are not steps. Never masks the test's own result."""
        if self.status not in FAILED_STATUSES or not hasattr(self, "spec"):
            return
        argv_json = self.evidence_dir / "argv.json"
        if not argv_json.is_file():
            return  # QEMU was never launched: nothing to reproduce
        try:
            seed = self.params.get("seed", default=None)
            with contextlib.suppress(ValueError):
                seed = None if seed is None else int(str(seed), 0)
            write_repro_bundle(
                self.evidence_dir,
                test_id=str(self.name),
                status=self.status,
                fail_reason=self.fail_reason,
                spec=self.spec,
                qemu_command=json.loads(argv_json.read_text()),
                image=getattr(self, "image", None),
                seed=seed if isinstance(seed, int) else None,
                end=self.test_ended,
            )
        except Exception:  # a broken bundle must not turn a FAIL into an ERROR
            self.log.exception("could not write the reproducer bundle (repro.json)")

    def _save_guest_dmesg(self) -> str | None:
        """guest-dmesg.txt from a guest that is up; its text, or None."""
        guest = getattr(self, "guest", None)
        if guest is None or self.machine.crashed is not None or not self.machine.running:
            return None
        try:
            result = self.guest.run("dmesg", timeout=20, check=False)
        except CvmlabError as error:
            self.log.warning("could not read the guest's dmesg: %s", error)
            return None
        (self.evidence_dir / "guest-dmesg.txt").write_text(result.stdout)
        return result.stdout

    # --- guest invariants every machine scenario can assert -----------------------

    def check_guest_log_clean(self) -> Verdict:
        """G3: no oops/WARN/BUG/panic in the guest's kernel log, and no pvpanic event.

        A crashed guest is a G3 FAIL carrying the console lines (not an ERROR)."""
        if self.machine.crashed is not None:
            return self.check(guest_crash_verdict(self.machine.crashed))
        dmesg = self.guest.run("dmesg", timeout=20).stdout
        return self.check(guest_log_verdict(dmesg.splitlines()))


class MemoryScenario(MachineScenario):
    """A guest whose memory the host measures while the test changes it: the avocado
    wrapper of `orchestrator.memory.measured` (which holds the logic, for pytest and
    `cvmlab repro` too).

    QEMU's own backing (fd blocks, mapping Rss) is what H2 judges; the host-wide
    counter a backend moves is recorded beside it, and judged only for huge pages
    (HugePages_Free, which only huge-page users move). So only a spec with huge
    pages holds the host lock `meminfo`, for the whole test, boot included (other
    huge-page tests wait for it); the others run side by side. The test gets the
    backing of `measured_memdev` (`self.backing`, `self.counter`: the host-wide counter
    that backend moves), the guest memory helper (`self.helper`) and QEMU's
    memory trace events (`self.trace`), all from `self.memory`, a `MeasuredMemory`.
    The lock is taken once the tiers are known to be present (no queueing only to
    CANCEL); a hugetlb variant on a host without huge pages CANCELs before booting.

    :avocado: disable
    """

    #: Machine parameters every test of the class needs (variants may not override them).
    fixed_machine: ClassVar[Mapping[str, Any]] = {}
    #: The memory backend whose host backing the test follows.
    measured_memdev: ClassVar[str] = RAM_ID
    #: Seconds to wait for another measuring test to finish.
    lock_timeout: ClassVar[float] = 200.0

    memory: MeasuredMemory
    backing: BackingProbe
    counter: str
    helper: MemHelper
    trace: TraceCollector

    def machine_params(self) -> dict[str, Any]:
        params = super().machine_params()
        params.update(self.fixed_machine)
        return params

    def setUp(self) -> None:
        super().setUp()
        self.memory = MeasuredMemory(
            self.machine.qmp, self.machine.pid, self.guest, self.measured_memdev,
            trace_output(self.evidence_dir, self.spec.trace_events), self.timeline,
            log=self.log.info,
        )  # fmt: skip
        self.backing, self.counter = self.memory.backing, self.memory.counter
        self.helper, self.trace = self.memory.helper, self.memory.trace
        self.memory.start()

    def before_launch(self) -> None:
        """Tiers are present and the spec is valid: now wait for the host's huge pages."""
        short = host_shortfall(self.spec)
        if short:
            self.cancel(short)
        if judges_host_counter(self.spec):
            self.take_host_lock(self.lock_timeout)

    def stop_observers(self) -> None:
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.stop()
        super().stop_observers()

    def tearDown(self) -> None:
        self.stop_observers()
        super().tearDown()

    def settled_backing(
        self, what: str, *, window: int = 3, interval: float = 0.1, timeout: float = 10.0
    ) -> BackingSample:
        """What the host holds for `measured_memdev`, once it stops moving (within 1 MiB);
        an unsettled sample says so (`BackingSample.settled`)."""
        return self.memory.settled_backing(what, window=window, interval=interval, timeout=timeout)

    def settled_host(self) -> Settled:
        """The host-wide counter of this backend, once three readings agree within 2 MiB.

        A counter every process moves (SHARED_HOST_COUNTERS) is recorded, never judged,
        and other guests may run beside this test: one reading, not marked settled.
        """
        if self.counter in SHARED_HOST_COUNTERS:
            value = host_meminfo([self.counter])[self.counter]
            return Settled(value, False, (value,), 0.0)
        return self.memory.settled_host()
