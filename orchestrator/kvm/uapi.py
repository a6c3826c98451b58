"""The KVM userspace ABI that cvmlab uses: ioctl numbers, constants, struct layouts.

Everything here is data, in one place, each item with where it comes from, so a
reviewer can check it against the kernel without reading the code that uses it.

Sources (Linux 6.18 unless noted):
- `include/uapi/asm-generic/ioctl.h`: the `_IO/_IOW/_IOWR` encoding.
- `include/uapi/linux/kvm.h`: ioctls, capabilities, memslot flags, guest_memfd
  flags, memory attributes, binary stats header and descriptor.
- `arch/x86/include/uapi/asm/kvm.h`: x86 VM types.
- `include/uapi/linux/falloc.h`: fallocate modes.
- cvmlab research notes `research/interfaces.md` section 5: the same numbers
  computed with a C `sizeof`/`_IOW` build; `tests/test_kvm_uapi.py` checks
  this module against that table.
"""

from __future__ import annotations

import ctypes

# --- ioctl encoding: include/uapi/asm-generic/ioctl.h (x86 uses the generic one) ---
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def io(type_: int, nr: int) -> int:
    """`_IO(type, nr)`: an ioctl without an argument struct."""
    return _ioc(_IOC_NONE, type_, nr, 0)


def iow(type_: int, nr: int, size: int) -> int:
    """`_IOW(type, nr, T)` with `size == sizeof(T)`: userspace writes the struct."""
    return _ioc(_IOC_WRITE, type_, nr, size)


def ior(type_: int, nr: int, size: int) -> int:
    """`_IOR(type, nr, T)` with `size == sizeof(T)`: the kernel writes the struct."""
    return _ioc(_IOC_READ, type_, nr, size)


def iowr(type_: int, nr: int, size: int) -> int:
    """`_IOWR(type, nr, T)` with `size == sizeof(T)`: the struct goes both ways."""
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, size)


# --- include/uapi/linux/kvm.h ---
KVMIO = 0xAE
KVM_API_VERSION = 12  # "#define KVM_API_VERSION 12"; KVM_GET_API_VERSION must return it


class KvmCreateGuestMemfd(ctypes.Structure):
    """`struct kvm_create_guest_memfd` (kvm.h, since 6.8): 64 bytes."""

    _fields_ = (
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    )


