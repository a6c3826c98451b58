"""`/dev/kvm`, VMs and guest_memfds as Python objects that close their fds deterministically.

Each object owns exactly one fd and is a context manager; `close()` is
idempotent. Failing ioctls raise `KvmIoctlError`, an `OSError` that keeps the
kernel's errno and names the call, because the errno *is* the result that
uAPI tests check.

    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(64 * MiB, flags) as gmem:
        gmem.allocate(0, 64 * MiB)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from types import TracebackType
from typing import TypeVar

from orchestrator.kvm import libc, uapi
from orchestrator.kvm.mapping import Mapping
from orchestrator.kvm.stats import KvmStats

_Self = TypeVar("_Self", bound="KvmFd")

# KVM_CREATE_VM can fail with EINTR when a signal arrives while it registers
# the MMU notifier; QEMU retries it the same way (accel/kvm/kvm-all.c).
_CREATE_VM_ATTEMPTS = 5


# Where two names share a number, the kernel's sources use these spellings.
_PREFERRED_ERRNO_NAMES = {errno.EOPNOTSUPP: "EOPNOTSUPP", errno.EAGAIN: "EAGAIN"}


def errno_name(err: int) -> str:
    """"EINVAL" for 22; the kernel's spelling where Python's table has an alias."""
    return _PREFERRED_ERRNO_NAMES.get(err) or errno.errorcode.get(err, f"errno {err}")


class KvmIoctlError(OSError):
    """An ioctl or file operation on a KVM fd failed; `errno` is the kernel's answer."""

    def __init__(self, err: int, call: str) -> None:
        super().__init__(err, f"{call}: {errno_name(err)} ({os.strerror(err)})")
        self.call = call


class KvmFd:
    """Owns one fd; closes it once, on `close()` or leaving a `with` block."""

    _kind = "fd"

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self._kind} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ioctl(self, name: str, request: int, arg: int | ctypes.Structure = 0) -> int:
        try:
            if isinstance(arg, int):
                return fcntl.ioctl(self.fd, request, arg)
            return int(fcntl.ioctl(self.fd, request, arg, True))
        except OSError as exc:
            raise KvmIoctlError(exc.errno or 0, name) from None

    def check_extension(self, cap: int) -> int:
        """`KVM_CHECK_EXTENSION(cap)`: 0 if absent, else a cap-specific value (often a mask)."""
        return self._ioctl(f"KVM_CHECK_EXTENSION({cap})", uapi.KVM_CHECK_EXTENSION, cap)


