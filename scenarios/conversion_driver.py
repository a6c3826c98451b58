"""The guest conversion driver: private<->shared conversions from inside the guest.

`cvmlab_convert.ko` (images/minimal/cvmlab-convert) calls set_memory_decrypted() and
set_memory_encrypted() on pages it fills from a seed, and checks their contents as the
kernel documents them (see the module's header comment):

- plain guest (tier tcg, runs everywhere): both calls are no-ops that return 0, so every
  call succeeds and every page keeps its contents;
- TDX / SEV-SNP guest (lab tiers tdx, snp): calls convert for real, contents after a
  conversion are undefined, so only a fresh fill's round trip is checked; here they
  CANCEL with the probe's reason.

    avocado run scenarios/conversion_driver.py
"""

from __future__ import annotations

import errno
import json
from typing import Any, ClassVar

from orchestrator.errors import GuestError
from orchestrator.guest.convert import (
    MODULE,
    CallCounts,
    ConversionResult,
    run_conversions,
    run_request,
    skipped_at_build,
)
from orchestrator.invariants.verdict import holds
from orchestrator.machine_scenario import MachineScenario

# (pages, chunk, loops): one page; chunks that divide the pages; one 2 MiB chunk (a
# split huge mapping of the direct map); a chunk that leaves a smaller last chunk.
RUNS: tuple[tuple[int, int, int], ...] = ((1, 1, 4), (64, 8, 3), (512, 512, 2), (1000, 7, 1))
DEFAULT_SEED = 0x5EED


