"""The KVM uAPI bindings: struct layouts and ioctl numbers against the research table,
capability facts and tiers, and the device objects on the real /dev/kvm when usable."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct

import pytest

from orchestrator.kvm import uapi
from orchestrator.kvm.child import CHILD_RAISED, run_in_child
from orchestrator.kvm.device import Kvm, KvmIoctlError, errno_name
from orchestrator.kvm.facts import (
    KvmFacts,
    gmem_tier,
    kvm_facts,
    private_memory_types,
    sw_protected_tier,
)
from orchestrator.kvm.mapping import PAGE_SIZE, Mapping
from orchestrator.kvm.stats import parse_layout

MiB = 1 << 20
FACTS = kvm_facts()
needs_kvm = pytest.mark.skipif(not FACTS.usable, reason=FACTS.reason or "no usable /dev/kvm")
needs_gmem = pytest.mark.skipif(not gmem_tier(FACTS)[0], reason=gmem_tier(FACTS)[1])

# --- layouts and numbers: research/interfaces.md section 5 ------------------------------


@pytest.mark.parametrize(
    ("struct_type", "size"),
    [
        (uapi.KvmCreateGuestMemfd, 64),
        (uapi.KvmUserspaceMemoryRegion2, 160),
        (uapi.KvmMemoryAttributes, 32),
        (uapi.KvmStatsHeader, 24),
        (uapi.KvmStatsDesc, 16),
    ],
)
def test_struct_size_matches_the_kernel(struct_type: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct_type) == size


def test_memory_region2_field_offsets_match_the_kernel() -> None:
    region = uapi.KvmUserspaceMemoryRegion2
    offsets = {name: getattr(region, name).offset for name, *_ in region._fields_}
    assert offsets == {
        "slot": 0,
        "flags": 4,
        "guest_phys_addr": 8,
        "memory_size": 16,
        "userspace_addr": 24,
        "guest_memfd_offset": 32,
        "guest_memfd": 40,
        "pad1": 44,
        "pad2": 48,
    }


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (uapi.KVM_GET_API_VERSION, 0xAE00),
        (uapi.KVM_CREATE_VM, 0xAE01),
        (uapi.KVM_CHECK_EXTENSION, 0xAE03),
        (uapi.KVM_SET_USER_MEMORY_REGION2, 0x40A0AE49),
        (uapi.KVM_SET_MEMORY_ATTRIBUTES, 0x4020AED2),
        (uapi.KVM_CREATE_GUEST_MEMFD, 0xC040AED4),
        (uapi.KVM_GET_STATS_FD, 0xAECE),
    ],
)
def test_ioctl_number_matches_the_research_table(number: int, expected: int) -> None:
    assert number == expected, f"{number:#x} != {expected:#x}"


def test_ioctl_encoding_of_other_table_rows() -> None:
    # Rows of the table this module does not bind, to check the encoder itself.
    assert uapi.iowr(uapi.KVMIO, 0xD5, 64) == 0xC040AED5  # KVM_PRE_FAULT_MEMORY
    assert uapi.iowr(uapi.KVMIO, 0xBA, 8) == 0xC008AEBA  # KVM_MEMORY_ENCRYPT_OP


def test_ioctl_size_overflow_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        uapi.iow(uapi.KVMIO, 1, 1 << 14)


RESEARCH_CAPS = {
    "KVM_CAP_USER_MEMORY2": 231,
    "KVM_CAP_MEMORY_FAULT_INFO": 232,
    "KVM_CAP_MEMORY_ATTRIBUTES": 233,
    "KVM_CAP_GUEST_MEMFD": 234,
    "KVM_CAP_VM_TYPES": 235,
    "KVM_CAP_PRE_FAULT_MEMORY": 236,
    "KVM_CAP_GUEST_MEMFD_FLAGS": 244,
    "KVM_CAP_BINARY_STATS_FD": 203,
}


@pytest.mark.parametrize(("name", "number"), sorted(RESEARCH_CAPS.items()))
def test_capability_number_matches_the_research_table(name: str, number: int) -> None:
    assert uapi.CAPS[name] == number


def test_flag_and_attribute_values_match_the_research_table() -> None:
    assert uapi.KVM_MEM_GUEST_MEMFD == 1 << 2
    assert uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE == 1 << 3
    assert (uapi.GUEST_MEMFD_FLAG_MMAP, uapi.GUEST_MEMFD_FLAG_INIT_SHARED) == (1, 2)
    assert (uapi.KVM_X86_SW_PROTECTED_VM, uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM) == (1, 4, 5)


def test_flag_names_spell_known_and_unknown_bits() -> None:
    assert uapi.flag_names(3, uapi.GMEM_FLAG_NAMES) == "MMAP|INIT_SHARED"
    assert uapi.flag_names(0, uapi.GMEM_FLAG_NAMES) == "0"
    assert uapi.flag_names(5, uapi.GMEM_FLAG_NAMES) == "MMAP|0x4"


def test_vm_types_in_decodes_typical_masks() -> None:
    assert uapi.vm_types_in(0x1D) == [0, 2, 3, 4]  # SNP host
    assert uapi.vm_types_in(0x21) == [0, 5]  # TDX host


def test_errno_name_prefers_the_kernel_spelling() -> None:
    assert errno_name(errno.EINVAL) == "EINVAL"
    assert errno_name(errno.EOPNOTSUPP) == "EOPNOTSUPP"
    assert errno_name(100000) == "errno 100000"


# --- facts and tiers --------------------------------------------------------------------


def _facts(**changes: object) -> KvmFacts:
    base: dict[str, object] = {
        "device": "/dev/kvm",
        "usable": True,
        "reason": "",
        "api_version": 12,
        "caps": {"KVM_CAP_GUEST_MEMFD": 1, "KVM_CAP_USER_MEMORY2": 1},
        "vm_types": 1,
        "gmem_flags": 3,
        "memory_attributes": {0: 0},
    }
    base.update(changes)
    return KvmFacts(**base)  # type: ignore[arg-type]


def test_missing_device_is_unusable_with_a_reason_and_does_not_raise() -> None:
    facts = kvm_facts("/nonexistent/kvm")
    assert not facts.usable
    assert "does not exist" in facts.reason
    assert gmem_tier(facts) == (False, facts.reason)


def test_a_device_that_is_not_kvm_is_unusable() -> None:
    facts = kvm_facts("/dev/null")
    assert not facts.usable
    assert "KVM_GET_API_VERSION" in facts.reason


def test_gmem_tier_names_its_evidence() -> None:
    available, evidence = gmem_tier(_facts())
    assert available
    assert "KVM_CAP_GUEST_MEMFD=1" in evidence and "MMAP|INIT_SHARED" in evidence


def test_gmem_tier_is_absent_without_the_capability() -> None:
    available, reason = gmem_tier(_facts(caps={"KVM_CAP_USER_MEMORY2": 1}))
    assert not available and "KVM_CAP_GUEST_MEMFD is 0" in reason


def test_gmem_tier_is_absent_when_no_vm_can_be_created() -> None:
    available, reason = gmem_tier(_facts(memory_attributes={}, vm_errors={0: "ENOMEM"}))
    assert not available and "ENOMEM" in reason


def test_sw_protected_tier_needs_the_vm_type_bit() -> None:
    available, reason = sw_protected_tier(_facts())
    assert not available and "CONFIG_KVM_SW_PROTECTED_VM" in reason


def test_sw_protected_tier_needs_the_private_attribute() -> None:
    available, reason = sw_protected_tier(_facts(vm_types=0x3, memory_attributes={0: 0, 1: 0}))
    assert not available and "KVM_MEMORY_ATTRIBUTE_PRIVATE" in reason
    ok, evidence = sw_protected_tier(_facts(vm_types=0x3, memory_attributes={0: 0, 1: 8}))
    assert ok and "0x8" in evidence


def test_private_memory_types_prefer_sw_protected() -> None:
    facts = _facts(vm_types=0x33, memory_attributes={0: 0, 1: 8, 4: 8, 5: 8})
    assert private_memory_types(facts) == [1, 4, 5]
    assert private_memory_types(_facts()) == []


@needs_kvm
def test_real_facts_report_api_12_and_a_default_vm() -> None:
    assert FACTS.api_version == 12
    assert 0 in FACTS.memory_attributes
    assert FACTS.caps["KVM_CAP_NR_MEMSLOTS"] > 0


# --- device objects on the real /dev/kvm ------------------------------------------------


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as error:
        assert error.errno == errno.EBADF
        return False
    return True


@needs_gmem
def test_every_fd_is_closed_when_the_with_block_ends() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(MiB) as gmem:
        fds = (kvm.fd, vm.fd, gmem.fd)
        assert all(_fd_is_open(fd) for fd in fds)
        assert not os.get_inheritable(gmem.fd)
    assert not any(_fd_is_open(fd) for fd in fds)
    gmem.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        _ = gmem.fd


@needs_gmem
def test_refused_ioctl_keeps_the_errno_and_names_the_call() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, pytest.raises(KvmIoctlError) as caught:
        vm.create_guest_memfd(0)
    assert caught.value.errno == errno.EINVAL
    assert "KVM_CREATE_GUEST_MEMFD(size=0" in str(caught.value)


@needs_kvm
def test_vm_stats_are_readable_by_name() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, vm.stats() as stats:
        assert stats.id == f"kvm-{os.getpid()}"
        assert "pages_4k" in stats.names
        assert stats.read("pages_4k") >= 0
        assert set(stats.read_all()) == set(stats.names)
        with pytest.raises(KeyError, match="no KVM statistic"):
            stats.read("no_such_stat")


def test_stats_layout_parses_a_synthetic_blob() -> None:
    name_size = 16
    header = struct.pack("<6I", 0, name_size, 2, 24, 24 + name_size, 200)
    ident = b"kvm-42".ljust(name_size, b"\0")
    descs = b"".join(
        struct.pack("<IhHII", flags, 0, size, offset, 0) + name.ljust(name_size, b"\0")
        for flags, size, offset, name in ((0, 1, 0, b"pages_4k"), (0x12, 1, 8, b"peak_bytes"))
    )
    layout = parse_layout(header + ident + descs)
    assert layout.id == "kvm-42"
    assert layout.data_offset == 200
    assert [d.name for d in layout.descriptors.values()] == ["pages_4k", "peak_bytes"]
    peak = layout.descriptors["peak_bytes"]
    assert (peak.kind, peak.unit, peak.offset) == ("peak", "bytes", 8)


# --- mappings and children --------------------------------------------------------------


def test_anonymous_mapping_reads_back_what_was_written() -> None:
    with Mapping.anonymous(2 * PAGE_SIZE) as mapping:
        mapping.write(PAGE_SIZE - 2, b"abcd")
        assert mapping.read(PAGE_SIZE - 2, 4) == b"abcd"
        with pytest.raises(IndexError):
            mapping.read(2 * PAGE_SIZE - 1, 2)
    assert mapping.closed


def test_child_exit_status_is_reported() -> None:
    outcome = run_in_child(lambda: None, timeout=10)
    assert (outcome.exit_code, outcome.signal_number, outcome.timed_out) == (0, None, False)


def test_child_that_raises_is_reported() -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    assert run_in_child(boom, timeout=10).exit_code == CHILD_RAISED


def test_child_killed_by_sigbus_is_reported() -> None:
    outcome = run_in_child(lambda: os.kill(os.getpid(), signal.SIGBUS), timeout=10)
    assert outcome.signal_number == signal.SIGBUS
    assert outcome.killed_by == "SIGBUS"


def test_child_past_its_deadline_is_killed_and_reaped() -> None:
    outcome = run_in_child(signal.pause, timeout=0.2)
    assert outcome.timed_out and outcome.signal_number == signal.SIGKILL
    with pytest.raises(ChildProcessError):
        os.waitpid(outcome.pid, os.WNOHANG)
