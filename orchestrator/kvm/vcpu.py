"""A tiny-guest harness: one VM, one vCPU, a few instructions, memslots on any memory.

The shape of the KVM selftests' `kvm_util` (create a VM and vCPU, add memslots,
load guest code, run to an exit, read and write guest memory from the host),
written in Python rather than as a static C helper because:
- the scenarios judge in Python anyway, and every KVM object here is an fd
  owned by an object that closes it (`device.KvmFd`): no second process to
  reap, no protocol to parse, nothing to build per kernel;
- `KVM_RUN` goes through ctypes, which releases the GIL, so host threads
  (punchers, pinners) really run while the vCPU does;
- a failing ioctl raises `KvmIoctlError` naming the call and the kernel's
  errno, which is what uAPI tests compare.

Guest code (`guest_code.py`) runs in flat 32-bit protected mode without
paging, so a GPA is a plain address. Layout of a `TinyVm`:

    GPA 0 .. 1 MiB      slot 0, anonymous memory: code at CODE_GPA, data at DATA_GPA
    GPA TEST_GPA ..     the memory under test (guest_memfd, memfd, ...), added by the test

A run has a deadline: past it, a watchdog sets `kvm_run.immediate_exit` and
signals the vCPU's thread until `KVM_RUN` returns (`KVM_EXIT_INTR`); a
runaway guest is then reported with its registers (`RunawayGuest`).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from orchestrator.errors import CvmlabError
from orchestrator.kvm import uapi
from orchestrator.kvm.device import GuestMemfd, Kvm, KvmFd, KvmIoctlError
from orchestrator.kvm.guest_code import GuestProgram
from orchestrator.kvm.mapping import PAGE_SIZE, Mapping

MiB = 1 << 20
LOW_SLOT = 0
LOW_SIZE = 1 * MiB
CODE_GPA = 0x1000
DATA_GPA = 0x10000
DATA_SIZE = LOW_SIZE - DATA_GPA
TEST_GPA = 0x1000_0000
# Where VMX keeps its real-mode TSS (three pages); outside every slot we use.
TSS_GPA = 0x7FFB_D000

# The signal that interrupts KVM_RUN at a deadline. A real-time signal: nothing
# else in cvmlab or avocado uses it, and its handler only has to exist.
KICK_SIGNAL = signal.SIGRTMIN + 3
# How often the watchdog re-signals a vCPU thread that has not left KVM_RUN yet
# (a signal that lands just before the thread enters KVM_RUN is otherwise lost).
KICK_INTERVAL = 0.02

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_ioctl.restype = ctypes.c_int

_R = TypeVar("_R", bound=KvmFd | Mapping)
REGISTER_NAMES: tuple[str, ...] = tuple(str(entry[0]) for entry in uapi.KvmRegs._fields_)


class HarnessError(CvmlabError):
    """The tiny-guest harness was asked something it cannot do (a bad layout, a GPA
    outside every slot), or the guest did not end the way the test needs."""


class RunawayGuest(HarnessError):
    """The guest was still running at its deadline; `registers` are where it was."""

    def __init__(self, program: str, timeout: float, registers: dict[str, int]) -> None:
        self.registers = registers
        super().__init__(
            f"guest program {program!r} still ran after {timeout:g} s and was stopped "
            f"({format_registers(registers)})",
            "the guest loops: check its inputs (ecx = 0 loops 2^32 times) or raise the deadline",
        )


def format_registers(registers: dict[str, int]) -> str:
    """ "rip=0x1004 rax=0x0 ..." with rip first: the place a runaway guest was stopped."""
    order = ["rip", *(name for name in REGISTER_NAMES if name != "rip")]
    return " ".join(f"{name}={registers[name]:#x}" for name in order if name in registers)


@dataclass(frozen=True)
class VcpuExit:
    """Why `KVM_RUN` returned, decoded from `kvm_run` (kvm.h `struct kvm_run`)."""

    reason: int
    errno: int = 0  # KVM_RUN's errno (EFAULT with MEMORY_FAULT, EINTR with INTR), 0 on success
    timed_out: bool = False  # the harness's deadline stopped the run
    detail: dict[str, Any] = field(default_factory=dict)
    registers: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return uapi.EXIT_REASONS.get(self.reason, f"exit {self.reason}")

    def describe(self) -> str:
        parts = [f"KVM_EXIT_{self.name}"]
        parts += [
            f"{key}={value:#x}" if isinstance(value, int) and key != "size" else f"{key}={value}"
            for key, value in self.detail.items()
        ]
        if self.timed_out:
            parts.append("(deadline)")
        if self.registers:
            parts.append(f"[{format_registers(self.registers)}]")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "exit": self.name,
            "errno": self.errno,
            "timed_out": self.timed_out,
            **self.detail,
            "registers": {key: hex(value) for key, value in self.registers.items()},
        }


def parse_exit(run: bytes, err: int = 0, timed_out: bool = False) -> VcpuExit:
    """Decode the head and exit union of a `kvm_run` copy (pure, for tests too).

    Offsets (kvm.h): exit_reason at 8, the union at 32. io: direction u8,
    size u8, port u16, count u32, data_offset u64 (into kvm_run). mmio:
    phys_addr u64, data[8], len u32, is_write u8. memory_fault: flags, gpa,
    size (u64 each). internal: suberror u32, ndata u32. fail_entry:
    hardware_entry_failure_reason u64, cpu u32.
    """
    (reason,) = struct.unpack_from("<I", run, uapi.RUN_EXIT_REASON)
    base = uapi.RUN_UNION
    detail: dict[str, Any] = {}
    if reason == uapi.KVM_EXIT_IO:
        direction, size, port, count, data_offset = struct.unpack_from("<BBHIQ", run, base)
        detail = {"direction": "out" if direction == uapi.KVM_EXIT_IO_OUT else "in",
                  "port": port, "size": size, "count": count}  # fmt: skip
        if data_offset + size <= len(run) and size in (1, 2, 4):
            fmt = {1: "<B", 2: "<H", 4: "<I"}[size]
            (detail["value"],) = struct.unpack_from(fmt, run, data_offset)
    elif reason == uapi.KVM_EXIT_MMIO:
        phys_addr, data, length, is_write = struct.unpack_from("<Q8sIB", run, base)
        detail = {"gpa": phys_addr, "size": length, "write": bool(is_write),
                  "data": data[:length].hex()}  # fmt: skip
    elif reason == uapi.KVM_EXIT_MEMORY_FAULT:
        flags, gpa, size = struct.unpack_from("<QQQ", run, base)
        detail = {"flags": flags, "gpa": gpa, "size": size}
    elif reason == uapi.KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = struct.unpack_from("<II", run, base)
        detail = {"suberror": suberror, "ndata": ndata}
    elif reason == 9:  # FAIL_ENTRY
        hw_reason, cpu = struct.unpack_from("<QI", run, base)
        detail = {"hardware_entry_failure_reason": hw_reason, "cpu": cpu}
    return VcpuExit(reason, err, timed_out, detail)


class _Sigaction(ctypes.Structure):
    """glibc's `struct sigaction` on x86-64 (bits/sigaction.h): 152 bytes."""

    _fields_ = (
        ("sa_handler", ctypes.c_void_p),
        ("sa_mask", ctypes.c_ulong * 16),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    )


