"""What the guest asked for: the bytes and calls a run of `cvmlab_convert` converted.

The other side of the comparison `orchestrator.invariants.conversions.conversion_verdicts`
makes with QEMU's counts (`ledger.ConversionCounts`). Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.units import PAGE


@dataclass(frozen=True)
class GuestAsked:
    """Bytes and calls the guest's driver converted (successful calls only)."""

    to_shared: int
    to_private: int
    calls_to_shared: int
    calls_to_private: int


def guest_asked(
    pages: int, chunk: int, loops: int, decrypt_ok: int, encrypt_ok: int, page: int = PAGE
) -> GuestAsked:
    """What a run of `cvmlab_convert` converted, from its request and its ok-call counts.

    Every successful set_memory_decrypted() converts one chunk to shared, every
    set_memory_encrypted() one chunk to private. When every call succeeded that is
    `loops * pages` pages each way; with failures, only equal chunks (C divides N) can
    be attributed, so ValueError otherwise.
    """
    chunks = -(-pages // chunk)
    full = loops * chunks
    if decrypt_ok == full and encrypt_ok == full:
        return GuestAsked(loops * pages * page, loops * pages * page, full, full)
    if pages % chunk:
        raise ValueError(
            f"{pages} pages in chunks of {chunk} leave a smaller last chunk: with failed "
            "calls the converted bytes cannot be told apart"
        )
    return GuestAsked(decrypt_ok * chunk * page, encrypt_ok * chunk * page, decrypt_ok, encrypt_ok)
