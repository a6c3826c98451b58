"""The tiny-guest harness: layouts and ioctl numbers (checked with a C build against
linux-libc-dev), the guest-code table against GNU as, exit decoding, and real runs on
/dev/kvm where a VM with a vCPU can run (even a paravirtual kvm_pvm runs these guests)."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from orchestrator.kvm import guest_code, uapi
from orchestrator.kvm.device import Kvm, KvmIoctlError
from orchestrator.kvm.facts import kvm_facts
from orchestrator.kvm.mapping import Mapping
from orchestrator.kvm.vcpu import (
    CODE_GPA,
    DATA_GPA,
    TEST_GPA,
    HarnessError,
    RunawayGuest,
    TinyVm,
    parse_exit,
)

FACTS = kvm_facts()
needs_kvm = pytest.mark.skipif(not FACTS.usable, reason=FACTS.reason or "no usable /dev/kvm")
MiB = 1 << 20


@pytest.mark.parametrize(
    ("struct_type", "size"),
    [(uapi.KvmRegs, 144), (uapi.KvmSegment, 24), (uapi.KvmDtable, 16), (uapi.KvmSregs, 312),
     (uapi.KvmPreFaultMemory, 64), (uapi.KvmMemoryAttributes2, 64)],
)  # fmt: skip
def test_vcpu_struct_sizes_match_the_kernel(struct_type: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct_type) == size


def test_sregs_offsets_match_the_kernel() -> None:
    assert uapi.KvmSregs.gdt.offset == 192
    assert uapi.KvmSregs.cr0.offset == 224
    assert uapi.KvmSregs.efer.offset == 264


@pytest.mark.parametrize(
    ("number", "expected"),
    [(uapi.KVM_RUN, 0xAE80), (uapi.KVM_CREATE_VCPU, 0xAE41),
     (uapi.KVM_GET_VCPU_MMAP_SIZE, 0xAE04), (uapi.KVM_GET_REGS, 0x8090AE81),
     (uapi.KVM_SET_REGS, 0x4090AE82), (uapi.KVM_GET_SREGS, 0x8138AE83),
     (uapi.KVM_SET_SREGS, 0x4138AE84), (uapi.KVM_SET_TSS_ADDR, 0xAE47),
     (uapi.KVM_PRE_FAULT_MEMORY, 0xC040AED5)],
)  # fmt: skip
def test_vcpu_ioctl_numbers_match_the_kernel(number: int, expected: int) -> None:
    assert number == expected, f"{number:#x} != {expected:#x}"


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")
@pytest.mark.parametrize("program", sorted(guest_code.PROGRAMS))
def test_guest_code_bytes_are_what_the_assembly_says(program: str, tmp_path: Path) -> None:
    entry = guest_code.PROGRAMS[program]
    source = tmp_path / "p.s"
    source.write_text(f".intel_syntax noprefix\n.code32\n{entry.assembly}\n")
    subprocess.run(["as", "--32", "-o", str(tmp_path / "p.o"), str(source)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "p.o"),
                    str(tmp_path / "p.bin")], check=True)  # fmt: skip
    assert (tmp_path / "p.bin").read_bytes() == entry.code


def _run_area(reason: int, union: bytes, extra: bytes = b"") -> bytes:
    head = bytearray(32)
    struct.pack_into("<I", head, uapi.RUN_EXIT_REASON, reason)
    body = bytes(head) + union
    return body + bytes(256 - len(body)) + extra


def test_parse_exit_decodes_io_with_its_value() -> None:
    run = _run_area(
        uapi.KVM_EXIT_IO, struct.pack("<BBHIQ", 1, 4, 0x5E, 1, 256), b"\x78\x56\x34\x12"
    )
    exit_ = parse_exit(run)
    assert exit_.name == "IO"
    assert exit_.detail == {"direction": "out", "port": 0x5E, "size": 4, "count": 1,
                            "value": 0x12345678}  # fmt: skip


def test_parse_exit_decodes_memory_fault() -> None:
    run = _run_area(uapi.KVM_EXIT_MEMORY_FAULT, struct.pack("<QQQ", 8, 0x10000000, 4096))
    exit_ = parse_exit(run, errno.EFAULT)
    assert exit_.name == "MEMORY_FAULT"
    assert exit_.detail == {"flags": 8, "gpa": 0x10000000, "size": 4096}
    assert "gpa=0x10000000" in exit_.describe()


def test_parse_exit_decodes_mmio() -> None:
    run = _run_area(uapi.KVM_EXIT_MMIO, struct.pack("<Q8sIB", 0x2000, b"\x01\x02\x03\x04", 4, 0))
    assert parse_exit(run).detail == {"gpa": 0x2000, "size": 4, "write": False, "data": "01020304"}


@needs_kvm
def test_guest_writes_and_host_reads_back_on_real_kvm() -> None:
    with Kvm(FACTS.device) as kvm, TinyVm(kvm) as tiny, Mapping.anonymous(MiB) as memory:
        tiny.add_slot(1, TEST_GPA, MiB, memory)
        tiny.run(guest_code.FILL_PAGES, timeout=30, edi=TEST_GPA, ecx=8, eax=0x100)
        assert [int.from_bytes(memory.read(p * 4096, 4), "little") for p in range(8)] == [
            0x100 + p for p in range(8)
        ]
        exit_ = tiny.run(guest_code.COPY_PAGES, timeout=30, esi=TEST_GPA, ecx=8, edi=DATA_GPA)
        assert exit_.name == "HLT"
        assert tiny.read_dwords(DATA_GPA, 8) == [0x100 + p for p in range(8)]


@needs_kvm
def test_a_runaway_guest_is_stopped_at_its_deadline_with_its_registers() -> None:
    with Kvm(FACTS.device) as kvm, TinyVm(kvm) as tiny:
        with pytest.raises(RunawayGuest) as raised:
            tiny.run(guest_code.SPIN, timeout=0.5)
        assert raised.value.registers["rip"] == CODE_GPA
        assert "rip=0x1000" in str(raised.value)


@needs_kvm
def test_nonsense_is_refused_with_the_kernels_errno_and_the_call() -> None:
    with Kvm(FACTS.device) as kvm, TinyVm(kvm) as tiny, Mapping.anonymous(MiB) as memory:
        with pytest.raises(KvmIoctlError) as raised:  # overlaps the code slot
            tiny.add_slot(1, 0, MiB, memory)
        assert raised.value.errno == errno.EEXIST
        assert "KVM_SET_USER_MEMORY_REGION2(slot=1" in str(raised.value)
        with pytest.raises(HarnessError, match="not inside one memslot"):
            tiny.read(TEST_GPA, 4)
        with pytest.raises(HarnessError, match="does not fit"):
            tiny.add_slot(2, TEST_GPA, 2 * MiB, memory)


@needs_kvm
def test_the_harness_leaves_no_fd_behind() -> None:
    before = set(os.listdir("/proc/self/fd"))
    with Kvm(FACTS.device) as kvm, TinyVm(kvm) as tiny:
        tiny.run(guest_code.HLT, timeout=30)
    assert set(os.listdir("/proc/self/fd")) == before


@needs_kvm
def test_the_deadline_works_when_the_vcpu_runs_outside_the_main_thread() -> None:
    """avocado runs test methods outside the main thread: the kick handler must not need it."""
    seen: list[BaseException] = []

    def body() -> None:
        with Kvm(FACTS.device) as kvm, TinyVm(kvm) as tiny:
            try:
                tiny.run(guest_code.SPIN, timeout=0.5)
            except RunawayGuest as exc:
                seen.append(exc)

    runner = threading.Thread(target=body)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert len(seen) == 1 and isinstance(seen[0], RunawayGuest)