class Kvm(KvmFd):
    """An open `/dev/kvm` (system fd)."""

    _kind = "/dev/kvm"

    def __init__(self, device: str = "/dev/kvm") -> None:
        self.device = device
        super().__init__(os.open(device, os.O_RDWR | os.O_CLOEXEC))

    def api_version(self) -> int:
        """`KVM_GET_API_VERSION`; 12 on every kernel since 2.6.22."""
        return self._ioctl("KVM_GET_API_VERSION", uapi.KVM_GET_API_VERSION)

    def create_vm(self, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> Vm:
        """`KVM_CREATE_VM(vm_type)`, retried on EINTR."""
        for attempt in range(_CREATE_VM_ATTEMPTS):
            try:
                fd = self._ioctl(f"KVM_CREATE_VM({vm_type})", uapi.KVM_CREATE_VM, vm_type)
            except KvmIoctlError as exc:
                if exc.errno == errno.EINTR and attempt + 1 < _CREATE_VM_ATTEMPTS:
                    continue
                raise
            return Vm(fd, vm_type)
        raise AssertionError("unreachable")  # pragma: no cover


class Vm(KvmFd):
    """A VM fd from `KVM_CREATE_VM` (close-on-exec, as the kernel creates it)."""

    _kind = "VM fd"

    def __init__(self, fd: int, vm_type: int) -> None:
        super().__init__(fd)
        self.vm_type = vm_type

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """`KVM_CREATE_GUEST_MEMFD(size, flags)`; the new fd is made close-on-exec."""
        args = uapi.KvmCreateGuestMemfd(size=size, flags=flags)
        fd = self._ioctl(
            f"KVM_CREATE_GUEST_MEMFD(size={size}, flags={flags:#x})",
            uapi.KVM_CREATE_GUEST_MEMFD,
            args,
        )
        # The kernel installs the fd without O_CLOEXEC (get_unused_fd_flags(0)).
        os.set_inheritable(fd, False)
        return GuestMemfd(fd, size, flags)

    def set_user_memory_region2(
        self,
        slot: int,
        *,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        flags: int = 0,
        guest_memfd: GuestMemfd | int | None = None,
        guest_memfd_offset: int = 0,
    ) -> None:
        """`KVM_SET_USER_MEMORY_REGION2`; a `guest_memfd` adds `KVM_MEM_GUEST_MEMFD`."""
        gmem_fd = 0
        if guest_memfd is not None:
            flags |= uapi.KVM_MEM_GUEST_MEMFD
            gmem_fd = guest_memfd.fd if isinstance(guest_memfd, GuestMemfd) else guest_memfd
        region = uapi.KvmUserspaceMemoryRegion2(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
            guest_memfd_offset=guest_memfd_offset,
            guest_memfd=gmem_fd,
        )
        self._ioctl(
            f"KVM_SET_USER_MEMORY_REGION2(slot={slot}, flags={flags:#x}, "
            f"gpa={guest_phys_addr:#x}, size={memory_size:#x}, "
            f"guest_memfd={gmem_fd}, offset={guest_memfd_offset:#x})",
            uapi.KVM_SET_USER_MEMORY_REGION2,
            region,
        )

    def delete_memslot(self, slot: int) -> None:
        """Delete `slot` (a region of size 0), which also unbinds its guest_memfd."""
        self.set_user_memory_region2(slot, guest_phys_addr=0, memory_size=0, userspace_addr=0)

    def set_memory_attributes(
        self, address: int, size: int, attributes: int, flags: int = 0
    ) -> None:
        """`KVM_SET_MEMORY_ATTRIBUTES` on the GPA range `[address, address + size)`."""
        attrs = uapi.KvmMemoryAttributes(
            address=address, size=size, attributes=attributes, flags=flags
        )
        self._ioctl(
            f"KVM_SET_MEMORY_ATTRIBUTES(address={address:#x}, size={size:#x}, "
            f"attributes={attributes:#x}, flags={flags:#x})",
            uapi.KVM_SET_MEMORY_ATTRIBUTES,
            attrs,
        )

    def stats(self) -> KvmStats:
        """`KVM_GET_STATS_FD`: the VM's binary statistics, readable by name."""
        return KvmStats(self._ioctl("KVM_GET_STATS_FD", uapi.KVM_GET_STATS_FD))


class GuestMemfd(KvmFd):
    """A guest_memfd: a file of `size` bytes whose memory belongs to one VM."""

    _kind = "guest_memfd"

    def __init__(self, fd: int, size: int, flags: int) -> None:
        super().__init__(fd)
        self.size = size
        self.flags = flags

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """Raw `fallocate(mode, offset, length)`, for tests of refused modes."""
        try:
            libc.fallocate(self.fd, mode, offset, length)
        except OSError as exc:
            raise KvmIoctlError(
                exc.errno or 0, f"fallocate(guest_memfd, mode={mode:#x}, {offset:#x}, {length:#x})"
            ) from None

    def allocate(self, offset: int, length: int) -> None:
        """Back `[offset, offset + length)` with memory (`FALLOC_FL_KEEP_SIZE`)."""
        self.fallocate(uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        """Free `[offset, offset + length)` (`KEEP_SIZE | PUNCH_HOLE`)."""
        self.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, offset, length)

    def map(self, length: int | None = None, offset: int = 0, *, shared: bool = True) -> Mapping:
        """mmap `length` bytes (default: the whole file); needs `GUEST_MEMFD_FLAG_MMAP`.

        `length` may reach past the end of the file: the kernel then answers a
        fault there with SIGBUS.
        """
        size = self.size if length is None else length
        try:
            return Mapping(self.fd, size, offset, shared=shared)
        except OSError as exc:
            kind = "MAP_SHARED" if shared else "MAP_PRIVATE"
            raise KvmIoctlError(
                exc.errno or 0, f"mmap(guest_memfd, {size:#x}, {kind}, offset={offset:#x})"
            ) from None
