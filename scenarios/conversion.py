"""Conversion storms on a TDX or SEV-SNP guest, judged on both sides (G2, H2, H8).

Lab only (tiers tdx, snp; elsewhere every variant CANCELs with the probe's reason).
The guest's driver (`cvmlab_convert.ko`, orchestrator.guest.convert) converts N pages
private->shared->private L times in chunks of C; QEMU's trace is switched on over QMP
and followed (orchestrator.memory.conversions.observer.ConversionObserver).

`ConversionStorm`, one storm per size in `storm_pages` (variants: coco.yaml platforms,
sizes from conversion.yaml, larger ones in conversion-stress.yaml):
- G2: every call succeeded, nothing leaked, every fresh fill read back;
- G2: QEMU saw what the guest did: KVM_HC_MAP_GPA_RANGE bytes per direction cover the
  driver's (plus at most what the rest of the guest converts meanwhile: the rate seen
  while an idle SSH command ran, plus `allowance_kib`), each call reached QEMU, QEMU
  converted every request;
- H2: every conversion to private discarded the shared half (trace bytes equal), no
  discard failed; after the storms, every GPA whose last conversion was to private is a
  hole in the shared backing (SEEK_DATA on QEMU's memfd, page by page);
- G3, H8.

`ConversionLeftShared` (H2, the other half): `fail_call=2` makes the driver skip the
re-encryption of its only chunk, so 4 MiB stay shared. QEMU must then have converted
exactly that range to shared; the shared half holds it (the guest wrote it), and
guest_memfd no longer does: host-wide `Unevictable` (where guest_memfd folios are
counted) falls by the chunk, measured under the host lock (the driver wrote the
chunk while it was private, so guest_memfd backed it: a QEMU that keeps the private
half leaves Unevictable where it was, the double-backing bug, and FAILs). The driver
keeps the chunk (leaked, never freed), so the guest stays healthy.

    avocado run scenarios/conversion.py -m scenarios/variants/conversion.yaml
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.guest.convert import MODULE, ConversionResult, run_conversions, skipped_at_build
from orchestrator.host.meminfo import meminfo_field
from orchestrator.host.settle import Settled, settle
from orchestrator.invariants.conversions import (
    conversion_verdicts,
    private_half_released,
    shared_half_verdict,
)
from orchestrator.invariants.verdict import Tolerance, holds, within
from orchestrator.machine_scenario import MachineScenario
from orchestrator.memory.conversions.asked import guest_asked
from orchestrator.memory.conversions.ledger import ConversionCounts
from orchestrator.memory.conversions.observer import ConversionObserver
from orchestrator.memory.conversions.ranges import subtract_ranges
from orchestrator.memory.conversions.shared_half import shared_half_holes
from orchestrator.memory.host_punch import HostPuncher
from orchestrator.qemu.argv import RAM_ID
from orchestrator.qemu.trace import trace_output
from orchestrator.timeline import now
from orchestrator.units import PAGE, MiB, kib

DEFAULT_PAGES = (1, 64, 512, 4096)
DEFAULT_CHUNK = 64
DEFAULT_LOOPS = 4
DEFAULT_ALLOWANCE_KIB = 256
SEED = 0xC0C0
#: The left-shared test: one 4 MiB chunk (the driver's largest), decrypted, never re-encrypted.
LEFT_PAGES = 1024
LOCK_TIMEOUT = 300.0


def _int_list(value: Any) -> list[int]:
    """A list from YAML ([1, 64]) or from -p ("1,64")."""
    if isinstance(value, (list, tuple)):
        return [int(str(v), 0) for v in value]
    return [int(v, 0) for v in str(value).replace(",", " ").split()]


class _ConversionScenario(MachineScenario):
    """A confidential guest with the driver loaded and QEMU's conversion trace followed.

    :avocado: disable
    """

    timeout = 1800
    boot_timeout = 300.0

    observer: ConversionObserver
    puncher: HostPuncher

    def setUp(self) -> None:
        super().setUp()
        if self.spec.confidential is None:
            self.cancel("conversion storms need a confidential variant (confidential=tdx|snp)")
        reason = skipped_at_build(self.image.directory)
        if reason is not None:
            self.cancel(f"the image has no {MODULE}.ko: {reason}")
        self.observer = ConversionObserver(
            self.machine.qmp,
            trace_output(self.evidence_dir, self.spec.trace_events),
            self.timeline,
        ).start()
        # The shared half must be a memfd/file mapped shared (coco.yaml): checked here.
        self.puncher = HostPuncher(self.machine.qmp, self.machine.pid)
        self.puncher.backing(RAM_ID)

    def stop_observers(self) -> None:
        observer = getattr(self, "observer", None)
        if observer is not None:
            del self.observer  # once: stop_observers runs in the finish phase and tearDown
            totals = observer.stop()
            (self.evidence_dir / "conversion-counts.json").write_text(
                json.dumps(totals.to_json(), indent=2)
            )
        super().stop_observers()

    def tearDown(self) -> None:
        self.stop_observers()
        super().tearDown()

    def record_storm(
        self, result: ConversionResult, seen: ConversionCounts, seconds: float
    ) -> None:
        """One run's guest and QEMU counts, appended to conversions.jsonl. Not named
        `record`: that is Scenario.record(verdict), which every check() calls."""
        with (self.evidence_dir / "conversions.jsonl").open("a") as stream:
            entry = {"guest": result.to_json(), "qemu": seen.to_json(), "seconds": seconds}
            stream.write(json.dumps(entry, sort_keys=True) + "\n")


class ConversionStorm(_ConversionScenario):
    """
    :avocado: enable
    :avocado: tags=confidential,conversion,stress,tier:tdx,tier:snp
    """

    scenario_keys = frozenset({"storm_pages", "storm_chunk", "storm_loops", "allowance_kib"})

    def background(self) -> tuple[ConversionCounts, float]:
        """What the guest converts by itself while an idle SSH command runs, and how long."""
        before = self.observer.counts()
        started = now()
        self.guest.run("true", timeout=30)
        return self.observer.counts().minus(before), now() - started

    def test_storms_match_between_guest_and_qemu_and_leave_nothing_backed_twice(self) -> None:
        sizes = _int_list(self.params.get("storm_pages", default=list(DEFAULT_PAGES)))
        chunk_max = int(self.params.get("storm_chunk", default=DEFAULT_CHUNK))
        loops = int(self.params.get("storm_loops", default=DEFAULT_LOOPS))
        slack = int(self.params.get("allowance_kib", default=DEFAULT_ALLOWANCE_KIB)) * 1024
        idle, idle_seconds = self.background()
        rate = (idle.to_private + idle.to_shared) / max(idle_seconds, 1e-3)
        self.log.info("background: %s in %.2f s", idle.to_json(), idle_seconds)

        for index, pages in enumerate(sizes):
            chunk = min(pages, chunk_max)
            before = self.observer.counts()
            started = now()
            result = run_conversions(self.guest, pages, SEED + index, loops, chunk)
            seconds = now() - started
            seen = self.observer.counts().minus(before)
            self.record_storm(result, seen, seconds)
            self.log.info(
                "storm pages=%d chunk=%d loops=%d: guest %d+%d calls, QEMU %s in %.2f s",
                pages, chunk, loops, result.decrypt.calls, result.encrypt.calls,
                seen.to_json(), seconds,
            )  # fmt: skip
            what = f"storm of {pages} pages x {loops} loops in chunks of {chunk}"
            self.check(
                holds(
                    "G2",
                    f"{what}: every call succeeded, nothing leaked, every fresh fill read back",
                    result.all_calls_succeeded
                    and result.leaked_pages == 0
                    and result.contents_ok
                    and result.roundtrip.checked_pages == 2 * pages * loops,
                    decrypt=result.decrypt,
                    encrypt=result.encrypt,
                    roundtrip=result.roundtrip,
                    first_mismatch=result.first_mismatch,
                )
            )
            asked = guest_asked(pages, chunk, loops, result.decrypt.ok, result.encrypt.ok)
            allowance = slack + int(rate * seconds)
            for verdict in conversion_verdicts(asked, seen, allowance):
                self.check(verdict)

        private = self.observer.ledger.ranges(private=True)
        self.check(shared_half_verdict(shared_half_holes(self.puncher, private)))
        self.check_guest_log_clean()
        self.check_host_log_clean()


class ConversionLeftShared(_ConversionScenario):
    """
    :avocado: enable
    :avocado: tags=confidential,conversion,tier:tdx,tier:snp
    """

    def before_launch(self) -> None:
        # Host-wide Unevictable is judged: once the tiers are there, no other measuring
        # test may boot until this one ends.
        self.take_host_lock(LOCK_TIMEOUT)

    def unevictable(self) -> Settled:
        return settle(
            lambda: meminfo_field("Unevictable"), tolerance=MiB, window=3, interval=0.2,
            timeout=20,
        )  # fmt: skip

    def test_a_range_left_shared_is_backed_by_the_shared_half_only(self) -> None:
        shared_before = self.observer.ledger.ranges(private=False)
        unevictable_before = self.unevictable()
        before = self.observer.counts()
        result = run_conversions(
            self.guest, LEFT_PAGES, SEED, loops=1, chunk=LEFT_PAGES, fail_call=2
        )
        seen = self.observer.counts().minus(before)
        self.record_storm(result, seen, 0.0)
        size = LEFT_PAGES * PAGE
        self.check(
            holds(
                "G2",
                f"the driver converted its {size // MiB} MiB chunk to shared, skipped the "
                "re-encryption (injected) and kept the chunk",
                result.decrypt.ok == 1
                and result.encrypt.failed == 1
                and result.injected_failures == 1
                and result.leaked_pages == LEFT_PAGES,
                decrypt=result.decrypt,
                encrypt=result.encrypt,
                leaked_pages=result.leaked_pages,
            )
        )
        new_shared = subtract_ranges(self.observer.ledger.ranges(private=False), shared_before)
        left = sum(n for _g, n in new_shared)
        self.check(
            within(
                "G2",
                "QEMU converted exactly the chunk to shared and nothing back",
                expected=kib(size),
                seen=kib(left),
                tolerance=Tolerance(),
                unit="KiB",
                ranges=[[hex(g), n] for g, n in new_shared],
                qemu=seen.to_json(),
            )
        )
        report = shared_half_holes(self.puncher, new_shared)
        backed = sum(n for _g, n in report.backed)
        self.check(
            within(
                "H2",
                "the shared half now holds the chunk (the guest wrote it after converting)",
                expected=kib(size),
                seen=kib(backed),
                tolerance=Tolerance(),
                unit="KiB",
                **report.to_json(),
            )
        )
        unevictable_after = self.unevictable()
        self.check(
            private_half_released(
                size,
                unevictable_before.value,
                unevictable_after.value,
                settled=unevictable_before.ok and unevictable_after.ok,
            )
        )
        self.check_guest_log_clean()
        self.check_host_log_clean()
