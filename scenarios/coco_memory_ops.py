"""Balloon and virtio-mem on a TDX or SEV-SNP guest (H2, G4, H8).

Lab only (tiers tdx, snp; elsewhere every variant CANCELs with the probe's reason);
machines from scenarios/variants/coco.yaml.

`CocoBalloon`: the guest touches and frees its memory (so its pages are private and held
by guest_memfd), then the balloon takes 128 MiB. QEMU's balloon discards with
`ram_block_discard_range()`, which knows only the shared half; the guest_memfd punch is
`ram_block_discard_guest_memfd_range()`, which only a conversion calls (accel/kvm/
kvm-all.c kvm_convert_memory; research/interfaces.md section 8.2). So, asserted:
- G4: QEMU's balloon reaches the target; the guest's MemTotal falls by exactly 128 MiB;
- H2: QEMU discarded the shared half of exactly the ballooned pages (trace bytes), and
  the shared backing did not grow;
- H2: nothing private was freed: host-wide `Unevictable` (guest_memfd's folios) did not
  fall by the ballooned amount (within 8 MiB of no change), under the host lock, judged
  only when both readings settled (else incomplete: `private_half_kept`);
- deflating gives the guest its memory back (G4); G3, H8.

`CocoVirtioMem`: virtio-mem on a confidential guest. QEMU >= 10.1 gives guest_memfd RAM
its own RamDiscardManager and a region holds only one, so realizing virtio-mem fails
("Failed to set RamDiscardManager"; orchestrator.qemu.version feature
virtio-mem-coco-refusal, inferred from the code); 9.1-10.0 start it. The test predicts
from the target QEMU's version and asserts what that version does:
- refusal: QEMU exits at start with that message, nothing is left running, H8;
- working path: 256 MiB plug and 128 MiB unplug move QEMU's plugged size and the
  guest's MemTotal by exactly as much (G4), the guest can use the memory, G3, H8.
A version that does the other thing fails the test with the instruction to correct the
version table.

    avocado run scenarios/coco_memory_ops.py -m scenarios/variants/coco.yaml
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from orchestrator.errors import LaunchError
from orchestrator.guest.memhelper import MemHelper, ssh_runner
from orchestrator.host.meminfo import meminfo_field
from orchestrator.host.settle import Settled, settle
from orchestrator.invariants.conversions import private_half_kept
from orchestrator.invariants.host_memory import discard_verdict
from orchestrator.invariants.verdict import holds
from orchestrator.machine_scenario import MachineScenario
from orchestrator.memory.balloon import guest_ram_size, set_balloon
from orchestrator.memory.conversions.observer import ConversionObserver
from orchestrator.memory.guest_view import guest_memory
from orchestrator.memory.host_punch import HostPuncher, allocated_bytes, borrowed_fd
from orchestrator.memory.virtio_mem import resize
from orchestrator.qemu.argv import RAM_ID
from orchestrator.qemu.rules import violations
from orchestrator.qemu.spec import MachineSpec
from orchestrator.qemu.trace import trace_output
from orchestrator.qemu.version import feature
from orchestrator.units import MiB

INFLATE = 128 * MiB
FILL_MARGIN_MIB = 64
LOCK_TIMEOUT = 300.0
PLUG = 256 * MiB
UNPLUG = 128 * MiB
VIRTIO_MEM_REFUSAL = "RamDiscardManager"
VIRTIO_MEM_RULE = "virtio-mem-confidential"


class _CocoMemoryScenario(MachineScenario):
    """A confidential guest measured under the host lock, with extra machine parameters.

    :avocado: disable
    """

    timeout = 900
    boot_timeout = 300.0
    extra_machine: ClassVar[Mapping[str, Any]] = {}

    def machine_params(self) -> dict[str, Any]:
        params = super().machine_params()
        params.update(self.extra_machine)
        return params

    def setUp(self) -> None:
        self.boot()

    def build_spec(self) -> MachineSpec:
        spec = super().build_spec()
        self.hold_host_lock()
        return spec

    def hold_host_lock(self) -> None:
        """Host-wide counters are judged: once the tiers are there, hold the lock from
        before the boot (a guest booting next door moves them by hundreds of MiB)."""
        self.take_host_lock(LOCK_TIMEOUT)

    def boot(self) -> None:
        """MachineScenario's setUp (boot, SSH), for a confidential variant only. Not named
        start_guest: that is MachineScenario's own step inside setUp (an override of that
        name would run setUp again from inside setUp)."""
        super().setUp()
        if self.spec.confidential is None:
            self.cancel("this scenario needs a confidential variant (confidential=tdx|snp)")

    def unevictable(self) -> Settled:
        """Host-wide Unevictable once three readings agree within 1 MiB (or the deadline)."""
        return settle(
            lambda: meminfo_field("Unevictable"), tolerance=MiB, window=3, interval=0.2,
            timeout=20,
        )  # fmt: skip


class CocoBalloon(_CocoMemoryScenario):
    """
    :avocado: enable
    :avocado: tags=confidential,balloon,tier:tdx,tier:snp
    """

    extra_machine: ClassVar[Mapping[str, Any]] = {"balloon": "on"}

    def shared_allocated(self, puncher: HostPuncher) -> int:
        backing = puncher.backing(RAM_ID)
        with borrowed_fd(backing.qemu_pid, backing.qemu_fd) as fd:
            return allocated_bytes(fd)

    def test_balloon_frees_the_shared_half_and_nothing_private(self) -> None:
        qmp = self.machine.qmp
        puncher = HostPuncher(qmp, self.machine.pid)
        observer = ConversionObserver(
            qmp, trace_output(self.evidence_dir, self.spec.trace_events), self.timeline
        ).start()
        try:
            ram = guest_ram_size(qmp)
            mib = guest_memory(self.guest).mem_available // MiB - FILL_MARGIN_MIB
            MemHelper(ssh_runner(self.guest)).fill(mib)
            self.timeline.record("guest", "filled-and-freed", mib=mib)

            unevictable_before = self.unevictable()
            shared_before = self.shared_allocated(puncher)
            counts_before = observer.counts()
            inflate = set_balloon(qmp, ram - INFLATE, guest=self.guest, timeline=self.timeline)
            window = observer.counts().minus(counts_before)
            shared_after = self.shared_allocated(puncher)
            unevictable_after = self.unevictable()
        finally:
            observer.stop()

        drop = inflate.guest_total_drop
        self.check(
            holds(
                "G4",
                f"QEMU's balloon reaches {(ram - INFLATE) // MiB} MiB and the guest's MemTotal "
                f"falls by exactly {INFLATE // MiB} MiB",
                inflate.reached and drop == INFLATE,
                guest_total_drop=drop,
                **inflate.to_json(),
            )
        )
        self.check(
            discard_verdict(
                "QEMU discarded the shared half of exactly the ballooned pages "
                "(ram_block_discard_* bytes)",
                INFLATE,
                window.shared_discarded,
                window.failed_discards,
                qemu=window.to_json(),
            )
        )
        self.check(
            holds(
                "H2",
                "the shared backing did not grow while ballooning (private pages have no shared "
                "half to free, and the balloon populates none)",
                shared_after <= shared_before and window.failed_discards == 0,
                shared_before=shared_before,
                shared_after=shared_after,
            )
        )
        self.check(
            private_half_kept(
                INFLATE,
                unevictable_before.value,
                unevictable_after.value,
                settled=unevictable_before.ok and unevictable_after.ok,
            )
        )
        deflate = set_balloon(qmp, ram, guest=self.guest, timeline=self.timeline)
        assert inflate.guest_before is not None
        self.check(
            holds(
                "G4",
                "deflating gives the guest its MemTotal back",
                deflate.reached
                and deflate.guest_after is not None
                and deflate.guest_after.mem_total == inflate.guest_before.mem_total,
                **deflate.to_json(),
            )
        )
        self.check_guest_log_clean()
        self.check_host_log_clean()


class CocoVirtioMem(_CocoMemoryScenario):
    """
    :avocado: enable
    :avocado: tags=confidential,virtio-mem,tier:tdx,tier:snp
    """

    extra_machine: ClassVar[Mapping[str, Any]] = {
        "virtio_mem_size": "512M",
        "virtio_mem_block_size": "2M",
        "virtio_mem_requested": 0,
        "virtio_mem_backend": "memfd",
        "cmdline": "memhp_default_state=online_movable",
    }
    refused: LaunchError | None = None
    predicted_refusal = False

    def build_spec(self) -> MachineSpec:
        """As the base class, except that the virtio-mem-confidential rule is the subject
        of this test, not a reason to stop: it becomes the prediction."""
        spec = self.prepared_spec()
        found = violations(spec, self.probe.qemu)
        self.predicted_refusal = any(v.rule.id == VIRTIO_MEM_RULE for v in found)
        others = [v for v in found if v.rule.id != VIRTIO_MEM_RULE]
        if others:
            self.error(f"bad machine spec: {others[0].message()}")
        self.hold_host_lock()
        return spec

    def boot(self) -> None:
        try:
            super().boot()
        except LaunchError as error:
            self.refused = error

    def test_qemu_refuses_or_runs_virtio_mem_as_its_version_says(self) -> None:
        qemu = self.probe.qemu
        since = feature("virtio-mem-coco-refusal").since
        which = qemu.describe() if qemu is not None else "this QEMU"
        if self.predicted_refusal:
            message = str(self.refused) if self.refused else ""
            detail = self.refused.detail if self.refused else ""
            self.check(
                holds(
                    "H8",
                    f"{which} (>= {since.short()}) refuses virtio-mem on a confidential guest "
                    f"at start with its documented reason ({VIRTIO_MEM_REFUSAL!r}); nothing is "
                    "left running",
                    self.refused is not None
                    and VIRTIO_MEM_REFUSAL in message + detail
                    and not self.machine.running,
                    launch_error=message,
                    stderr=detail[-2000:],
                    fix_if_wrong="if this QEMU starts the guest, correct the version of "
                    "virtio-mem-coco-refusal in orchestrator/qemu/version.py",
                )
            )
            self.check_host_log_clean()
            return
        self.check(
            holds(
                "G4",
                f"{which} (< {since.short()}) starts a confidential guest with virtio-mem",
                self.refused is None,
                launch_error=str(self.refused) if self.refused else None,
                fix_if_wrong="if this QEMU refuses, correct virtio-mem-coco-refusal's version in "
                "orchestrator/qemu/version.py",
            )
        )
        if self.refused is not None:
            return
        qmp = self.machine.qmp
        plug = resize(qmp, PLUG, guest=self.guest, timeline=self.timeline)
        self.check(
            holds(
                "G4",
                f"plugging {PLUG // MiB} MiB: QEMU reaches it and the guest's MemTotal rises by "
                "exactly as much",
                plug.reached and plug.guest_total_change == PLUG,
                **plug.to_json(),
            )
        )
        mib = guest_memory(self.guest).mem_available // MiB - FILL_MARGIN_MIB
        MemHelper(ssh_runner(self.guest)).fill(mib)
        self.check(
            holds(
                "G4",
                "the guest used the plugged memory: it filled more than its boot RAM had free",
                plug.guest_before is not None and mib * MiB > plug.guest_before.mem_available,
                filled_mib=mib,
            )
        )
        unplug = resize(qmp, PLUG - UNPLUG, guest=self.guest, timeline=self.timeline)
        self.check(
            holds(
                "G4",
                f"unplugging {UNPLUG // MiB} MiB: QEMU reaches it and MemTotal falls by exactly "
                "as much",
                unplug.reached and unplug.guest_total_change == -UNPLUG,
                **unplug.to_json(),
            )
        )
        self.check_guest_log_clean()
        self.check_host_log_clean()