_sigaction = _libc.sigaction
_sigaction.argtypes = (ctypes.c_int, ctypes.POINTER(_Sigaction), ctypes.POINTER(_Sigaction))
_sigaction.restype = ctypes.c_int


def _install_kick_handler() -> None:
    """Give KICK_SIGNAL a do-nothing C handler, so it interrupts KVM_RUN instead of killing.

    Python's `signal.signal` works only in the main thread, and avocado runs a
    test method in another one; sigaction(2) is process-wide and callable from
    any thread. The handler must be a C function that is safe in signal
    context and ignores its argument: libc's `getpid` is both (a Python
    callback would take the GIL inside a signal handler). No SA_RESTART, so
    the signal ends KVM_RUN with EINTR. An existing handler is kept.
    """
    old = _Sigaction()
    if _sigaction(KICK_SIGNAL, None, ctypes.byref(old)) != 0:
        err = ctypes.get_errno()
        raise KvmIoctlError(err, f"sigaction({KICK_SIGNAL})")
    if old.sa_handler not in (None, 0):  # SIG_DFL is 0: anything else is a handler already
        return
    action = _Sigaction()
    action.sa_handler = ctypes.cast(_libc.getpid, ctypes.c_void_p).value
    if _sigaction(KICK_SIGNAL, ctypes.byref(action), None) != 0:
        err = ctypes.get_errno()
        raise KvmIoctlError(err, f"sigaction({KICK_SIGNAL})")


