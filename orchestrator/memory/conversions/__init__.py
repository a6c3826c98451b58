"""Private<->shared conversions as the host sees them: QEMU's trace, guest_memfd, the shared half.

A TDX or SEV-SNP guest converts memory with a hypercall (TDX MapGPA, SNP Page State
Change) or by touching memory whose attribute does not match; QEMU handles both in
`kvm_convert_memory()` (accel/kvm/kvm-all.c): it flips the KVM memory attribute and
frees the half that is no longer used (to private: the shared backing, traced; to
shared: the guest_memfd, untraced). One module per idea:

| module          | what                                                                  |
|-----------------|-----------------------------------------------------------------------|
| `events`        | which trace events to switch on; one trace line -> `ConversionEvent`  |
| `ranges`        | `RangeStates` (last direction per GPA range), `subtract_ranges`       |
| `ledger`        | `ConversionLedger`: events -> `ConversionCounts` and range states     |
| `asked`         | `guest_asked`: what the guest's driver converted (`GuestAsked`)       |
| `observer`      | `ConversionObserver`: events on over QMP, QEMU's trace followed live  |
| `gmem`          | the private half: QEMU's guest_memfd fds and host counters            |
| `shared_half`   | the shared half: is it a hole where memory is private (`HoleReport`)  |

`orchestrator.invariants.conversions` judges what these observe. This package
re-exports every public name, so `from orchestrator.memory.conversions import X` keeps
working; new code may import from the module that defines X.

Lab-only in effect: under TCG no conversion ever reaches QEMU (the guest's
set_memory_decrypted() is a no-op), so on the development machines only the pure
parts (tests/test_conversions.py) and the switching-on against real QEMU 10.0 and 11.1
run.
"""

from __future__ import annotations

from orchestrator.memory.conversions.asked import GuestAsked, guest_asked
from orchestrator.memory.conversions.events import (
    CONVERSION_EVENTS,
    CONVERSION_GROUPS,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    OPTIONAL_EVENTS,
    ConversionEvent,
    EventKind,
    parse_event,
    parse_line,
)
from orchestrator.memory.conversions.gmem import GmemFd, GmemSample, gmem_fds, sample_gmem
from orchestrator.memory.conversions.ledger import ConversionCounts, ConversionLedger
from orchestrator.memory.conversions.observer import (
    ConversionObserver,
    Monitor,
    enable_conversion_events,
)
from orchestrator.memory.conversions.ranges import RangeStates, subtract_ranges
from orchestrator.memory.conversions.shared_half import HoleReport, Planner, shared_half_holes
from orchestrator.qemu.trace import available_events
from orchestrator.units import PAGE, kib

__all__ = [
    "CONVERSION_EVENTS",
    "CONVERSION_GROUPS",
    "KVM_MAP_GPA_RANGE_ENCRYPTED",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE",
    "OPTIONAL_EVENTS",
    "PAGE",
    "ConversionCounts",
    "ConversionEvent",
    "ConversionLedger",
    "ConversionObserver",
    "EventKind",
    "GmemFd",
    "GmemSample",
    "GuestAsked",
    "HoleReport",
    "Monitor",
    "Planner",
    "RangeStates",
    "available_events",
    "enable_conversion_events",
    "gmem_fds",
    "guest_asked",
    "kib",
    "parse_event",
    "parse_line",
    "sample_gmem",
    "shared_half_holes",
    "subtract_ranges",
]
