"""Private memory with a vCPU on a KVM_X86_SW_PROTECTED_VM: memory-fault exits, conversions, H1, H7.

Needs the `sw-protected` tier (KVM_CAP_VM_TYPES bit 1), which no Debian kernel
has: run in the lab on the kernel `cvmlab lab kernel build` makes
(`cvmlab lab --kernel sw-protected -- .venv/bin/avocado run scenarios/gmem_private.py`);
elsewhere every test CANCELs with the probe's reason.

Memory per GPA today (before in-place conversion): the shared view is the
memslot's userspace memory (a memfd here, as QEMU does), the private view is
the bound guest_memfd; `KVM_SET_MEMORY_ATTRIBUTES` picks which one the vCPU
sees (Documentation/virt/kvm/api.rst, KVM_SET_MEMORY_ATTRIBUTES). So H7 means
here: a page the host mapped or pinned while shared is a *different* page
from the one the guest writes once the GPA is private; the host must not see
the guest's private data through that mapping or pin. With in-place
conversion (`KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES`, not merged; number not
final), the same page changes state and converting a pinned page must fail
with EAGAIN: that test is gated on the capability number given in
$CVMLAB_CAP_GMEM_MEMORY_ATTRIBUTES.
"""

from __future__ import annotations

import errno
import os
import random

from orchestrator.invariants.gmem_host import access_as_expected
from orchestrator.invariants.gmem_vcpu import (
    backed_once,
    conversion_counts,
    memory_fault_exit,
    no_secret_visible,
    values_match,
)
from orchestrator.kvm import guest_code, libc, uapi
from orchestrator.kvm.device import GuestMemfd
from orchestrator.kvm.host_access import PATHS, PipePin, try_path
from orchestrator.kvm.mapping import PAGE_SIZE, Mapping
from orchestrator.kvm.vcpu import DATA_GPA, TEST_GPA, TinyVm
from orchestrator.kvm_scenario import KvmScenario, errno_of

PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
PAGES = 64
SIZE = PAGES * PAGE_SIZE
SECRET = 0x5EC2E7AA
HOST_VALUE = 0x5AA2ED00
STORM_CONVERSIONS = 64
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
DEADLINE = 60.0


