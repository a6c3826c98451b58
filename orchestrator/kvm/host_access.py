"""Every host path into a mapping of guest memory, each tried in a child process.

H1 says private memory is unreachable by host userspace, not only by a CPU
read. Each `Path` here reaches the same pages another way: CPU read and
write faults, `/proc/self/mem` (the kernel's `access_remote_vm`),
`process_vm_readv`, an `O_DIRECT` read *into* the mapping (tmpfs has trivial
direct I/O since Linux 6.6), `vmsplice` (GUP references the pages into a
pipe) and io_uring fixed buffers (`IORING_REGISTER_BUFFERS` long-term pins
them). A refused access is SIGBUS (CPU faults) or an errno (the kernel's GUP
or uaccess fails); the child reports which, and the data it got, through a
pipe, so a SIGBUS never reaches the test process.

`Pipe pin` (`vmsplice_pin`) keeps page references in the parent for tests
that punch while a pin is held.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.kvm.child import run_in_child
from orchestrator.kvm.mapping import PAGE_SIZE, Mapping

_libc = ctypes.CDLL(None, use_errno=True)

SYS_IO_URING_SETUP = 425
SYS_IO_URING_REGISTER = 427
IORING_REGISTER_BUFFERS = 0
IO_URING_PARAMS_SIZE = 120  # sizeof(struct io_uring_params), include/uapi/linux/io_uring.h
F_SETPIPE_SZ = 1031  # include/uapi/linux/fcntl.h (F_LINUX_SPECIFIC_BASE + 7)
PROBE_BYTES = 64  # how much each path reads: enough to see a secret


class Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


@dataclass(frozen=True)
class AccessResult:
    """How one path ended: "ok" with the bytes it saw, or how it was refused."""

    path: str
    result: str  # "ok", "SIGBUS", an errno name ("EFAULT"), or "unavailable: why"
    data: bytes | None = None

    @property
    def accessible(self) -> bool:
        return self.result == "ok"

    @property
    def unavailable(self) -> bool:
        return self.result.startswith("unavailable")


def _errno_name(err: int) -> str:
    return errno.errorcode.get(err, f"errno {err}")


def _buffer(address: int, size: int) -> ctypes.Array[ctypes.c_char]:
    return (ctypes.c_char * size).from_address(address)


def _cpu_read(mapping: Mapping, offset: int) -> bytes:
    return mapping.read(offset, PROBE_BYTES)


def _cpu_write(mapping: Mapping, offset: int) -> bytes:
    mapping.write(offset, b"\xa5")
    return b""


def _proc_mem(mapping: Mapping, offset: int) -> bytes:
    fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, PROBE_BYTES, mapping.address + offset)
    finally:
        os.close(fd)


def _process_vm_readv(mapping: Mapping, offset: int) -> bytes:
    local = ctypes.create_string_buffer(PROBE_BYTES)
    local_iov = Iovec(ctypes.addressof(local), PROBE_BYTES)
    remote_iov = Iovec(mapping.address + offset, PROBE_BYTES)
    call = _libc.process_vm_readv
    call.restype = ctypes.c_ssize_t
    got = call(os.getpid(), ctypes.byref(local_iov), 1, ctypes.byref(remote_iov), 1, 0)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return local.raw[:got]


def _o_direct_read_into(mapping: Mapping, offset: int) -> bytes:
    """Read a page of a tmpfs file with O_DIRECT into the mapping (the mapping is the target)."""
    source = os.memfd_create("cvmlab-odirect", os.MFD_CLOEXEC)
    try:
        os.write(source, b"\x3c" * PAGE_SIZE)
        direct = os.open(f"/proc/self/fd/{source}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            target = memoryview(_buffer(mapping.address + offset, PAGE_SIZE)).cast("B")
            got = os.preadv(direct, [target], 0)
        finally:
            os.close(direct)
    finally:
        os.close(source)
    return b"read %d bytes" % got


def _vmsplice(mapping: Mapping, offset: int) -> bytes:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        iov = Iovec(mapping.address + offset, PROBE_BYTES)
        call = _libc.vmsplice
        call.restype = ctypes.c_ssize_t
        got = call(write_end, ctypes.byref(iov), 1, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return os.read(read_end, got)
    finally:
        os.close(read_end)
        os.close(write_end)


def _io_uring_fixed_buffer(mapping: Mapping, offset: int) -> bytes:
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    params = ctypes.create_string_buffer(IO_URING_PARAMS_SIZE)
    ring = syscall(SYS_IO_URING_SETUP, ctypes.c_uint(4), params)
    if ring < 0:
        err = ctypes.get_errno()
        raise _Unavailable(f"io_uring_setup failed with {_errno_name(err)}")
    try:
        iov = Iovec(mapping.address + offset, PAGE_SIZE)
        got = syscall(SYS_IO_URING_REGISTER, ctypes.c_uint(ring),
                      ctypes.c_uint(IORING_REGISTER_BUFFERS), ctypes.byref(iov),
                      ctypes.c_uint(1))  # fmt: skip
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return b""
    finally:
        os.close(ring)


class _Unavailable(Exception):
    """The path cannot be tried on this kernel (e.g. io_uring disabled by sysctl)."""


PATHS: dict[str, Callable[[Mapping, int], bytes]] = {
    "cpu read": _cpu_read,
    "cpu write": _cpu_write,
    "/proc/pid/mem": _proc_mem,
    "process_vm_readv": _process_vm_readv,
    "O_DIRECT read into": _o_direct_read_into,
    "vmsplice": _vmsplice,
    "io_uring fixed buffer": _io_uring_fixed_buffer,
}


def try_path(name: str, mapping: Mapping, offset: int = 0, timeout: float = 20.0) -> AccessResult:
    """Try one path in a child; SIGBUS, an errno, "ok" with data, or "unavailable"."""
    action = PATHS[name]
    read_end, write_end = os.pipe2(os.O_CLOEXEC)

    def child() -> None:
        try:
            data = action(mapping, offset)
            report = {"result": "ok", "data": data.hex()}
        except _Unavailable as why:
            report = {"result": f"unavailable: {why}"}
        except OSError as exc:
            report = {"result": _errno_name(exc.errno or 0)}
        os.write(write_end, json.dumps(report).encode())

    try:
        outcome = run_in_child(child, timeout=timeout)
        os.close(write_end)
        write_end = -1
        raw = os.read(read_end, 1 << 16)
    finally:
        if write_end >= 0:
            os.close(write_end)
        os.close(read_end)
    if outcome.signal_number is not None or outcome.timed_out:
        return AccessResult(name, outcome.killed_by or "timeout")
    if not raw:
        return AccessResult(name, f"unavailable: {outcome.describe()}")
    report = json.loads(raw)
    data = bytes.fromhex(report["data"]) if "data" in report else None
    return AccessResult(name, report["result"], data)


class PipePin:
    """Page references held by a pipe after `vmsplice` (no copy): a pin the host keeps.

    Root may size the pipe past /proc/sys/fs/pipe-max-size, so one pipe can
    hold many MiB of pages. `read_all()` drains it (the old bytes), `close()`
    drops the references.
    """

    def __init__(self, mapping: Mapping, offset: int, length: int) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_CLOEXEC)
        self.length = 0
        try:
            fcntl.fcntl(self.write_end, F_SETPIPE_SZ, max(length, PAGE_SIZE))
            call = _libc.vmsplice
            call.restype = ctypes.c_ssize_t
            while self.length < length:
                iov = Iovec(mapping.address + offset + self.length, length - self.length)
                got = call(self.write_end, ctypes.byref(iov), 1, 0)
                if got <= 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"vmsplice of {length} bytes: {os.strerror(err)}")
                self.length += got
        except BaseException:
            self.close()
            raise

    def read_all(self) -> bytes:
        chunks = []
        remaining = self.length
        while remaining:
            chunk = os.read(self.read_end, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        for fd in (self.read_end, self.write_end):
            if fd >= 0:
                os.close(fd)
        self.read_end = self.write_end = -1

    def __enter__(self) -> PipePin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
