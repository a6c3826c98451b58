"""Boot: the guest is what was asked for, reachable, and healthy.

Runs over the backends of `scenarios/variants/backends.yaml`:
    avocado run scenarios/boot.py -m scenarios/variants/backends.yaml
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from orchestrator.invariants.verdict import Tolerance, holds, within
from orchestrator.machine_scenario import MachineScenario
from orchestrator.qemu.argv import RAM_ID
from orchestrator.qemu.spec import AnonBackend, FileBackend, MemfdBackend
from orchestrator.units import MiB

QOM_TYPE = {
    "anon": "memory-backend-ram",
    "memfd": "memory-backend-memfd",
    "file": "memory-backend-file",
}

# "Memory: 472540K/523768K available (...)": the second figure is all RAM the
# kernel found in the firmware's memory map (mm/mm_init.c, mem_init_print_info).
KERNEL_MEMORY_RE = re.compile(r"Memory: \d+K/(\d+)K available")


class Boot(MachineScenario):
    """
    :avocado: enable
    :avocado: tags=smoke,boot,tier:tcg,tier:kvm
    """

    timeout = 300
    # G1 reads the RAM the kernel found while booting; a restore would show the
    # snapshot's boot log, not this QEMU's.
    cold_boot = "G1 judges what the guest kernel found at boot (its 'Memory:' line)"

    def test_guest_gets_the_requested_memory_on_the_requested_backend(self) -> None:
        """G1/G3 for a plain guest: memory size and backend as asked, guest log clean."""
        spec = self.spec
        backend = spec.backend

        # G1: the guest kernel found the RAM we gave it. The firmware keeps the
        # legacy hole below 1 MiB and a few pages of ACPI tables, so allow 2 MiB.
        dmesg = self.guest.run("dmesg").stdout
        match = KERNEL_MEMORY_RE.search(dmesg)
        self.assertIsNotNone(match, "the guest kernel printed no 'Memory: .../...K available' line")
        assert match is not None
        self.check(
            within(
                "G1",
                "RAM the guest kernel found equals the spec's memory",
                expected=spec.memory // 1024,
                seen=int(match.group(1)),
                tolerance=Tolerance(absolute=2 * MiB // 1024),
                unit="KiB",
            )
        )
        meminfo = self.guest.run(["cat", "/proc/meminfo"]).stdout
        total = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
        self.assertIsNotNone(total, "the guest's /proc/meminfo has no MemTotal line")
        assert total is not None
        mem_total_kib = int(total.group(1))
        self.check(
            holds(
                "G1",
                "MemTotal is positive and no larger than the spec's memory",
                0 < mem_total_kib * 1024 <= spec.memory,
                mem_total_kib=mem_total_kib,
                spec_kib=spec.memory // 1024,
            )
        )

        # QEMU built the backend we asked for (QMP), and the host sees it (/proc).
        qom_type = self.machine.qmp.execute(
            "qom-get", {"path": f"/objects/{RAM_ID}", "property": "type"}
        )
        memdevs = {m["id"]: m for m in self.machine.qmp.execute("query-memdev")}
        ram = memdevs[RAM_ID]
        self.check(
            holds(
                "G1",
                f"QEMU's guest RAM is {QOM_TYPE[backend.kind]} of {spec.memory // MiB} MiB"
                f" with share={backend.share}",
                qom_type == QOM_TYPE[backend.kind]
                and ram["size"] == spec.memory
                and ram["share"] == backend.share,
                qom_type=qom_type,
                memdev=ram,
            )
        )
        fd_targets = [os.readlink(p) for p in Path(f"/proc/{self.machine.pid}/fd").iterdir()]
        if isinstance(backend, MemfdBackend):
            backing = [t for t in fd_targets if t.startswith("/memfd:")]
        elif isinstance(backend, FileBackend):
            backing = [t for t in fd_targets if t.startswith(backend.mem_path.rstrip("/") + "/")]
        else:
            assert isinstance(backend, AnonBackend)
            backing = [t for t in fd_targets if t.startswith(("/memfd:", "/dev/shm/"))]
        wants_fd = not isinstance(backend, AnonBackend)
        self.check(
            holds(
                "G1",
                "QEMU holds a backing fd" if wants_fd else "anonymous RAM has no backing fd",
                bool(backing) == wants_fd,
                backing_fds=backing,
            )
        )

        # G3 and H8: nothing went wrong in the guest kernel, nor in the host kernel.
        self.check_guest_log_clean()
        self.check_host_log_clean()