class Vcpu(KvmFd):
    """A vCPU fd from `KVM_CREATE_VCPU` with its `kvm_run` area mapped."""

    _kind = "vCPU fd"

    def __init__(self, fd: int, vcpu_id: int, run_size: int) -> None:
        super().__init__(fd)
        self.vcpu_id = vcpu_id
        try:
            _install_kick_handler()
        except BaseException:
            super().close()
            raise
        try:
            self._run = mmap.mmap(fd, run_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        except OSError as exc:
            super().close()
            raise KvmIoctlError(exc.errno or 0, f"mmap(vCPU {vcpu_id} kvm_run)") from None

    def close(self) -> None:
        if not self.closed:
            self._run.close()
        super().close()

    def get_regs(self) -> uapi.KvmRegs:
        regs = uapi.KvmRegs()
        self._ioctl("KVM_GET_REGS", uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.KvmRegs) -> None:
        self._ioctl("KVM_SET_REGS", uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.KvmSregs:
        sregs = uapi.KvmSregs()
        self._ioctl("KVM_GET_SREGS", uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.KvmSregs) -> None:
        self._ioctl("KVM_SET_SREGS", uapi.KVM_SET_SREGS, sregs)

    def registers(self) -> dict[str, int]:
        """The general registers, rip and rflags by name."""
        regs = self.get_regs()
        return {name: int(getattr(regs, name)) for name in REGISTER_NAMES}

    def enter_flat_protected_mode(self, entry: int, **inputs: int) -> None:
        """CR0.PE with flat 4 GiB code/data segments, rip = `entry`, registers from `inputs`.

        Segment caches are written through KVM_SET_SREGS, so no GDT is needed
        (types: 0xb execute/read accessed code, 0x3 read/write accessed data).
        """
        sregs = self.get_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            seg: uapi.KvmSegment = getattr(sregs, name)
            code = name == "cs"
            seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, 0x8 if code else 0x10
            seg.type = 0xB if code else 0x3
            seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, 1, 1, 0, 1
        sregs.cr0 |= uapi.X86_CR0_PE
        self.set_sregs(sregs)
        self.set_inputs(rip=entry, rflags=0x2, **inputs)

    def set_inputs(self, **values: int) -> None:
        """Set registers by name ("rax", "eax" or "rip"), keeping the others."""
        regs = self.get_regs()
        for name, value in values.items():
            full = "r" + name[1:] if name.startswith("e") and len(name) == 3 else name
            if full not in REGISTER_NAMES:
                raise HarnessError(f"unknown register {name!r}", f"use one of {REGISTER_NAMES}")
            setattr(regs, full, value)
        self.set_regs(regs)

    def run(self, timeout: float) -> VcpuExit:
        """One `KVM_RUN` with a deadline; the exit decoded, with the registers at that exit.

        `KVM_EXIT_MEMORY_FAULT` (KVM_RUN fails with EFAULT) and a deadline
        (EINTR, `timed_out`) are exits; any other ioctl failure raises
        `KvmIoctlError` naming KVM_RUN and the kernel's errno.
        """
        finished = threading.Event()
        expired = threading.Event()
        target = threading.get_ident()

        def watchdog() -> None:
            if finished.wait(timeout):
                return
            expired.set()
            self._run[uapi.RUN_IMMEDIATE_EXIT] = 1
            while not finished.is_set():
                signal.pthread_kill(target, KICK_SIGNAL)
                finished.wait(KICK_INTERVAL)

        self._run[uapi.RUN_IMMEDIATE_EXIT] = 0
        guard = threading.Thread(target=watchdog, name=f"vcpu{self.vcpu_id}-deadline", daemon=True)
        guard.start()
        try:
            result = _ioctl(self.fd, uapi.KVM_RUN, 0)
            err = ctypes.get_errno() if result < 0 else 0
        finally:
            finished.set()
            guard.join()
            self._run[uapi.RUN_IMMEDIATE_EXIT] = 0
        exit_ = parse_exit(bytes(self._run[:PAGE_SIZE]), err, expired.is_set())
        if err and not (
            (err == errno.EFAULT and exit_.reason == uapi.KVM_EXIT_MEMORY_FAULT)
            or err == errno.EINTR
        ):
            raise KvmIoctlError(err, f"KVM_RUN (vCPU {self.vcpu_id})")
        if err == errno.EINTR:
            exit_ = VcpuExit(uapi.KVM_EXIT_INTR, err, exit_.timed_out, {})
        return VcpuExit(exit_.reason, exit_.errno, exit_.timed_out, exit_.detail, self.registers())

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """`KVM_PRE_FAULT_MEMORY`; returns the (gpa, size) the kernel left unprocessed."""
        args = uapi.KvmPreFaultMemory(gpa=gpa, size=size, flags=flags)
        self._ioctl(
            f"KVM_PRE_FAULT_MEMORY(gpa={gpa:#x}, size={size:#x}, flags={flags:#x})",
            uapi.KVM_PRE_FAULT_MEMORY,
            args,
        )
        return int(args.gpa), int(args.size)


@dataclass
class _Slot:
    slot: int
    gpa: int
    size: int
    host: Mapping | None  # where the host reads and writes the shared view
    host_offset: int


class TinyVm:
    """A VM with one vCPU and a code slot; the test adds the memory under test.

    Owns everything it creates (VM, vCPU, code memory, mappings it made) and
    releases it on `close()`; guest_memfds and mappings passed in stay the
    caller's.
    """

    def __init__(self, kvm: Kvm, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> None:
        self._owned: list[KvmFd | Mapping] = []
        try:
            self.vm = self._own(kvm.create_vm(vm_type))
            if kvm.check_extension(uapi.CAPS["KVM_CAP_SET_TSS_ADDR"]):
                self.vm._ioctl("KVM_SET_TSS_ADDR", uapi.KVM_SET_TSS_ADDR, TSS_GPA)
            self.low = self._own(Mapping.anonymous(LOW_SIZE))
            self._slots: dict[int, _Slot] = {}
            self.add_slot(LOW_SLOT, 0, LOW_SIZE, self.low)
            run_size = kvm._ioctl("KVM_GET_VCPU_MMAP_SIZE", uapi.KVM_GET_VCPU_MMAP_SIZE)
            fd = self.vm._ioctl("KVM_CREATE_VCPU(0)", uapi.KVM_CREATE_VCPU, 0)
            self.vcpu = self._own(Vcpu(fd, 0, run_size))
        except BaseException:
            self.close()
            raise

    def _own(self, resource: _R) -> _R:
        self._owned.append(resource)
        return resource

    def close(self) -> None:
        """Release in reverse order of creation; idempotent."""
        while self._owned:
            self._owned.pop().close()

    def __enter__(self) -> TinyVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- memory ---------------------------------------------------------------------

    def add_slot(
        self,
        slot: int,
        gpa: int,
        size: int,
        host: Mapping,
        *,
        gmem: GuestMemfd | None = None,
        gmem_offset: int = 0,
        host_offset: int = 0,
    ) -> None:
        """Memslot `slot` at `gpa` on `host` memory, optionally bound to `gmem` at `gmem_offset`.

        For an MMAP guest_memfd pass its own mapping as `host`: KVM then serves
        every fault from the guest_memfd and the host sees the same pages.
        """
        if host_offset + size > host.length:
            raise HarnessError(
                f"slot {slot} of {size:#x} bytes at host offset {host_offset:#x} does not fit "
                f"in a host mapping of {host.length:#x} bytes",
                "map at least as much memory as the slot covers",
            )
        self.vm.set_user_memory_region2(
            slot,
            guest_phys_addr=gpa,
            memory_size=size,
            userspace_addr=host.address + host_offset,
            guest_memfd=gmem,
            guest_memfd_offset=gmem_offset,
        )
        self._slots[slot] = _Slot(slot, gpa, size, host, host_offset)

    def delete_slot(self, slot: int) -> None:
        self.vm.delete_memslot(slot)
        self._slots.pop(slot, None)

    def _locate(self, gpa: int, size: int) -> tuple[Mapping, int]:
        for entry in self._slots.values():
            if entry.gpa <= gpa and gpa + size <= entry.gpa + entry.size and entry.host:
                return entry.host, entry.host_offset + gpa - entry.gpa
        raise HarnessError(
            f"GPA range [{gpa:#x}, {gpa + size:#x}) is not inside one memslot",
            f"slots: {', '.join(f'{s.gpa:#x}+{s.size:#x}' for s in self._slots.values())}",
        )

    def read(self, gpa: int, size: int) -> bytes:
        """Read guest memory from the host side (the slot's host mapping)."""
        mapping, offset = self._locate(gpa, size)
        return mapping.read(offset, size)

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest memory from the host side."""
        mapping, offset = self._locate(gpa, len(data))
        mapping.write(offset, data)

    def read_dwords(self, gpa: int, count: int) -> list[int]:
        return list(struct.unpack(f"<{count}I", self.read(gpa, 4 * count)))

    # --- running --------------------------------------------------------------------

    def load(self, program: GuestProgram, **inputs: int) -> None:
        """Put `program` at CODE_GPA and point the vCPU at it with `inputs` in registers."""
        if CODE_GPA + len(program.code) > DATA_GPA:
            raise HarnessError(f"program {program.name!r} is larger than the code area", "")
        self.write(CODE_GPA, program.code)
        self.vcpu.enter_flat_protected_mode(CODE_GPA, **inputs)
        self.program = program

    def run(
        self,
        program: GuestProgram,
        *,
        timeout: float = 30.0,
        expect: int = uapi.KVM_EXIT_HLT,
        on_io: Callable[[VcpuExit], None] | None = None,
        **inputs: int,
    ) -> VcpuExit:
        """Load `program`, run it until an exit other than I/O handled by `on_io`.

        Returns that exit when it is `expect` (-1: any exit). A deadline
        raises `RunawayGuest` with the registers, unless `expect` is
        KVM_EXIT_INTR (a guest that loops until stopped); any other exit
        raises `HarnessError` describing it.
        """
        self.load(program, **inputs)
        return self.resume(program, timeout=timeout, expect=expect, on_io=on_io)

    def resume(
        self,
        program: GuestProgram,
        *,
        timeout: float = 30.0,
        expect: int = uapi.KVM_EXIT_HLT,
        on_io: Callable[[VcpuExit], None] | None = None,
    ) -> VcpuExit:
        """Continue the loaded program (see `run`); `timeout` bounds the whole call."""
        deadline = time.monotonic() + timeout
        while True:
            exit_ = self.vcpu.run(max(0.0, deadline - time.monotonic()))
            if exit_.reason == uapi.KVM_EXIT_IO and on_io is not None:
                on_io(exit_)
                continue
            if exit_.timed_out and expect != uapi.KVM_EXIT_INTR:
                raise RunawayGuest(program.name, timeout, exit_.registers)
            if expect in (-1, exit_.reason):
                return exit_
            raise HarnessError(
                f"guest program {program.name!r} ended with {exit_.describe()}",
                f"expected KVM_EXIT_{uapi.EXIT_REASONS.get(expect, expect)}",
            )
