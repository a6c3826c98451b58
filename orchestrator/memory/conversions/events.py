"""QEMU's conversion trace events: which to switch on, and one line parsed into an event.

A TDX or SEV-SNP guest converts memory with a hypercall (TDX MapGPA, SNP Page State
Change), which KVM hands to QEMU as KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE); a guest
that touches memory whose attribute does not match gets KVM_EXIT_MEMORY_FAULT. QEMU
handles both in `kvm_convert_memory()` (accel/kvm/kvm-all.c) and traces them.

Trace formats (QEMU trace-events-all of 10.0.2 and 11.1.3, `log` backend; a line is
`<name> <args>`, preceded by `<tid>@<sec>.<usec>:` (10.0) or an ISO-8601 time and a
space (11.1) with `-msg timestamp=on`; scripts/tracetool/backend/log.py):

    kvm_convert_memory start 0x%x size 0x%x shared_to_private|private_to_shared
    kvm_memory_fault start 0x%x size 0x%x flags 0x%x        (KVM_MEMORY_EXIT_FLAG_PRIVATE = 1<<3)
    kvm_hc_map_gpa_range gpa 0x%x size 0x%x attributes 0x%x flags 0x%x
                                    (size in bytes: args[1] * TARGET_PAGE_SIZE before the trace;
                                     attributes & KVM_MAP_GPA_RANGE_ENCRYPTED (1<<4): to private)
    ram_block_discard_range %s@%p + 0x%zx: madvise: %d fallocate: %d ret: %d
    ram_block_attributes_state_change offset 0x%x size 0x%x from '%s' to '%s'   (10.1+)

The discard is `ram_block_discard_range` (QEMU <= 11.0) or
`ram_block_discard_shared_range` (11.1); line prefixes and the discard's arguments are
`orchestrator.qemu.trace`'s, this module parses the conversion events' own arguments.
Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from orchestrator.qemu.trace import (
    DISCARD_EVENTS,
    DISCARD_GROUP,
    EventGroup,
    is_discard,
    parse_discard,
    split_line,
)

#: include/uapi/linux/kvm_para.h
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
#: include/uapi/linux/kvm.h
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

_NEEDS_KVM = "use QEMU >= 9.1 built with KVM and a trace backend (Debian's has 'log')"
#: The events a conversion leaves in QEMU's trace, one group per notion; the discard
#: group is ram_block_discard_range (<= 11.0) or ram_block_discard_shared_range (11.1).
CONVERSION_GROUPS: tuple[EventGroup, ...] = (
    EventGroup("kvm_convert_memory", ("kvm_convert_memory",), needs=_NEEDS_KVM),
    EventGroup("kvm_memory_fault", ("kvm_memory_fault",), needs=_NEEDS_KVM),
    EventGroup("kvm_hc_map_gpa_range", ("kvm_hc_map_gpa_range",), needs=_NEEDS_KVM),
    DISCARD_GROUP,
    # Switched on when this QEMU has it (10.1+: RamBlockAttributes).
    EventGroup(
        "RAMBlock attribute changes", ("ram_block_attributes_state_change",), required=False
    ),
)
#: Every name of the required groups (each QEMU has one of the two DISCARD_EVENTS).
CONVERSION_EVENTS: tuple[str, ...] = (
    "kvm_convert_memory",
    "kvm_memory_fault",
    "kvm_hc_map_gpa_range",
    *DISCARD_EVENTS,
)
OPTIONAL_EVENTS: tuple[str, ...] = ("ram_block_attributes_state_change",)

EventKind = Literal["convert", "fault", "hypercall", "discard", "attributes"]

_HEX = r"0x[0-9a-fA-F]+"
_CONVERT = re.compile(
    rf"^start (?P<start>{_HEX}) size (?P<size>{_HEX}) (?P<msg>shared_to_private|private_to_shared)$"
)
_FAULT = re.compile(rf"^start (?P<start>{_HEX}) size (?P<size>{_HEX}) flags (?P<flags>{_HEX})$")
_HYPERCALL = re.compile(
    rf"^gpa (?P<gpa>{_HEX}) size (?P<size>{_HEX}) attributes (?P<attributes>{_HEX}) "
    rf"flags (?P<flags>{_HEX})$"
)
_ATTRIBUTES = re.compile(
    rf"^offset (?P<offset>{_HEX}) size (?P<size>{_HEX}) from '(?P<from>\w+)' to '(?P<to>\w+)'$"
)


@dataclass(frozen=True)
class ConversionEvent:
    """One conversion-related trace line, parsed.

    `address` is a GPA (convert, fault, hypercall), QEMU's host address (discard) or
    an offset in the RAMBlock (attributes); `to_private` is None for discards.
    """

    kind: EventKind
    address: int
    size: int
    to_private: bool | None
    ramblock: str | None = None  # discard
    ret: int = 0  # discard: 0 on success
    flags: int = 0  # fault: KVM's flags; hypercall: the exit's flags


def parse_event(name: str, args: str) -> ConversionEvent | None:
    """The event of one line's name and argument text; None for other events or bad text."""
    if name == "kvm_convert_memory":
        m = _CONVERT.match(args)
        if m:
            return ConversionEvent(
                "convert", int(m["start"], 16), int(m["size"], 16),
                m["msg"] == "shared_to_private",
            )  # fmt: skip
    elif name == "kvm_memory_fault":
        m = _FAULT.match(args)
        if m:
            flags = int(m["flags"], 16)
            return ConversionEvent(
                "fault", int(m["start"], 16), int(m["size"], 16),
                bool(flags & KVM_MEMORY_EXIT_FLAG_PRIVATE), flags=flags,
            )  # fmt: skip
    elif name == "kvm_hc_map_gpa_range":
        m = _HYPERCALL.match(args)
        if m:
            return ConversionEvent(
                "hypercall", int(m["gpa"], 16), int(m["size"], 16),
                bool(int(m["attributes"], 16) & KVM_MAP_GPA_RANGE_ENCRYPTED),
                flags=int(m["flags"], 16),
            )  # fmt: skip
    elif is_discard(name):
        discard = parse_discard(args)
        if discard is not None:
            hva = discard["hva"]  # "(nil)" stays text: no host address
            return ConversionEvent(
                "discard", hva if isinstance(hva, int) else 0, int(discard["length"]), None,
                ramblock=str(discard["ramblock"]), ret=int(discard["ret"]),
            )  # fmt: skip
    elif name == "ram_block_attributes_state_change":
        m = _ATTRIBUTES.match(args)
        if m:
            return ConversionEvent(
                "attributes", int(m["offset"], 16), int(m["size"], 16),
                m["to"] == "discarded",  # discarded in the shared bitmap = private
            )  # fmt: skip
    return None


def parse_line(line: str) -> ConversionEvent | None:
    """One line of QEMU's log output (any timestamp form); None when it is not ours."""
    split = split_line(line)
    return None if split is None else parse_event(split.name, split.args)
