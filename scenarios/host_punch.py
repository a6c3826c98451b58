"""Host punch injection: the host frees guest pages under a live buffer; both sides judge it.

The guest helper (`cvmlab-mem`, in the default image) holds a locked buffer with a
seeded pattern and reports the guest physical address of every page. The host then
punches some of those pages out of QEMU's backing file (orchestrator.memory.host_punch:
QEMU's own fd via pidfd_getfd, then fallocate PUNCH_HOLE), the way a buggy host
component would, and checks:

- H2: the backing's allocation fell by exactly the punched amount, and each punched
  range is a hole in the file right after the punch (SEEK_DATA);
- H3/G2: the guest reads zeros exactly on the punched pages and the pattern everywhere
  else in its buffer;
- H8: the host kernel log stays clean and QEMU keeps running; G3: the guest log too.

Per backend (scenarios/variants/host_punch.yaml):
- memfd and file with share=on: the checks above;
- memfd with share=off: the punch is refused with a clear error; forced, it "succeeds"
  and even frees page cache while the guest keeps its data (a host counter alone would
  call that a success; the guest's verify shows it is not);
- anonymous RAM: no other process can free it; the refusal is asserted, not skipped;
- memfd 3G: guest RAM straddles the below-4G split; the punched pages are above 4 GiB.

`HostPunchKernelMemory` (tag `negative`, opt-in with `-p punch_kernel=on`) punches the
guest kernel's own data and expects the guest to die loudly while the host stays healthy.

    avocado run scenarios/host_punch.py -m scenarios/variants/host_punch.yaml
    avocado run scenarios/host_punch.py:HostPunchKernelMemory -p punch_kernel=on -p backend=memfd
"""

from __future__ import annotations

import re

from orchestrator.errors import GuestError, MemoryOpError
from orchestrator.guest.memhelper import HoldReport, MemHelper, VerifyReport, ssh_runner
from orchestrator.invariants.verdict import Tolerance, holds, within
from orchestrator.machine_scenario import MachineScenario
from orchestrator.memory.host_punch import HostPuncher, anon_discard_refused
from orchestrator.timeline import now
from orchestrator.units import PAGE, GiB

BUFFER_MIB = 16
DEFAULT_SEED = 0x5EED
FOUR_GIB = 4 * GiB
# (fraction of the buffer where the run starts, pages): one lone page and a run of three.
TARGETS = ((1, 3, 1), (2, 3, 3))
# Seconds for QEMU to end after the guest's kernel data is punched (measured: < 1 s).
EXIT_DEADLINE = 60.0
# This file's own parameters (both classes run in one job, so both accept both).
PUNCH_PARAMS = frozenset({"punch_above_4g", "punch_kernel"})