class KvmUserspaceMemoryRegion2(ctypes.Structure):
    """`struct kvm_userspace_memory_region2` (kvm.h, since 6.8): 160 bytes."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("guest_memfd_offset", ctypes.c_uint64),
        ("guest_memfd", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
        ("pad2", ctypes.c_uint64 * 14),
    )


class KvmMemoryAttributes(ctypes.Structure):
    """`struct kvm_memory_attributes` (kvm.h, since 6.8): 32 bytes; flags must be 0."""

    _fields_ = (
        ("address", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("attributes", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class KvmStatsHeader(ctypes.Structure):
    """`struct kvm_stats_header` (kvm.h, since 5.14): 24 bytes at offset 0 of a stats fd."""

    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("name_size", ctypes.c_uint32),
        ("num_desc", ctypes.c_uint32),
        ("id_offset", ctypes.c_uint32),
        ("desc_offset", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint32),
    )


class KvmStatsDesc(ctypes.Structure):
    """`struct kvm_stats_desc` without its trailing `char name[name_size]`: 16 bytes."""

    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("exponent", ctypes.c_int16),
        ("size", ctypes.c_uint16),
        ("offset", ctypes.c_uint32),
        ("bucket_size", ctypes.c_uint32),
    )


# ioctls on /dev/kvm (system), on a VM fd, or on both (kvm.h).
KVM_GET_API_VERSION = io(KVMIO, 0x00)  # system
KVM_CREATE_VM = io(KVMIO, 0x01)  # system; arg = VM type; returns a VM fd
KVM_CHECK_EXTENSION = io(KVMIO, 0x03)  # system and VM fd; arg = capability
KVM_SET_USER_MEMORY_REGION2 = iow(KVMIO, 0x49, ctypes.sizeof(KvmUserspaceMemoryRegion2))
KVM_GET_STATS_FD = io(KVMIO, 0xCE)  # VM and vCPU fd; returns a read-only stats fd
KVM_SET_MEMORY_ATTRIBUTES = iow(KVMIO, 0xD2, ctypes.sizeof(KvmMemoryAttributes))  # VM fd
KVM_CREATE_GUEST_MEMFD = iowr(KVMIO, 0xD4, ctypes.sizeof(KvmCreateGuestMemfd))  # VM fd

# Capabilities (KVM_CHECK_EXTENSION arguments), kvm.h.
CAPS: dict[str, int] = {
    "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_NR_VCPUS": 9,
    "KVM_CAP_NR_MEMSLOTS": 10,
    "KVM_CAP_MAX_VCPUS": 66,
    "KVM_CAP_BINARY_STATS_FD": 203,
    "KVM_CAP_USER_MEMORY2": 231,
    "KVM_CAP_MEMORY_FAULT_INFO": 232,
    "KVM_CAP_MEMORY_ATTRIBUTES": 233,  # returns the supported attribute mask
    "KVM_CAP_GUEST_MEMFD": 234,
    "KVM_CAP_VM_TYPES": 235,  # returns a bitmask of (1 << type)
    "KVM_CAP_PRE_FAULT_MEMORY": 236,
    "KVM_CAP_GUEST_MEMFD_FLAGS": 244,  # 6.18; returns the supported flag mask
}
KVM_CAP_USER_MEMORY2 = CAPS["KVM_CAP_USER_MEMORY2"]
KVM_CAP_MEMORY_ATTRIBUTES = CAPS["KVM_CAP_MEMORY_ATTRIBUTES"]
KVM_CAP_GUEST_MEMFD = CAPS["KVM_CAP_GUEST_MEMFD"]
KVM_CAP_VM_TYPES = CAPS["KVM_CAP_VM_TYPES"]
KVM_CAP_GUEST_MEMFD_FLAGS = CAPS["KVM_CAP_GUEST_MEMFD_FLAGS"]
KVM_CAP_BINARY_STATS_FD = CAPS["KVM_CAP_BINARY_STATS_FD"]

# Memslot flags (kvm_userspace_memory_region2.flags), kvm.h.
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

# guest_memfd flags (kvm_create_guest_memfd.flags), kvm.h 6.18.
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
GMEM_FLAG_NAMES: dict[int, str] = {
    GUEST_MEMFD_FLAG_MMAP: "MMAP",
    GUEST_MEMFD_FLAG_INIT_SHARED: "INIT_SHARED",
}

# Memory attributes (kvm_memory_attributes.attributes), kvm.h.
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

# Binary stats descriptor flags, kvm.h.
KVM_STATS_TYPE_MASK = 0xF << 0
KVM_STATS_UNIT_MASK = 0xF << 4
KVM_STATS_BASE_MASK = 0xF << 8
STATS_TYPE_NAMES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear-hist", 4: "log-hist"}
STATS_UNIT_NAMES = {0: "none", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}

# --- arch/x86/include/uapi/asm/kvm.h: KVM_CREATE_VM types on x86 ---
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1  # CONFIG_KVM_SW_PROTECTED_VM, "development and testing only"
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5
VM_TYPE_NAMES: dict[int, str] = {
    KVM_X86_DEFAULT_VM: "KVM_X86_DEFAULT_VM",
    KVM_X86_SW_PROTECTED_VM: "KVM_X86_SW_PROTECTED_VM",
    KVM_X86_SEV_VM: "KVM_X86_SEV_VM",
    KVM_X86_SEV_ES_VM: "KVM_X86_SEV_ES_VM",
    KVM_X86_SNP_VM: "KVM_X86_SNP_VM",
    KVM_X86_TDX_VM: "KVM_X86_TDX_VM",
}

# --- include/uapi/linux/falloc.h ---
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def flag_names(flags: int, names: dict[int, str]) -> str:
    """`flags` spelled with `names` ("MMAP|INIT_SHARED"), unknown bits in hex, "0" if none."""
    parts = [name for bit, name in sorted(names.items()) if flags & bit]
    unknown = flags & ~sum(names)
    if unknown:
        parts.append(hex(unknown))
    return "|".join(parts) or "0"


def vm_types_in(mask: int) -> list[int]:
    """The VM type numbers set in a `KVM_CAP_VM_TYPES` bitmask."""
    return [bit for bit in range(64) if mask & (1 << bit)]


# --- vCPUs: include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h ---
# Sizes and offsets below were checked with a C build against linux-libc-dev 6.1
# (sizeof/offsetof), and `tests/test_kvm_vcpu.py` pins them.


class KvmRegs(ctypes.Structure):
    """`struct kvm_regs` (x86): the general registers, rip and rflags; 144 bytes."""

    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    )  # fmt: skip


class KvmSegment(ctypes.Structure):
    """`struct kvm_segment` (x86): a segment register's hidden state; 24 bytes."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class KvmDtable(ctypes.Structure):
    """`struct kvm_dtable` (x86): GDTR/IDTR; 16 bytes."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


class KvmSregs(ctypes.Structure):
    """`struct kvm_sregs` (x86): segments, descriptor tables, control registers; 312 bytes."""

    _fields_ = (
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),  # (KVM_NR_INTERRUPTS + 63) / 64
    )


class KvmPreFaultMemory(ctypes.Structure):
    """`struct kvm_pre_fault_memory` (kvm.h, 6.10): 64 bytes; gpa/size are updated in place."""

    _fields_ = (
        ("gpa", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("padding", ctypes.c_uint64 * 5),
    )


class KvmMemoryAttributes2(ctypes.Structure):
    """`struct kvm_memory_attributes2` of the in-place conversion RFC (not merged): 64 bytes.

    research/interfaces.md section 5: `KVM_SET_MEMORY_ATTRIBUTES2` on a
    guest_memfd fd, "[PATCH RFC v4 00/44] guest_memfd: In-place conversion".
    """

    _fields_ = (
        ("address", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("attributes", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 4),
    )


KVM_GET_VCPU_MMAP_SIZE = io(KVMIO, 0x04)  # system; size of the kvm_run mapping
KVM_CREATE_VCPU = io(KVMIO, 0x41)  # VM fd; arg = vCPU id; returns a vCPU fd
KVM_SET_TSS_ADDR = io(KVMIO, 0x47)  # VM fd; VMX needs it for real mode, harmless on SVM
KVM_RUN = io(KVMIO, 0x80)  # vCPU fd
KVM_GET_REGS = ior(KVMIO, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = iow(KVMIO, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = ior(KVMIO, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = iow(KVMIO, 0x84, ctypes.sizeof(KvmSregs))
KVM_PRE_FAULT_MEMORY = iowr(KVMIO, 0xD5, ctypes.sizeof(KvmPreFaultMemory))  # vCPU fd
# RFC only (see KvmMemoryAttributes2); 0xd6 is also claimed by an ARM proposal.
KVM_SET_MEMORY_ATTRIBUTES2 = iowr(KVMIO, 0xD6, ctypes.sizeof(KvmMemoryAttributes2))

CAPS["KVM_CAP_SET_TSS_ADDR"] = 4
KVM_CAP_PRE_FAULT_MEMORY = CAPS["KVM_CAP_PRE_FAULT_MEMORY"]
KVM_CAP_MEMORY_FAULT_INFO = CAPS["KVM_CAP_MEMORY_FAULT_INFO"]

# `struct kvm_run`: the fixed head, then a union of per-exit structs at offset 32.
RUN_IMMEDIATE_EXIT = 1  # __u8 immediate_exit (immediate_exit__unsafe in 6.13+)
RUN_EXIT_REASON = 8  # __u32 exit_reason
RUN_UNION = 32
# exit_reason values (enum in kvm.h).
EXIT_REASONS: dict[int, str] = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
    39: "MEMORY_FAULT",
}
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
# kvm_run.memory_fault.flags (kvm.h): the access was to private memory.
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# x86 control register bits (Intel SDM vol. 3 2.5; AMD APM vol. 2 3.1).
X86_CR0_PE = 1 << 0