class _ConversionScenario(MachineScenario):
    """Runs the RUNS through the module and judges each result.

    :avocado: disable
    """

    #: IDs of the platform and count checks: G1/G2 where conversions are real; on a
    #: plain guest they are no-ops, so those checks are cvmlab's own (S3), not G.
    platform_id: ClassVar[str] = "G1"
    counts_id: ClassVar[str] = "G2"

    timeout = 300
    #: The platform the module must report, and the content semantics that go with it.
    platform = "none"

    def setUp(self) -> None:
        super().setUp()
        reason = skipped_at_build(self.image.directory)
        if reason is not None:
            self.cancel(f"the image has no {MODULE}.ko: {reason}")

    def seed(self, index: int) -> int:
        return int(self.params.get("seed", default=DEFAULT_SEED)) + index

    def record_run(self, result: ConversionResult) -> None:
        """Keep every run's JSON as evidence (conversions.jsonl in the test's data dir).

        Not named `record`: that is Scenario.record(verdict), which every check() calls."""
        with (self.evidence_dir / "conversions.jsonl").open("a") as stream:
            stream.write(json.dumps(result.to_json(), sort_keys=True) + "\n")
        self.timeline.record("conversion", "run", **result.to_json())

    def check_counts(self, result: ConversionResult, pages: int, chunk: int, loops: int) -> None:
        """G2: the module did what was asked, and every call succeeded."""
        chunks = -(-pages // chunk)
        asked = {"pages": pages, "chunk": chunk, "loops": loops, "chunks": chunks}
        seen = {"pages": result.pages, "chunk": result.chunk, "loops": result.loops,
                "chunks": result.chunks}  # fmt: skip
        self.check(
            holds(self.counts_id, f"the module ran the request {asked}", seen == asked, seen=seen)
        )
        calls = loops * chunks
        self.check(
            holds(
                self.counts_id,
                f"{calls} set_memory_decrypted() and {calls} set_memory_encrypted() calls, "
                "all returned 0, nothing leaked",
                result.all_calls_succeeded
                and result.decrypt.calls == calls
                and result.encrypt.calls == calls
                and result.first_call_error == 0
                and result.leaked_pages == 0,
                decrypt=result.decrypt,
                encrypt=result.encrypt,
                first_call_error=result.first_call_error,
                leaked_pages=result.leaked_pages,
            )
        )

    def check_contents(self, result: ConversionResult, pages: int, loops: int) -> None:
        """G2: page contents as the platform's semantics promise (subclasses decide)."""
        raise NotImplementedError

    def run_all(self) -> list[ConversionResult]:
        results = []
        for index, (pages, chunk, loops) in enumerate(RUNS):
            result = run_conversions(self.guest, pages, self.seed(index), loops, chunk)
            self.record_run(result)
            self.log.info(
                "pages=%d chunk=%d loops=%d: %d+%d calls in %.1f ms",
                pages, chunk, loops, result.decrypt.calls, result.encrypt.calls,
                result.elapsed_ns / 1e6,
            )  # fmt: skip
            self.check(
                holds(
                    self.platform_id,
                    f"the module sees platform {self.platform!r}",
                    result.platform == self.platform,
                    platform=result.platform,
                )
            )
            self.check_counts(result, pages, chunk, loops)
            self.check_contents(result, pages, loops)
            results.append(result)
        return results


class ConversionDriver(_ConversionScenario):
    """
    :avocado: enable
    :avocado: tags=smoke,tier:tcg,conversion

    Without memory encryption every call is a no-op: these are self-checks of the
    driver and the harness (S1 refusals, S2 injected failures, S3 no-op steps), never
    evidence that a conversion invariant (G1/G2) holds.
    """

    platform_id = "S3"
    counts_id = "S3"

    def check_contents(self, result: ConversionResult, pages: int, loops: int) -> None:
        # Each loop checks each page twice for preservation (after decrypt, after
        # encrypt) and twice for the round trip of a fresh fill.
        checks = 2 * pages * loops
        self.check(
            holds(
                "S3",
                "without memory encryption the calls are no-ops: contents are preserved "
                f"({checks} page checks) and fresh fills read back ({checks})",
                result.contents_after_conversion == "preserved"
                and result.preserved.checked_pages == checks
                and result.roundtrip.checked_pages == checks
                and result.contents_ok,
                preserved=result.preserved,
                roundtrip=result.roundtrip,
                first_mismatch=result.first_mismatch,
            )
        )

    def test_conversions_succeed_and_preserve_contents_on_a_plain_guest(self) -> None:
        """G2 on tier tcg: every call is a no-op that succeeds; contents survive; log clean."""
        self.run_all()
        self.check_guest_log_clean()

    def test_module_refuses_a_bad_request_with_its_errno(self) -> None:
        """A request the module refuses comes back as GuestError with its message and errno."""
        with self.assertRaises(GuestError) as caught:
            run_request(self.guest, "pages=0 loops=1")
        message = str(caught.exception)
        self.check(
            holds(
                "S1",
                "the module refuses pages=0 with EINVAL and says why",
                "pages=0 out of range" in message and "EINVAL" in message,
                error=message,
            )
        )
        # A refused request leaves the module usable.
        result = run_conversions(self.guest, pages=4, seed=self.seed(0), loops=1, chunk=2)
        self.check_counts(result, 4, 2, 1)
        self.check_guest_log_clean()

    def test_a_failed_conversion_is_counted_and_its_chunk_leaked(self) -> None:
        """The failure path on tier tcg, where no call fails by itself: `fail_call=4` makes
        the module report -EIO for its 4th call instead of making it.

        8 pages in chunks of 2, 3 loops: call 4 is loop 0's set_memory_encrypted() of
        chunk 1, so that chunk (2 pages) is leaked and skipped from then on: 4 + 3 + 3 calls
        each way, one failed. Pages checked (each twice per loop and kind): 3 chunks x 2
        pages x 2 x 3 loops, plus the failed chunk's 2 pages once after its decrypt = 38.
        """
        result = run_conversions(
            self.guest, pages=8, seed=self.seed(0), loops=3, chunk=2, fail_call=4
        )
        self.record_run(result)
        self.check(
            holds(
                "S2",
                "the injected failure is counted (encrypt 10 calls, 9 ok, 1 failed with EIO), "
                "its chunk leaked (2 pages) and not converted again (decrypt 10 calls)",
                result.decrypt == CallCounts(10, 10, 0)
                and result.encrypt == CallCounts(10, 9, 1)
                and result.injected_failures == 1
                and result.first_call_error == -errno.EIO
                and result.leaked_pages == result.leaked_pages_total == 2,
                decrypt=result.decrypt,
                encrypt=result.encrypt,
                first_call_error=result.first_call_error,
                leaked_pages=result.leaked_pages,
            )
        )
        self.check(
            holds(
                "S2",
                "the other chunks keep their contents through every call (38 page checks)",
                result.contents_ok
                and result.preserved.checked_pages == 38
                and result.roundtrip.checked_pages == 38,
                preserved=result.preserved,
                roundtrip=result.roundtrip,
            )
        )
        # The module stays usable, and remembers what it leaked.
        again = run_conversions(self.guest, pages=4, seed=self.seed(1), loops=1, chunk=2)
        self.check_counts(again, 4, 2, 1)
        self.check(
            holds(
                "S2",
                "the next run leaks nothing and the module still counts 2 leaked pages",
                again.leaked_pages == 0 and again.leaked_pages_total == 2,
                leaked_pages_total=again.leaked_pages_total,
            )
        )
        self.check_guest_log_clean()


class _ConfidentialConversion(_ConversionScenario):
    """Lab only (tiers tdx/snp): conversions for real; contents after them are undefined.

    The lab gives the rest of the machine (firmware=, and for SNP cbitpos= and
    reduced_phys_bits=) as parameters.

    :avocado: disable
    """

    confidential = ""

    def machine_params(self) -> dict[str, Any]:
        params = super().machine_params()
        params.setdefault("confidential", self.confidential)
        params.setdefault("accel", "kvm")
        params.setdefault("cpu", "host")
        return params

    def check_contents(self, result: ConversionResult, pages: int, loops: int) -> None:
        checks = 2 * pages * loops
        self.check(
            holds(
                "G2",
                "contents after a conversion are undefined, so none are compared; every fresh "
                f"fill reads back ({checks} page checks)",
                result.contents_after_conversion == "undefined"
                and result.preserved.checked_pages == 0
                and result.roundtrip.checked_pages == checks
                and result.contents_ok,
                preserved=result.preserved,
                roundtrip=result.roundtrip,
                first_mismatch=result.first_mismatch,
            )
        )

    def run_confidential(self) -> None:
        """G2 on a confidential guest: every call converts and succeeds; log clean."""
        self.run_all()
        self.check_guest_log_clean()


class ConversionDriverTdx(_ConfidentialConversion):
    """
    :avocado: enable
    :avocado: tags=tier:tdx,conversion
    """

    tiers = ("tdx",)
    confidential = "tdx"
    platform = "tdx"

    def test_tdx_conversions_succeed_and_fresh_fills_round_trip(self) -> None:
        self.run_confidential()


class ConversionDriverSnp(_ConfidentialConversion):
    """
    :avocado: enable
    :avocado: tags=tier:snp,conversion
    """

    tiers = ("snp",)
    confidential = "snp"
    platform = "sev-snp"

    def test_snp_conversions_succeed_and_fresh_fills_round_trip(self) -> None:
        self.run_confidential()
