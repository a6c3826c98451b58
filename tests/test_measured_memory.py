"""orchestrator.memory.measured: MemoryScenario's logic without avocado.

`host_shortfall`/`claim_host` are fed /proc/meminfo texts (no huge page is ever reserved
by a test: that changes the host for everyone); `MeasuredMemory` runs against a real
guest under QEMU, as `cvmlab repro` or a pytest would use it: the backing, the guest
helper and QEMU's memory trace, stopped idempotently with nothing left following.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from orchestrator.errors import HostError
from orchestrator.image import ImageManifest
from orchestrator.memory.measured import (
    MeasuredMemory,
    claim_host,
    host_shortfall,
    judges_host_counter,
)
from orchestrator.qemu.argv import RAM_ID
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.spec import KernelBoot, MachineSpec, spec_from_params
from orchestrator.qemu.trace import trace_output
from orchestrator.timeline import Timeline
from orchestrator.units import MiB

BOOT = KernelBoot(kernel="/k", initrd="/i", cmdline="console=ttyS0")


def meminfo(tmp_path: Path, free_huge: int) -> str:
    path = tmp_path / "meminfo"
    path.write_text(
        "MemTotal:       24000000 kB\n"
        f"HugePages_Total:  {free_huge}\nHugePages_Free:   {free_huge}\n"
        "Hugepagesize:       2048 kB\n"
    )
    return str(path)


def hugetlb_spec() -> MachineSpec:
    return spec_from_params({"backend": "memfd", "hugetlb": "on", "memory": "512M"}, boot=BOOT)


def test_a_hugetlb_variant_without_free_huge_pages_is_refused_with_the_count_and_the_fix(
    tmp_path: Path,
) -> None:
    reason = host_shortfall(hugetlb_spec(), meminfo(tmp_path, 0))
    assert reason is not None and "needs 256" in reason and "nr_hugepages" in reason
    with pytest.raises(HostError, match="needs 256"):
        claim_host(hugetlb_spec(), timeout=1, meminfo=meminfo(tmp_path, 0))


def test_enough_huge_pages_or_none_needed_is_no_shortfall(tmp_path: Path) -> None:
    assert host_shortfall(hugetlb_spec(), meminfo(tmp_path, 256)) is None
    plain = spec_from_params({"backend": "memfd", "memory": "512M"}, boot=BOOT)
    assert host_shortfall(plain, meminfo(tmp_path, 0)) is None


@pytest.mark.vm
def test_only_huge_page_backends_judge_a_host_wide_counter_and_take_the_host_lock() -> None:
    assert judges_host_counter(hugetlb_spec())
    vmem_hugetlb = spec_from_params(
        {"memory": "512M", "virtio_mem_size": "256M", "virtio_mem_backend": "memfd",
         "virtio_mem_hugetlb": "on"}, boot=BOOT,
    )  # fmt: skip
    assert judges_host_counter(vmem_hugetlb)
    for backend in ({"backend": "memfd"}, {"backend": "anon"},
                    {"backend": "file", "mem_path": "/dev/shm"}):  # fmt: skip
        plain = spec_from_params({**backend, "memory": "512M"}, boot=BOOT)
        assert not judges_host_counter(plain), backend


def test_measured_memory_follows_a_real_guest_and_stops_once(
    guest_image: ImageManifest, evidence_dir: Path, qemu_binary: str
) -> None:
    boot = KernelBoot(
        kernel=str(guest_image.kernel), initrd=str(guest_image.initrd),
        cmdline=guest_image.cmdline,
    )  # fmt: skip
    spec = spec_from_params({"backend": "memfd", "memory": "512M", "balloon": "on"}, boot=boot)
    threads_before = set(threading.enumerate())
    timeline = Timeline(evidence_dir / "timeline.jsonl")
    with timeline, Machine(
        spec, evidence_dir, binary=qemu_binary, timeline=timeline,
        ready_marker=guest_image.ready_marker,
    ) as machine:  # fmt: skip
        machine.start()
        machine.wait_ready()
        shell = machine.ssh(guest_image.ssh_user, guest_image.ssh_key, guest_image.host_key)
        memory = MeasuredMemory(
            machine.qmp, machine.pid, shell, RAM_ID,
            trace_output(evidence_dir, spec.trace_events), timeline,
        )  # fmt: skip
        assert memory.stop() is None  # not started: nothing to stop
        with memory:
            assert memory.counter == "Shmem" and memory.backing.info.label == "memfd"
            before = memory.settled_backing("before holding")
            hold = memory.helper.hold(mib=32, seed=7, lock=True)
            assert hold.pages == 32 * MiB // 4096
            after = memory.settled_backing("holding 32 MiB")
            # Settled or not, a sample says which (None would mean "never waited").
            assert before.settled is not None and after.settled is not None
            if before.settled and after.settled:
                assert after.held >= before.held  # the guest's pages are backed now
            assert memory.settled_host().samples
        assert memory.stop() is None  # the with block stopped it: once
    # The trace follower ended with stop() (the launcher's process spawner is shared).
    left = [t.name for t in set(threading.enumerate()) - threads_before]
    assert not [name for name in left if name.startswith("cvmlab-trace")], left