class GmemPrivate(KvmScenario):
    """Private guest_memfd memory under a vCPU of a KVM_X86_SW_PROTECTED_VM.

    :avocado: enable
    :avocado: tags=gmem,vcpu,conversion,tier:sw-protected
    """

    tiers = ("sw-protected",)

    def private_guest(self, gmem_flags: int = 0) -> tuple[TinyVm, GuestMemfd, Mapping, int]:
        """A sw-protected tiny VM: TEST_GPA slot with a memfd shared half and a guest_memfd."""
        tiny = self.tiny_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = self.gmem(tiny.vm, SIZE, gmem_flags)
        memfd = os.memfd_create("cvmlab-shared-half", os.MFD_CLOEXEC)
        self.defer(lambda: os.close(memfd))
        os.ftruncate(memfd, SIZE)
        shared = self.own(Mapping(memfd, SIZE))
        tiny.add_slot(1, TEST_GPA, SIZE, shared, gmem=gmem)
        return tiny, gmem, shared, memfd

    def guest_reads(self, tiny: TinyVm, pages: int = PAGES) -> list[int]:
        tiny.run(guest_code.COPY_PAGES, timeout=DEADLINE, esi=TEST_GPA, ecx=pages, edi=DATA_GPA)
        return tiny.read_dwords(DATA_GPA, pages)

    @staticmethod
    def host_fill(shared: Mapping, value: int) -> None:
        for page in range(PAGES):
            shared.write(page * PAGE_SIZE, (value + page).to_bytes(4, "little"))

    def test_private_writes_stay_out_of_the_shared_half_and_convert_back(self) -> None:
        """G2/H1/H3: with the range PRIVATE the guest's writes land in guest_memfd, not in the
        host's shared memory; a punch of the private pages makes the guest read zero; converted
        back to shared the guest reads the host's shared data again.

        :avocado: tags=G2,H1,H3
        """
        tiny, gmem, shared, _ = self.private_guest()
        self.host_fill(shared, HOST_VALUE)
        tiny.vm.set_memory_attributes(TEST_GPA, SIZE, PRIVATE)
        tiny.run(guest_code.FILL_PAGES, timeout=DEADLINE, edi=TEST_GPA, ecx=PAGES, eax=SECRET)
        self.check(
            values_match(
                "G2",
                "the guest reads its private writes",
                [SECRET + p for p in range(PAGES)],
                self.guest_reads(tiny),
            )
        )
        host_view = {"shared half": shared.read(0, SIZE)}
        self.check(no_secret_visible("private writes", SECRET.to_bytes(4, "little"), host_view))
        gmem.punch_hole(0, SIZE)
        self.check(
            values_match(
                "H3", "punched private pages read zero", [0] * PAGES, self.guest_reads(tiny)
            )
        )
        tiny.vm.set_memory_attributes(TEST_GPA, SIZE, 0)
        self.check(
            values_match(
                "G2",
                "back to shared the guest reads the host's data",
                [HOST_VALUE + p for p in range(PAGES)],
                self.guest_reads(tiny),
            )
        )

    def test_private_access_without_guest_memfd_exits_with_memory_fault(self) -> None:
        """H1: a private GPA on a memslot without guest_memfd exits with KVM_EXIT_MEMORY_FAULT
        naming the GPA, a page and KVM_MEMORY_EXIT_FLAG_PRIVATE (private_mem_kvm_exits_test.c,
        test_private_access_memslot_not_private).

        :avocado: tags=H1,memory-fault
        """
        tiny = self.tiny_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        plain = self.own(Mapping.anonymous(SIZE))
        tiny.add_slot(1, TEST_GPA, SIZE, plain)
        tiny.vm.set_memory_attributes(TEST_GPA, SIZE, PRIVATE)
        exit_ = tiny.run(
            guest_code.COPY_PAGES, timeout=DEADLINE, expect=-1, esi=TEST_GPA, ecx=1, edi=DATA_GPA
        )
        self.check(
            memory_fault_exit(
                exit_.name, exit_.detail, TEST_GPA, PAGE_SIZE, uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE
            )
        )

    def test_private_access_after_memslot_deleted_exits_with_memory_fault(self) -> None:
        """H1: a private GPA whose memslot was deleted exits with KVM_EXIT_MEMORY_FAULT
        (private_mem_kvm_exits_test.c, test_private_access_memslot_deleted).

        :avocado: tags=H1,memory-fault
        """
        tiny, _, _, _ = self.private_guest()
        tiny.vm.set_memory_attributes(TEST_GPA, SIZE, PRIVATE)
        tiny.delete_slot(1)
        exit_ = tiny.run(
            guest_code.COPY_PAGES, timeout=DEADLINE, expect=-1, esi=TEST_GPA, ecx=1, edi=DATA_GPA
        )
        self.check(
            memory_fault_exit(
                exit_.name, exit_.detail, TEST_GPA, PAGE_SIZE, uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE
            )
        )

    def test_conversion_storm_backs_each_page_once(self) -> None:
        """G2/H2: random page ranges converted private <-> shared as a guest would ask,
        userspace punching the half that stops backing the GPA (as QEMU's
        kvm_convert_memory does); every conversion counted and verified by the guest;
        afterwards no page is allocated in both halves.

        :avocado: tags=G2,H2,storm,stress
        """
        tiny, gmem, _, memfd = self.private_guest()
        rng = random.Random(int(os.environ.get("CVMLAB_SEED", "10")))
        private = [False] * PAGES
        done = verified = 0
        for _ in range(STORM_CONVERSIONS):
            first = rng.randrange(PAGES)
            count = rng.randrange(1, PAGES - first + 1)
            to_private = not private[first]
            gpa, offset, length = TEST_GPA + first * PAGE_SIZE, first * PAGE_SIZE, count * PAGE_SIZE
            tiny.vm.set_memory_attributes(gpa, length, PRIVATE if to_private else 0)
            if to_private:
                libc.fallocate(memfd, PUNCH, offset, length)
            else:
                gmem.punch_hole(offset, length)
            done += 1
            private[first : first + count] = [to_private] * count
            value = rng.randrange(1, 1 << 31)
            tiny.run(guest_code.FILL_PAGES, timeout=DEADLINE, edi=gpa, ecx=count, eax=value)
            seen = self.guest_reads(tiny)[first : first + count]
            verified += seen == [value + p for p in range(count)]
        self.check(conversion_counts("storm", STORM_CONVERSIONS, done, verified))
        # The shared half of every private page must be a hole (SEEK_DATA finds nothing there).
        doubly = [
            page for page in range(PAGES) if private[page] and _allocated(memfd, page * PAGE_SIZE)
        ]
        self.check(backed_once(doubly))

    def test_private_pages_refuse_every_host_path(self) -> None:
        """H1: the guest's private pages (guest_memfd with MMAP, sw-protected VM) refuse every
        host access path of the access matrix.

        :avocado: tags=H1
        """
        tiny = self.tiny_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        supported = tiny.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        if not supported & uapi.GUEST_MEMFD_FLAG_MMAP:
            self.cancel(f"KVM_CAP_GUEST_MEMFD_FLAGS={supported:#x} on a sw-protected VM: no MMAP")
        gmem = self.gmem(tiny.vm, SIZE, uapi.GUEST_MEMFD_FLAG_MMAP)
        shared = self.own(Mapping.anonymous(SIZE))
        tiny.add_slot(1, TEST_GPA, SIZE, shared, gmem=gmem)
        tiny.vm.set_memory_attributes(TEST_GPA, SIZE, PRIVATE)
        tiny.run(guest_code.FILL_PAGES, timeout=DEADLINE, edi=TEST_GPA, ecx=PAGES, eax=SECRET)
        mapping = self.own(gmem.map())
        for path in sorted(PATHS):
            result = try_path(path, mapping)
            self.record(access_as_expected("private pages", path, False, result.result))
        failed = [v.line() for v in self.verdicts.verdicts if v.failed]
        if failed:
            self.fail(failed[0])

    def test_pin_and_map_taken_while_shared_see_no_private_data(self) -> None:
        """H7: the host maps and pins (vmsplice) a shared page, the GPA turns private and the
        guest writes a secret: neither the mapping nor the pin shows it; back to shared, the
        guest reads the host's page, not its secret.

        :avocado: tags=H7,pin
        """
        tiny, _, shared, _ = self.private_guest()
        self.host_fill(shared, HOST_VALUE)
        pin = self.own(PipePin(shared, 0, PAGE_SIZE))
        tiny.vm.set_memory_attributes(TEST_GPA, PAGE_SIZE, PRIVATE)
        tiny.run(guest_code.FILL_PAGES, timeout=DEADLINE, edi=TEST_GPA, ecx=1, eax=SECRET)
        views = {"mapping": shared.read(0, PAGE_SIZE), "pin": pin.read_all()}
        self.check(
            no_secret_visible(
                "shared page mapped and pinned before conversion",
                SECRET.to_bytes(4, "little"),
                views,
            )
        )
        tiny.vm.set_memory_attributes(TEST_GPA, PAGE_SIZE, 0)
        self.check(
            values_match(
                "H7",
                "back to shared the guest reads the host's page",
                [HOST_VALUE],
                self.guest_reads(tiny, 1),
            )
        )

    def test_in_place_conversion_of_a_pinned_page_fails_with_eagain(self) -> None:
        """H7 (in-place conversion): converting a pinned shared guest_memfd page to private
        with KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fails with EAGAIN. Gated on
        KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES, whose number is not final upstream.

        :avocado: tags=H7,pin,in-place
        """
        number = os.environ.get("CVMLAB_CAP_GMEM_MEMORY_ATTRIBUTES", "")
        if not number.isdigit():
            self.cancel(
                "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES has no number upstream yet "
                "(in-place conversion RFC v4, expected in 7.4); set "
                "CVMLAB_CAP_GMEM_MEMORY_ATTRIBUTES=N for a kernel that has it"
            )
        if not self.kvm.check_extension(int(number)):
            self.cancel(f"capability {number} (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) is 0 here")
        tiny = self.tiny_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        flags = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
        gmem = self.gmem(tiny.vm, SIZE, flags)
        mapping = self.own(gmem.map())
        mapping.write(0, b"pinned")
        self.own(PipePin(mapping, 0, PAGE_SIZE))
        attrs = uapi.KvmMemoryAttributes2(address=0, size=PAGE_SIZE, attributes=PRIVATE)
        seen, message = errno_of(
            lambda: gmem._ioctl(
                "KVM_SET_MEMORY_ATTRIBUTES2(guest_memfd, PRIVATE)",
                uapi.KVM_SET_MEMORY_ATTRIBUTES2,
                attrs,
            )
        )
        self.expect_errno(
            errno.EAGAIN, f"in-place conversion of a pinned page ({message})", lambda: _raise(seen)
        )


def _raise(err: int) -> None:
    if err:
        raise OSError(err, os.strerror(err))


def _allocated(fd: int, offset: int) -> bool:
    """Whether the page at `offset` of a memfd holds data (SEEK_DATA lands on it)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) == offset
    except OSError:  # ENXIO: no data at or after offset
        return False
