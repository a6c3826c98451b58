"""orchestrator.memory.secret_scan: finding a secret in a dump or a backing without disturbing it.

The searches run on real memfds, this process's own memory, and a real QEMU 10.0's
`dump-guest-memory` of a stopped q35 machine whose memfd we wrote the secret into.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_process import started_qemu

import orchestrator.memory.secret_scan as secret_scan
from orchestrator.memory.host_punch import HostPuncher, borrowed_fd
from orchestrator.memory.secret_scan import (
    count_in_fd,
    count_in_process_memory,
    data_segments,
    new_secret,
    private_dump_dir,
    search_dump,
)

QEMU = shutil.which("qemu-system-x86_64")
MiB = 1 << 20


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("cvmlab-test")
    os.ftruncate(fd, 64 * MiB)
    yield fd
    os.close(fd)


def test_secrets_are_unique_and_recognisable() -> None:
    first, second = new_secret(), new_secret()
    assert first != second and first.startswith("cvmlab-secret-") and len(first) == 46


def test_secret_in_a_sparse_memfd_is_found_once(memfd: int) -> None:
    needle = new_secret().encode()
    os.pwrite(memfd, needle, 40 * MiB + 123)
    assert count_in_fd(memfd, needle) == 1


def test_searching_a_memfd_allocates_nothing(memfd: int) -> None:
    """Holes are skipped, not read: reading them through a mapping would populate them."""
    os.pwrite(memfd, b"x" * 4096, 8 * MiB)
    before = os.fstat(memfd).st_blocks
    count_in_fd(memfd, b"absent")
    assert os.fstat(memfd).st_blocks == before
    assert list(data_segments(memfd, 64 * MiB)) == [(8 * MiB, 8 * MiB + 4096)]


def test_a_match_across_a_chunk_boundary_is_counted_once(
    memfd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secret_scan, "CHUNK", 4096)
    needle = new_secret().encode()
    os.pwrite(memfd, b"\1" * 3 * 4096, 0)
    os.pwrite(memfd, needle, 4096 - 10)  # straddles the first chunk boundary
    os.pwrite(memfd, needle, 2 * 4096 - len(needle))  # ends exactly on the second
    assert count_in_fd(memfd, needle) == 2


def test_secret_in_process_memory_is_found() -> None:
    needle = new_secret().encode()
    buffer = ctypes.create_string_buffer(b"\0" * 10000 + needle + b"\0" * 100)
    address = ctypes.addressof(buffer)
    assert count_in_process_memory("self", address, len(buffer), needle) == 1
    assert count_in_process_memory("self", address, 10000, needle) == 0


def test_dump_directory_is_private_and_removed() -> None:
    with private_dump_dir() as directory:
        (directory / "guest.elf").write_bytes(b"x")
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert not directory.exists()


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_dump_guest_memory_of_a_real_qemu_holds_what_guest_ram_holds() -> None:
    """A stopped 128 MiB q35 machine: the secret written into its memfd at GPA 48 MiB is
    in QEMU's dump; another secret is not. The dump is gone afterwards."""
    assert QEMU is not None
    with started_qemu(
        QEMU, "-machine", "q35,memory-backend=ram0", "-accel", "tcg", "-S", "-m", "128M",
        "-object", "memory-backend-memfd,id=ram0,size=128M,share=on",
    ) as qemu:  # fmt: skip
        qmp = qemu.qmp
        puncher = HostPuncher(qmp, qemu.pid)
        ((_gpa, _length, offset, backing),) = puncher.plan(48 * MiB, 4096)
        needle = new_secret().encode()
        with borrowed_fd(backing.qemu_pid, backing.qemu_fd) as fd:
            os.pwrite(fd, needle, offset + 100)
        before = set(Path(tempfile.gettempdir()).glob("cvmlab-dump-*"))
        found = search_dump(qmp, needle)
        assert found.dump is not None and found.dump.status == "completed", found
        assert found.found == 1
        assert found.dump.size > 128 * MiB
        assert search_dump(qmp, new_secret().encode()).found == 0
        assert set(Path(tempfile.gettempdir()).glob("cvmlab-dump-*")) == before