class HostPunch(MachineScenario):
    """
    :avocado: enable
    :avocado: tags=smoke,tier:tcg,tier:kvm,punch
    """

    timeout = 300
    scenario_keys = PUNCH_PARAMS

    def helper(self) -> MemHelper:
        return MemHelper(ssh_runner(self.guest))

    def hold_buffer(self, helper: MemHelper) -> HoldReport:
        """Hold the buffer and check it reads back clean before the host does anything."""
        seed = int(self.params.get("seed", default=DEFAULT_SEED))
        # The host punches the GPAs hold reports: they must not change under it.
        helper.keep_locked_pages_in_place()
        hold = helper.hold(mib=BUFFER_MIB, seed=seed, lock=True)
        self.timeline.record("guest", "hold", pages=hold.pages, pid=hold.pid, fill_ms=hold.fill_ms)
        before = helper.verify()
        self.check(
            holds(
                "G2",
                f"the guest's {hold.pages}-page buffer reads back its pattern before any punch",
                before.clean,
                bad_pages=before.bad_pages,
                first_bad_offset=before.first_bad_offset,
            )
        )
        return hold

    def pick_pages(self, helper: MemHelper, hold: HoldReport) -> list[int]:
        """Pages to punch: a lone page and a run of three, in the buffer's middle.

        Only pages whose GPA is still the one reported at hold time qualify (even mlocked
        pages can be migrated); above 4 GiB only, when the variant asks for it.
        """
        now_gpas = helper.gpas()
        above_4g = bool(self.params.get("punch_above_4g", default=False))

        def usable(page: int) -> bool:
            gpa = hold.gpas[page]
            return (
                gpa is not None and now_gpas.gpas[page] == gpa and (not above_4g or gpa >= FOUR_GIB)
            )

        candidates = [p for p in range(hold.pages) if usable(p)]
        pages: list[int] = []
        for numerator, denominator, count in TARGETS:
            start = hold.pages * numerator // denominator
            run = next(
                (
                    c
                    for c in candidates
                    if c >= start
                    and all(usable(c + i) for i in range(count))
                    and not set(range(c, c + count)) & set(pages)
                ),
                None,
            )
            if run is None:
                raise GuestError(
                    f"no run of {count} usable page(s) from page {start} of the buffer",
                    "pages moved since hold, or none is above 4 GiB",
                    detail=f"moved since hold: {now_gpas.moved}, above 4 GiB required: {above_4g}",
                )
            pages += range(run, run + count)
        self.log.info("punching pages %s at GPAs %s", pages,
                      [hex(hold.page_gpa(p)) for p in pages])  # fmt: skip
        return pages

    def test_punched_pages_read_zero_and_neighbours_keep_the_pattern(self) -> None:
        """H2, H3, G2, H8, G3 for the variant's backend (see the module docstring)."""
        puncher = HostPuncher(self.machine.qmp, self.machine.pid, timeline=self.timeline)
        ram = puncher.memory_map.memdev(puncher.memory_map.machine_memdev)
        if ram.page_size > PAGE:
            # A punch frees whole backing pages: a 2 MiB hugetlb page holds other guest
            # memory next to the buffer's 4 KiB pages (the guest kernel's included).
            self.cancel(
                f"host punch punches single {PAGE // 1024} KiB guest pages; backend "
                f"{ram.id} has {ram.page_size // 1024} KiB pages, each holding other guest memory"
            )
        helper = self.helper()
        hold = self.hold_buffer(helper)
        backend = self.spec.backend
        if backend.kind == "anon":
            self.anonymous_ram_is_refused(puncher, helper, hold)
        elif not backend.share:
            self.private_mapping_keeps_guest_data(puncher, helper, hold)
        else:
            self.shared_backing_is_punched(puncher, helper, hold)
        self.check(
            holds("H8", "QEMU is still running after the punch", self.machine.running,
                  returncode=self.machine.returncode)
        )  # fmt: skip
        self.check_host_log_clean()
        self.check_guest_log_clean()
        release_ms = helper.release()
        self.timeline.record("guest", "release", wait_ms=release_ms)

    # --- per backend ------------------------------------------------------------------------

    def shared_backing_is_punched(
        self, puncher: HostPuncher, helper: MemHelper, hold: HoldReport
    ) -> None:
        pages = self.pick_pages(helper, hold)
        punched = len(pages) * hold.page_size
        records = puncher.punch_pages([hold.page_gpa(p) for p in pages], hold.page_size)
        punch_end = max(r.t_end for r in records)
        self.check(
            within(
                "H2",
                f"the backing's allocation (st_blocks) fell by the {punched} bytes punched",
                punched,
                sum(r.freed for r in records),
                Tolerance(),
                pieces=[(hex(r.gpa), r.length, r.memdev, hex(r.offset), r.freed) for r in records],
                target=records[0].target,
                fallocate_us=[round(r.seconds * 1e6, 1) for r in records],
            )
        )
        self.check(
            holds(
                "H2",
                "every punched range is a hole in the backing right after the punch (SEEK_DATA)",
                all(r.hole_after for r in records),
                holes=[r.hole_after for r in records],
            )
        )
        report = helper.verify(expect_zero=hold.gpa_ranges(pages))
        settled = now() - punch_end
        self.timeline.record(
            "guest",
            "verify",
            bad_pages=report.bad_pages,
            zero_pages=list(report.zero_pages),
            punch_to_verify_s=settled,
        )
        self.check_zero_exactly_there(report, pages, settled)

    def check_zero_exactly_there(
        self, report: VerifyReport, pages: list[int], settled: float
    ) -> None:
        self.check(
            holds(
                "H3",
                f"the guest reads zeros on all {len(pages)} punched pages",
                report.expected_zero_pages == len(pages) and report.expected_zero_ok == len(pages),
                expected_zero_pages=report.expected_zero_pages,
                expected_zero_ok=report.expected_zero_ok,
                punch_to_guest_verify_s=round(settled, 3),
            )
        )
        self.check(
            holds(
                "G2",
                "every other page of the buffer keeps its pattern, and no other page is zero",
                report.clean and sorted(report.zero_pages) == sorted(pages),
                bad=[(b.page, b.kind, b.offset) for b in report.bad],
                zero_pages=report.zero_pages,
                first_bad_offset=report.first_bad_offset,
            )
        )

    def private_mapping_keeps_guest_data(
        self, puncher: HostPuncher, helper: MemHelper, hold: HoldReport
    ) -> None:
        pages = self.pick_pages(helper, hold)
        gpas = [hold.page_gpa(p) for p in pages]
        refused = ""
        try:
            puncher.punch_pages(gpas, hold.page_size)
        except MemoryOpError as error:
            refused = str(error)
        self.check(
            holds("S1", "cvmlab refuses a punch of a share=off backend, with a clear error",
                  "mapped private" in refused, error=refused)
        )  # fmt: skip
        records = puncher.punch_pages(gpas, hold.page_size, allow_private=True)
        report = helper.verify(expect_zero=hold.gpa_ranges(pages))
        kept = sorted(b.page for b in report.bad if b.kind == "not_zero")
        self.check(
            holds(
                "H3",
                "forced anyway, fallocate succeeds but the guest keeps its data on every "
                "punched page (its pages are QEMU's private copies), and nothing else changed",
                kept == sorted(pages) and report.bad_pages == len(pages),
                kept_pages=kept,
                bad=[(b.page, b.kind) for b in report.bad],
                freed_page_cache=sum(r.freed for r in records),
            )
        )

    def anonymous_ram_is_refused(
        self, puncher: HostPuncher, helper: MemHelper, hold: HoldReport
    ) -> None:
        refused = ""
        try:
            puncher.punch_pages([hold.page_gpa(hold.pages // 2)], hold.page_size)
        except MemoryOpError as error:
            refused = str(error)
        self.check(
            holds(
                "S1",
                "cvmlab refuses to punch anonymous guest RAM from outside QEMU, saying why",
                "anonymous memory" in refused and "process_madvise" in refused,
                error=refused,
            )
        )
        self.check(
            holds(
                "H3",
                "this kernel refuses process_madvise(MADV_DONTNEED) on another process (EINVAL)",
                anon_discard_refused(),
            )
        )
        after = helper.verify()
        self.check(holds("G2", "the refused punch touched nothing", after.clean,
                         bad_pages=after.bad_pages))  # fmt: skip


_KERNEL_DATA = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) : Kernel data$", re.MULTILINE)


class HostPunchKernelMemory(MachineScenario):
    """Punch the guest kernel's own data: the guest must die loudly, the host stay healthy.

    Opt-in (it kills its guest on purpose): `-p punch_kernel=on`, with a memfd or file
    backend shared with QEMU (`-p backend=memfd`).

    :avocado: enable
    :avocado: tags=negative,tier:tcg,tier:kvm,punch
    """

    timeout = 300
    scenario_keys = PUNCH_PARAMS
    cold_boot = (
        "it punches the kernel's data pages as a boot left them backed; a restore backs"
        " only their non-zero pages"
    )

    def setUp(self) -> None:
        # Decide before booting: a CANCEL here costs no guest.
        if not self.params.get("punch_kernel", default=False):
            self.cancel("opt-in negative test: run with -p punch_kernel=on")
        super().setUp()
        if self.spec.backend.kind == "anon" or not self.spec.backend.share:
            self.cancel(f"needs a shared memfd or file backend, not {self.spec.backend}")

    def test_punching_kernel_data_kills_the_guest_and_spares_the_host(self) -> None:
        self.expect_guest_crash("the test punches the guest kernel's data and judges the crash")
        iomem = self.guest.run(["cat", "/proc/iomem"], timeout=30).stdout
        match = _KERNEL_DATA.search(iomem)
        if match is None:
            raise GuestError("no 'Kernel data' line in the guest's /proc/iomem", "", iomem)
        page = 4096
        start = -(-int(match.group(1), 16) // page) * page
        end = (int(match.group(2), 16) + 1) // page * page
        puncher = HostPuncher(self.machine.qmp, self.machine.pid, timeline=self.timeline)
        mark = self.machine.qmp.mark()
        (record,) = puncher.punch(start, end - start)
        self.log.info("punched the guest's kernel data %#x-%#x (%d bytes freed)",
                      start, end - 1, record.freed)  # fmt: skip
        # The loud end comes from QEMU (SHUTDOWN guest-reset: a triple fault, which
        # -no-reboot turns into an exit) or the console (oops/panic): wait for either.
        status = self.machine.wait_exited(EXIT_DEADLINE)
        shutdowns = [e.data for e in self.machine.qmp.events("SHUTDOWN") if e.seq >= mark]
        crash = self.machine.crashed.line if self.machine.crashed is not None else None
        # Once the end is known, a guest command must fail with the guest error, not hang.
        failure = ""
        try:
            self.guest.run(["echo", "alive"], timeout=30)
        except GuestError as error:  # GuestCrashed included
            failure = f"{type(error).__name__}: {error}"
        self.check(
            holds(
                "G3",
                "expected failure: the guest dies loudly once its kernel data is gone "
                "(QEMU reports a guest-initiated shutdown or the console shows a crash, and "
                "guest commands fail with a GuestError)",
                bool(failure) and (any(e.get("guest") for e in shutdowns) or crash is not None),
                failure=failure,
                shutdown_events=shutdowns,
                crash=crash,
                punched=(hex(start), end - start, record.freed),
            )
        )
        self.check(
            holds(
                "H8",
                "QEMU ended by itself, not by a signal (exit status >= 0)",
                status is not None and status >= 0,
                status=status,
            )
        )
        self.check_host_log_clean()

    def _save_guest_dmesg(self) -> str | None:
        # The guest is dead on purpose: there is no dmesg to fetch.
        if self.machine.running and self.machine.crashed is None:
            return super()._save_guest_dmesg()
        return None
