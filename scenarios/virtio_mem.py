"""virtio-mem on a running guest, judged on both sides.

One guest with 512 MiB of RAM and a 512 MiB virtio-mem device (2 MiB blocks, nothing
plugged at boot, hot-added memory onlined movable):
- plug 256 MiB: QEMU's plugged size and MEMORY_DEVICE_SIZE_CHANGE reach it, the
  guest's MemTotal rises by exactly 256 MiB (G4);
- the guest holds a locked buffer (G2) and fills and frees its memory, so the plugged
  blocks are backed on the host;
- unplug 128 MiB: QEMU's size and the guest's MemTotal fall by exactly 128 MiB (G4),
  the device's backing on the host falls by about 128 MiB (H2: st_blocks / Rss, and
  host-wide under the host lock), QEMU's trace shows exactly 128 MiB discarded, and
  the locked buffer keeps its pattern even if the guest had to migrate it (G2);
- unplug the rest: the device's backing holds nothing any more (H2), MemTotal is back
  where it started (G4), the buffer is intact (G2); G3 and H8 at the end.

Backends of the virtio-mem memdev (scenarios/variants/virtio_mem.yaml): anon, memfd,
memfd with hugetlb (CANCEL without enough free huge pages on the host) and file.
Without a `virtio_mem_backend` of its own, the device's memory is of the guest RAM's
kind (its backend keys, mirrored): that is how `make smoke` runs it on smoke.yaml's
shared memfd, in the same avocado job as the other scenarios.

    avocado run scenarios/virtio_mem.py -m scenarios/variants/virtio_mem.yaml
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from orchestrator.guest.memhelper import MemHelper, ssh_runner
from orchestrator.invariants.host_memory import (
    discard_verdict,
    drop_verdicts,
    host_verdict,
    settled_or_incomplete,
)
from orchestrator.invariants.verdict import Tolerance, holds, within
from orchestrator.machine_scenario import MemoryScenario
from orchestrator.memory.expectations import expect_discard, expected_host_move
from orchestrator.memory.guest_view import guest_memory
from orchestrator.memory.virtio_mem import ResizeResult, resize, virtio_mem_device
from orchestrator.qemu.argv import VMEM_BACKEND_ID
from orchestrator.qemu.spec import virtio_mem_follows_ram
from orchestrator.units import MiB, kib

PLUG = 256 * MiB
UNPLUG = 128 * MiB
LOCKED_MIB = 32
SEED = 0x7E11
FILL_MARGIN_MIB = 64


class VirtioMem(MemoryScenario):
    """
    :avocado: enable
    :avocado: tags=smoke,virtio-mem,tier:tcg,tier:kvm
    """

    timeout = 360
    measured_memdev = VMEM_BACKEND_ID
    #: The device and the kernel parameter every variant needs; backends come from variants.
    fixed_machine: ClassVar[Mapping[str, Any]] = {
        "memory": "512M",
        "virtio_mem_size": "512M",
        "virtio_mem_block_size": "2M",
        "virtio_mem_requested": 0,
        # Hot-added memory goes online into ZONE_MOVABLE, so unplug can always migrate.
        "cmdline": "memhp_default_state=online_movable",
    }

    def machine_params(self) -> dict[str, Any]:
        return virtio_mem_follows_ram(super().machine_params())

    # --- steps ----------------------------------------------------------------------------

    def check_resize(self, result: ResizeResult, what: str) -> None:
        """G4: QEMU's size and event reached the request; MemTotal moved by exactly as much."""
        target = result.progress.target
        self.check(
            holds(
                "G4",
                f"{what}: QEMU's plugged size reaches {target // MiB} MiB "
                "(query-memory-devices), and a MEMORY_DEVICE_SIZE_CHANGE reports it",
                result.reached
                and (result.progress.event_seconds is not None or result.plugged_change == 0),
                **result.to_json(),
            )
        )
        change = result.guest_total_change
        assert change is not None
        self.check(
            within(
                "G4",
                f"{what}: the guest's MemTotal moves by exactly the plugged change",
                expected=kib(result.plugged_change),
                seen=kib(change),
                tolerance=Tolerance(),
                unit="KiB",
            )
        )

    def check_buffer(self, when: str) -> None:
        report = self.helper.verify()
        moved = self.helper.gpas()
        self.check(
            holds(
                "G2",
                f"the guest's locked {LOCKED_MIB} MiB buffer keeps its pattern {when}",
                report.clean,
                bad_pages=report.bad_pages,
                first_bad_offset=report.first_bad_offset,
                pages_moved_since_hold=moved.moved,
            )
        )

    # --- the test -------------------------------------------------------------------------

    def test_plug_and_unplug_follow_on_both_sides(self) -> None:
        """G4 on plug; H2, G2, G4 on unplug and unplug-all; G3, H8 (module docstring)."""
        qmp = self.machine.qmp
        device = virtio_mem_device(qmp)
        expect = expect_discard(self.backing.info, "virtio-mem-unplug")
        self.log.info("device %s, expectation %s", device, expect)
        booted = guest_memory(self.guest)
        at_boot = self.backing.sample()

        plug = resize(qmp, PLUG, guest=self.guest, timeline=self.timeline)
        self.check_resize(plug, f"plug {PLUG // MiB} MiB")
        self.log.info(
            "plugged %d MiB in %.2f s; the device's backing holds %d MiB (boot: %d MiB)",
            plug.plugged_change // MiB, plug.progress.seconds,
            self.backing.sample().held // MiB, at_boot.held // MiB,
        )  # fmt: skip

        hold = self.helper.hold(mib=LOCKED_MIB, seed=SEED, lock=True)
        on_device = sum(1 for g in hold.gpas if g is not None and device.contains(g))
        self.timeline.record("guest", "hold", pages=hold.pages, on_virtio_mem=on_device)
        self.log.info("%d of %d locked pages live on the virtio-mem device", on_device,
                      hold.pages)  # fmt: skip
        self.check_buffer("once held")
        fill = guest_memory(self.guest).mem_available // MiB - FILL_MARGIN_MIB
        filled = MemHelper(ssh_runner(self.guest)).fill(fill)
        self.timeline.record("guest", "fill-and-free", mib=fill, fill_ms=filled.fill_ms)

        before = self.settled_backing("before unplugging")
        host_before = self.settled_host()
        trace_before = self.trace.totals()
        unplug = resize(qmp, PLUG - UNPLUG, guest=self.guest, timeline=self.timeline)
        discards = self.trace.totals().minus(trace_before)
        after = self.settled_backing("after unplugging")
        host_after = self.settled_host()
        self.check_resize(unplug, f"unplug {UNPLUG // MiB} MiB")
        for verdict in drop_verdicts("H2", "virtio-mem unplug", expect, UNPLUG, before, after):
            self.check(verdict)
        self.check(
            discard_verdict(
                "QEMU's trace: RAM discards succeeded on exactly the unplugged blocks",
                UNPLUG,
                discards.discarded_bytes,
                discards.failed_discards,
                trace=discards.to_json(),
            )
        )
        self.check(
            holds(
                "H2",
                "the guest asked QEMU to unplug (virtio_mem_unplug_request) and no discard failed",
                discards.count("virtio_mem_unplug_request") > 0 and discards.failed_discards == 0,
                trace=discards.to_json(),
            )
        )
        self.check(
            host_verdict(
                "H2", "virtio-mem unplug", self.counter, expected_host_move(before, after),
                host_before, host_after,
            )
        )  # fmt: skip
        self.check_buffer(f"after {UNPLUG // MiB} MiB were unplugged")

        emptied = resize(qmp, 0, guest=self.guest, timeline=self.timeline)
        self.check_resize(emptied, "unplug everything")
        empty = self.settled_backing("with nothing plugged")
        self.check(
            settled_or_incomplete(within(
                "H2",
                "with nothing plugged, the device's memory backend holds nothing on the host",
                expected=0,
                seen=kib(empty.held),
                tolerance=Tolerance(absolute=kib(2 * MiB)),
                unit="KiB",
                sample=empty.to_json(),
            ), empty)
        )  # fmt: skip
        assert emptied.guest_after is not None
        self.check(
            within(
                "G4",
                "with nothing plugged, the guest's MemTotal is back to its boot value",
                expected=kib(booted.mem_total),
                seen=kib(emptied.guest_after.mem_total),
                tolerance=Tolerance(),
                unit="KiB",
            )
        )
        self.check_buffer("after everything was unplugged")
        self.check_guest_log_clean()
        self.check_host_log_clean()
