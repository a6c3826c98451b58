"""guest_memfd file cases the upstream selftest has and the uAPI suite lacked, and NUMA.

MADV_COLLAPSE refused, punch at and past EOF accepted, every unaligned size
refused, every valid flag combination accepted (guest_memfd_test.c in
tools/testing/selftests/kvm: test_collapse, test_fallocate, test_create_guest_memfd_invalid_sizes,
test_guest_memfd_flags), and `mbind` on a guest_memfd mapping placing its
pages on the chosen node (guest_memfd_test.c test_mbind/test_numa_allocation;
needs two NUMA nodes: `cvmlab lab --numa 2`). H8 and H9 after every test.
"""

from __future__ import annotations

import ctypes
import os
from functools import partial

from orchestrator.invariants.gmem_vcpu import every_errno_is, pages_on_node
from orchestrator.kvm import uapi
from orchestrator.kvm.device import Vm
from orchestrator.kvm.mapping import PAGE_SIZE
from orchestrator.kvm_scenario import KvmScenario, errno_of
from orchestrator.units import MiB

SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
MADV_COLLAPSE = 25  # include/uapi/asm-generic/mman-common.h
SYS_MBIND = 237  # arch/x86/entry/syscalls/syscall_64.tbl
SYS_MOVE_PAGES = 279
MPOL_BIND = 2  # include/uapi/linux/mempolicy.h
SIZE = 2 * MiB

_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(*args: object) -> int:
    call = _libc.syscall
    call.restype = ctypes.c_long
    result = int(call(*args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _create_and_close(vm: Vm, size: int, flags: int) -> None:
    vm.create_guest_memfd(size, flags).close()


def online_nodes() -> list[int]:
    """NUMA nodes with memory ("0-1" in /sys/devices/system/node/has_memory)."""
    with open("/sys/devices/system/node/has_memory", encoding="ascii") as handle:
        text = handle.read().strip()
    nodes: list[int] = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        nodes.extend(range(int(low), int(high or low) + 1))
    return nodes


class GmemFile(KvmScenario):
    """guest_memfd file-level cases and NUMA placement.

    :avocado: enable
    :avocado: tags=gmem,host,H4,tier:gmem
    """

    def test_madv_collapse_is_refused(self) -> None:
        """H4: MADV_COLLAPSE on a guest_memfd mapping fails with EINVAL (folios stay order 0).

        :avocado: tags=H4
        """
        self.require_gmem_flags(SHARED)
        vm = self.own(self.kvm.create_vm())
        mapping = self.own(self.gmem(vm, SIZE, SHARED).map())
        madvise = _libc.madvise

        def collapse() -> None:
            if madvise(ctypes.c_void_p(mapping.address), ctypes.c_size_t(SIZE), MADV_COLLAPSE):
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))

        self.expect_errno(22, "MADV_COLLAPSE on a guest_memfd mapping", collapse)

    def test_punch_at_and_past_eof_is_accepted(self) -> None:
        """H4: PUNCH_HOLE starting at EOF, and straddling it, succeeds (nothing to free).

        :avocado: tags=H4
        """
        vm = self.own(self.kvm.create_vm())
        gmem = self.gmem(vm, SIZE)
        self.expect_errno(0, "punch at EOF", lambda: gmem.punch_hole(SIZE, PAGE_SIZE))
        self.expect_errno(0, "punch past EOF", lambda: gmem.punch_hole(SIZE + SIZE, PAGE_SIZE))
        self.expect_errno(
            0, "punch straddling EOF", lambda: gmem.punch_hole(SIZE - PAGE_SIZE, 2 * PAGE_SIZE)
        )

    def test_every_unaligned_size_is_refused(self) -> None:
        """H4: KVM_CREATE_GUEST_MEMFD refuses every size from 1 to 2 pages that is not
        a multiple of the page size, with EINVAL.

        :avocado: tags=H4
        """
        vm = self.own(self.kvm.create_vm())
        seen = {
            str(size): errno_of(partial(_create_and_close, vm, size, 0))[0]
            for size in range(1, 2 * PAGE_SIZE)
            if size % PAGE_SIZE
        }
        self.check(every_errno_is("H4", "unaligned guest_memfd sizes", 22, seen))

    def test_valid_flags_are_accepted(self) -> None:
        """H4: every combination of KVM_CAP_GUEST_MEMFD_FLAGS bits is accepted, INIT_SHARED
        without MMAP included: kvm_gmem_create checks only `flags & ~supported`
        (virt/kvm/guest_memfd.c in the 7.2 and 7.3 sources; the 7.3 lab accepted it). Flags
        outside the set are refused in gmem_uapi (test_create_refuses_every_unsupported_flag).

        :avocado: tags=H4
        """
        vm = self.own(self.kvm.create_vm())
        supported = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        if not supported:
            self.cancel(f"KVM_CAP_GUEST_MEMFD_FLAGS is 0 on this kernel ({os.uname().release})")
        subsets = [f for f in range(supported + 1) if f & ~supported == 0]
        results = {
            uapi.flag_names(flags, uapi.GMEM_FLAG_NAMES): errno_of(
                partial(_create_and_close, vm, SIZE, flags)
            )[0]
            for flags in subsets
        }
        self.check(every_errno_is("H4", "every subset of the supported flags", 0, results))

    def test_mbind_places_pages_on_the_chosen_node(self) -> None:
        """H6 (NUMA): mbind(MPOL_BIND, node N) on a guest_memfd mapping puts each page the host
        faults in on node N, for every node with memory (move_pages reports the node).

        :avocado: tags=H6,numa
        """
        self.require_gmem_flags(SHARED)
        nodes = online_nodes()
        if len(nodes) < 2:
            self.cancel(
                f"needs two NUMA nodes with memory, this kernel has {nodes} "
                "(run in the lab with --numa 2)"
            )
        vm = self.own(self.kvm.create_vm())
        pages = SIZE // PAGE_SIZE
        for node in nodes:
            mapping = self.own(self.gmem(vm, SIZE, SHARED).map())
            mask = ctypes.c_ulong(1 << node)
            _syscall(SYS_MBIND, ctypes.c_void_p(mapping.address), ctypes.c_ulong(SIZE),
                     MPOL_BIND, ctypes.byref(mask), ctypes.c_ulong(64), 0)  # fmt: skip
            for page in range(pages):
                mapping.write(page * PAGE_SIZE, b"\x01")
            addresses = (ctypes.c_void_p * pages)(
                *[mapping.address + page * PAGE_SIZE for page in range(pages)]
            )
            status = (ctypes.c_int * pages)()
            _syscall(SYS_MOVE_PAGES, 0, ctypes.c_ulong(pages), addresses, None, status, 0)
            self.check(pages_on_node(node, list(status)))
