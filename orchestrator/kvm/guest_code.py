"""Guest code for the tiny-guest harness: a table of named, commented byte sequences.

Every program runs in 32-bit protected mode without paging, flat segments
(base 0, limit 4 GiB), which `vcpu.Vcpu.enter_flat_protected_mode` sets up
through `KVM_SET_SREGS` (no GDT in guest memory is needed: KVM loads the
segment caches directly). GPAs are then plain 32-bit addresses, so a test
region can sit anywhere below 4 GiB. Inputs are passed in registers set with
`KVM_SET_REGS`; outputs are guest memory, I/O exits or HLT.

Each instruction is kept as (bytes, the assembler text they encode), so a
reviewer reads assembly, not magic numbers; `tests/test_kvm_vcpu.py`
reassembles the text with GNU as (`as --32`, Intel syntax) and compares.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GuestProgram:
    """A guest program: its name, what it does, its register inputs and its instructions."""

    name: str
    doc: str
    inputs: dict[str, str]  # register -> meaning
    instructions: tuple[tuple[bytes, str], ...]

    @property
    def code(self) -> bytes:
        """The bytes to load at the program's entry point."""
        return b"".join(encoded for encoded, _ in self.instructions)

    @property
    def assembly(self) -> str:
        """The instructions as Intel-syntax assembly, one per line (labels as offsets)."""
        return "\n".join(text for _, text in self.instructions)


HLT = GuestProgram(
    "hlt",
    "Stop at once: KVM_EXIT_HLT. The smallest run, for exit plumbing.",
    {},
    ((b"\xf4", "hlt"),),
)

SPIN = GuestProgram(
    "spin",
    "Jump to itself forever: a runaway guest, stopped only by the run's deadline.",
    {},
    ((b"\xeb\xfe", "1: jmp 1b"),),
)

FILL_PAGES = GuestProgram(
    "fill_pages",
    "Write eax, eax+1, ... to the first dword of ecx pages from edi, then HLT.",
    {"edi": "GPA of the first page", "ecx": "number of pages (>= 1)", "eax": "first value"},
    (
        (b"\x89\x07", "1: mov dword ptr [edi], eax"),
        (b"\x40", "inc eax"),
        (b"\x81\xc7\x00\x10\x00\x00", "add edi, 0x1000"),
        (b"\x49", "dec ecx"),
        (b"\x75\xf4", "jnz 1b"),
        (b"\xf4", "hlt"),
    ),
)

COPY_PAGES = GuestProgram(
    "copy_pages",
    "Copy the first dword of ecx pages from esi into a dword array at edi, then HLT.",
    {"esi": "GPA of the first page", "ecx": "number of pages (>= 1)", "edi": "GPA of the array"},
    (
        (b"\x8b\x06", "1: mov eax, dword ptr [esi]"),
        (b"\x89\x07", "mov dword ptr [edi], eax"),
        (b"\x81\xc6\x00\x10\x00\x00", "add esi, 0x1000"),
        (b"\x83\xc7\x04", "add edi, 4"),
        (b"\x49", "dec ecx"),
        (b"\x75\xf0", "jnz 1b"),
        (b"\xf4", "hlt"),
    ),
)

SCAN_FOR_STALE = GuestProgram(
    "scan_for_stale",
    "Forever: read the first dword of each page from ebp; when it equals ebx (a value "
    "the host punched away) report it with `out dx, eax` (esi = the page's GPA); write "
    "the pass number to the page's second dword (a populating write fault); count passes "
    "in [edi]. [edi+4] holds the number of pages. Stopped by the run's deadline.",
    {
        "ebp": "GPA of the first page",
        "ebx": "the stale value (what the pages held before the punch)",
        "edi": "GPA of the control block: [edi] pass counter, [edi+4] pages",
        "edx": "I/O port for stale reports",
    },
    (
        (b"\x89\xee", "2: mov esi, ebp"),
        (b"\x8b\x4f\x04", "mov ecx, dword ptr [edi+4]"),
        (b"\x8b\x06", "3: mov eax, dword ptr [esi]"),
        (b"\x39\xd8", "cmp eax, ebx"),
        (b"\x75\x01", "jne 4f"),
        (b"\xef", "out dx, eax"),
        (b"\x8b\x07", "4: mov eax, dword ptr [edi]"),
        (b"\x89\x46\x04", "mov dword ptr [esi+4], eax"),
        (b"\x81\xc6\x00\x10\x00\x00", "add esi, 0x1000"),
        (b"\x49", "dec ecx"),
        (b"\x75\xeb", "jnz 3b"),
        (b"\xff\x07", "inc dword ptr [edi]"),
        (b"\xeb\xe2", "jmp 2b"),
    ),
)

PROGRAMS: dict[str, GuestProgram] = {
    program.name: program for program in (HLT, SPIN, FILL_PAGES, COPY_PAGES, SCAN_FOR_STALE)
}
