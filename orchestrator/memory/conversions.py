"""Private<->shared conversions as the host sees them: QEMU's trace, guest_memfd, the shared half.

A TDX or SEV-SNP guest converts memory with a hypercall (TDX MapGPA, SNP Page State
Change), which KVM hands to QEMU as KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE); a guest
that touches memory whose attribute does not match gets KVM_EXIT_MEMORY_FAULT. QEMU
handles both in `kvm_convert_memory()` (accel/kvm/kvm-all.c): it flips the KVM memory
attribute and frees the half that is no longer used:

- to private: `ram_block_discard_range()` on the shared backing (memfd/file punch,
  madvise), traced as `ram_block_discard_range` (QEMU <= 11.0) or
  `ram_block_discard_shared_range` (11.1: its trace-events-all, measured);
- to shared: `ram_block_discard_guest_memfd_range()` = fallocate(PUNCH_HOLE) on the
  guest_memfd, which has **no trace event**: it is seen only in the host's
  accounting (guest_memfd folios count in /proc/meminfo `Unevictable`, never in
  QEMU's RSS; research/interfaces.md section 6) and per fd nowhere (st_blocks is 0,
  SEEK_DATA is ESPIPE).

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

`ConversionLedger` turns lines into counts (`ConversionCounts`: bytes and requests per
direction, per cause, discards of the shared half) and remembers, per GPA range, the
direction of the last conversion (`RangeStates`), which is what "no GPA backed twice"
(H2) is judged on. `orchestrator.invariants.conversions` judges the counts against
what the guest's driver reported (`orchestrator.guest.convert.ConversionResult`).

Line prefixes, the two discard names, switching events on (by `EventGroup`: names a
QEMU lacks are skipped, a required group with none is an error) and following the
file are `orchestrator.qemu.trace`'s; this module parses the conversion events'
arguments. `ConversionObserver` switches the events on over QMP, follows QEMU's trace
output and feeds the ledger; `gmem_fds` and `GmemSample` follow
guest_memfd allocation; `shared_half_holes` checks per range that the shared backing
is a hole (SEEK_DATA on QEMU's own fd, borrowed with pidfd_getfd).

Lab-only in effect: under TCG no conversion ever reaches QEMU (the guest's
set_memory_decrypted() is a no-op), so on the development machines only the pure
parts (tests/test_conversions.py) and the switching-on against real QEMU 10.0 and 11.1
run.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from orchestrator.errors import MemoryOpError
from orchestrator.host.fdalloc import GMEM_MARKER, open_fds
from orchestrator.host.meminfo import sample_meminfo
from orchestrator.qemu.trace import (
    DISCARD_EVENTS,
    DISCARD_GROUP,
    EventGroup,
    TraceFollower,
    TraceMonitor,
    available_events,
    is_discard,
    parse_discard,
    set_trace_events,
    split_line,
)
from orchestrator.timeline import Timeline, now

PAGE = 4096
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


# --- counting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionCounts:
    """Totals of conversion events (bytes unless named *_requests / count)."""

    to_private: int = 0  # kvm_convert_memory shared_to_private
    to_shared: int = 0
    to_private_requests: int = 0
    to_shared_requests: int = 0
    hypercall_to_private: int = 0  # explicit: TDX MapGPA / SNP PSC (KVM_HC_MAP_GPA_RANGE)
    hypercall_to_shared: int = 0
    hypercalls_to_private: int = 0
    hypercalls_to_shared: int = 0
    fault_to_private: int = 0  # implicit: KVM_EXIT_MEMORY_FAULT
    fault_to_shared: int = 0
    faults: int = 0
    shared_discarded: int = 0  # ram_block_discard*range with ret 0
    shared_discards: int = 0
    failed_discards: int = 0
    attribute_changes: int = 0  # ram_block_attributes_state_change (10.1+)

    def minus(self, earlier: ConversionCounts) -> ConversionCounts:
        """What happened between `earlier` and this snapshot."""
        return ConversionCounts(
            **{
                f.name: getattr(self, f.name) - getattr(earlier, f.name)
                for f in dataclasses.fields(self)
            }
        )

    @property
    def explicit(self) -> int:
        return self.hypercall_to_private + self.hypercall_to_shared

    @property
    def implicit(self) -> int:
        return self.fault_to_private + self.fault_to_shared

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class RangeStates:
    """The direction of the last conversion of every GPA seen, as disjoint intervals.

    `set(start, end, private)` overwrites; adjacent intervals of the same state merge,
    so a storm over the same pages stays a handful of intervals.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._items: list[tuple[int, int, bool]] = []  # (start, end, private), sorted

    def set(self, start: int, end: int, private: bool) -> None:
        if end <= start:
            return
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._items[i][1] <= start:
            i += 1
        j = i
        while j < len(self._items) and self._items[j][0] < end:
            j += 1
        new: list[tuple[int, int, bool]] = []
        if i < j and self._items[i][0] < start:
            new.append((self._items[i][0], start, self._items[i][2]))
        new.append((start, end, private))
        if i < j and self._items[j - 1][1] > end:
            new.append((end, self._items[j - 1][1], self._items[j - 1][2]))
        # Merge with the untouched neighbours when they touch and agree.
        if i > 0 and self._items[i - 1][1] == new[0][0] and self._items[i - 1][2] == new[0][2]:
            i -= 1
            new[0] = (self._items[i][0], new[0][1], new[0][2])
        if (
            j < len(self._items)
            and self._items[j][0] == new[-1][1]
            and (self._items[j][2] == new[-1][2])
        ):
            new[-1] = (new[-1][0], self._items[j][1], new[-1][2])
            j += 1
        merged: list[tuple[int, int, bool]] = []
        for item in new:
            if merged and merged[-1][1] == item[0] and merged[-1][2] == item[2]:
                merged[-1] = (merged[-1][0], item[1], item[2])
            else:
                merged.append(item)
        self._items[i:j] = merged
        self._starts[i:j] = [item[0] for item in merged]

    def ranges(self, private: bool) -> list[tuple[int, int]]:
        """(gpa, size) of every interval whose last conversion went to `private`."""
        return [(s, e - s) for s, e, p in self._items if p == private]

    def state(self, gpa: int) -> bool | None:
        """True/False for private/shared at `gpa`; None when it was never converted."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and self._items[i][0] <= gpa < self._items[i][1]:
            return self._items[i][2]
        return None

    def __len__(self) -> int:
        return len(self._items)


def subtract_ranges(
    ranges: Sequence[tuple[int, int]], minus: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """(start, size) pieces of `ranges` not covered by `minus` (both lists of (start, size))."""
    cut = sorted((s, s + n) for s, n in minus if n > 0)
    out: list[tuple[int, int]] = []
    for start, size in sorted(ranges):
        cursor, end = start, start + size
        for c_start, c_end in cut:
            if c_end <= cursor or c_start >= end:
                continue
            if c_start > cursor:
                out.append((cursor, c_start - cursor))
            cursor = max(cursor, c_end)
            if cursor >= end:
                break
        if cursor < end:
            out.append((cursor, end - cursor))
    return out


class ConversionLedger:
    """Counts and range states from a stream of conversion events (pure, thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {f.name: 0 for f in dataclasses.fields(ConversionCounts)}
        self.states = RangeStates()

    def add(self, event: ConversionEvent) -> None:
        with self._lock:
            c = self._counts
            if event.kind == "convert":
                way = "private" if event.to_private else "shared"
                c[f"to_{way}"] += event.size
                c[f"to_{way}_requests"] += 1
                self.states.set(event.address, event.address + event.size, bool(event.to_private))
            elif event.kind == "hypercall":
                way = "private" if event.to_private else "shared"
                c[f"hypercall_to_{way}"] += event.size
                c[f"hypercalls_to_{way}"] += 1
            elif event.kind == "fault":
                c[f"fault_to_{'private' if event.to_private else 'shared'}"] += event.size
                c["faults"] += 1
            elif event.kind == "discard":
                if event.ret == 0:
                    c["shared_discarded"] += event.size
                    c["shared_discards"] += 1
                else:
                    c["failed_discards"] += 1
            elif event.kind == "attributes":
                c["attribute_changes"] += 1

    def add_lines(self, lines: Iterable[str]) -> int:
        """Parse and add every line that is a conversion event; how many were."""
        added = 0
        for line in lines:
            event = parse_line(line)
            if event is not None:
                self.add(event)
                added += 1
        return added

    def counts(self) -> ConversionCounts:
        with self._lock:
            return ConversionCounts(**self._counts)

    def ranges(self, private: bool) -> list[tuple[int, int]]:
        with self._lock:
            return self.states.ranges(private)


# --- what the guest asked for, and the verdicts -----------------------------------------------


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


def kib(nbytes: float) -> int:
    return round(nbytes / 1024)


# --- following QEMU's trace ---------------------------------------------------------------------


#: What the observer needs of a QMP session (`orchestrator.qemu.qmp.QmpSession`).
Monitor = TraceMonitor


def enable_conversion_events(qmp: Monitor) -> list[str]:
    """Switch the conversion events on over QMP; the event names now enabled.

    QemuError naming the QEMU when it lacks every event of a required group of
    CONVERSION_GROUPS (a build without KVM or guest_memfd support, or older than 9.1)
    or has no usable trace backend.
    """
    return sorted(set_trace_events(qmp, CONVERSION_GROUPS))


class ConversionObserver:
    """Follows one QEMU's conversion events into a ledger (see the module docstring).

        observer = ConversionObserver(machine.qmp, trace_output(evidence, ()), timeline)
        observer.start()
        before = observer.counts()
        ...                                   # the guest converts
        done = observer.counts().minus(before)
        observer.stop()

    A follower thread reads new lines every `interval` s; `counts()` first reads what
    QEMU has written up to now. The timeline gets one record per read with the counts
    it added, never one per line (a storm prints hundreds of thousands).
    """

    def __init__(
        self,
        qmp: Monitor,
        path: Path,
        timeline: Timeline | None = None,
        interval: float = 0.05,
    ) -> None:
        self.qmp = qmp
        self.path = Path(path)
        self.timeline = timeline
        self.interval = interval
        self.ledger = ConversionLedger()
        self.enabled: list[str] = []
        self._follower = TraceFollower(
            self.path, self._handle, interval=interval, name="cvmlab-conversions"
        )

    def start(self) -> ConversionObserver:
        """Switch the events on, then follow the output from where it stood before."""
        self._follower.skip_to_end()
        self.enabled = enable_conversion_events(self.qmp)
        if self.timeline is not None:
            self.timeline.record("trace", "conversion-events-on", events=self.enabled)
        self._follower.follow()
        return self

    def collect(self) -> int:
        """Read every complete line written since the last read; events added."""
        return self._follower.read()

    def _handle(self, lines: list[str], read_at: float) -> int:
        before = self.ledger.counts()
        added = self.ledger.add_lines(lines)
        if added and self.timeline is not None:
            delta = self.ledger.counts().minus(before)
            self.timeline.record(
                "trace", "conversions", events=added,
                **{k: v for k, v in delta.to_json().items() if v},
            )  # fmt: skip
        return added

    def counts(self) -> ConversionCounts:
        """Totals so far, after reading what QEMU wrote up to now."""
        with contextlib.suppress(OSError):
            self.collect()
        return self.ledger.counts()

    def stop(self) -> ConversionCounts:
        self._follower.stop()
        return self.ledger.counts()

    def __enter__(self) -> ConversionObserver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- guest_memfd: the private half -------------------------------------------------------------


@dataclass(frozen=True)
class GmemFd:
    """One guest_memfd QEMU holds: its fd number and size (st_size; st_blocks is always 0)."""

    fd: int
    size: int
    target: str


def gmem_fds(pid: int, proc: str = "/proc") -> list[GmemFd]:
    """QEMU's guest_memfd fds (`anon_inode:[kvm-gmem]`; newer kernels: a `kvm-gmem` name)."""
    found = []
    for fd, target in sorted(open_fds(pid, proc).items()):
        if GMEM_MARKER not in target:
            continue
        try:
            size = os.stat(f"{proc}/{pid}/fd/{fd}").st_size
        except FileNotFoundError:
            continue
        found.append(GmemFd(fd, size, target))
    return found


@dataclass(frozen=True)
class GmemSample:
    """guest_memfd as the host sees it at now() time `at`: QEMU's fds, host-wide counters."""

    at: float
    fds: tuple[GmemFd, ...]
    unevictable: int  # /proc/meminfo Unevictable, bytes (guest_memfd folios count here)
    cached: int
    meminfo: Mapping[str, int] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        """Bytes of guest physical memory QEMU can back privately (sum of st_size)."""
        return sum(f.size for f in self.fds)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 6),
            "fds": [dataclasses.asdict(f) for f in self.fds],
            "total_size": self.total_size,
            "unevictable": self.unevictable,
            "cached": self.cached,
        }

    def record(self, timeline: Timeline | None) -> None:
        if timeline is not None:
            timeline.record(
                "host", "sample", t=self.at,
                counters={"gmem.size": self.total_size // 1024,
                          "Unevictable": self.unevictable // 1024,
                          "Cached": self.cached // 1024},
            )  # fmt: skip


def sample_gmem(pid: int, proc: str = "/proc", meminfo: str = "/proc/meminfo") -> GmemSample:
    at = now()
    fds = tuple(gmem_fds(pid, proc))
    info = sample_meminfo(meminfo)
    return GmemSample(at, fds, info["Unevictable"], info["Cached"])


# --- the shared half: is it a hole where the guest's memory is private? -------------------------


@dataclass(frozen=True)
class HoleReport:
    """SEEK_DATA over QEMU's shared backing for GPA ranges whose last conversion was to private."""

    checked: int  # bytes of RAM looked at
    backed: tuple[tuple[int, int], ...]  # (gpa, length) pieces that still hold data
    outside_ram: int  # bytes of the ranges that are not RAM (MMIO: nothing to check)

    @property
    def clean(self) -> bool:
        return not self.backed

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "backed": [[hex(g), n] for g, n in self.backed[:20]],
            "backed_pieces": len(self.backed),
            "outside_ram": self.outside_ram,
        }


class Planner(Protocol):
    """`orchestrator.memory.host_punch.HostPuncher.plan` (gpa, length -> pieces)."""

    def plan(
        self, gpa: int, length: int, allow_private: bool = False
    ) -> list[tuple[int, int, int, Any]]: ...


def shared_half_holes(
    planner: Planner, ranges: Sequence[tuple[int, int]], page: int = PAGE
) -> HoleReport:
    """For each (gpa, size): is the shared backing a hole there (page by page, SEEK_DATA)?

    Needs a memfd or file backend mapped shared (what QEMU discards with fallocate);
    ranges outside guest RAM are counted, not checked.
    """
    from orchestrator.memory.host_punch import borrowed_fd, range_is_hole

    checked = 0
    outside = 0
    backed: list[tuple[int, int]] = []
    fds: dict[tuple[int, int], int] = {}
    with contextlib.ExitStack() as stack:
        for gpa, size in ranges:
            try:
                pieces = planner.plan(gpa, size)
            except MemoryOpError:
                outside += size
                continue
            for piece_gpa, length, offset, backing in pieces:
                key = (backing.qemu_pid, backing.qemu_fd)
                if key not in fds:
                    fds[key] = stack.enter_context(borrowed_fd(*key))
                fd = fds[key]
                checked += length
                if range_is_hole(fd, offset, length):
                    continue
                # Name the exact pages that hold data.
                for at in range(0, length, page):
                    if not range_is_hole(fd, offset + at, page):
                        if backed and backed[-1][0] + backed[-1][1] == piece_gpa + at:
                            backed[-1] = (backed[-1][0], backed[-1][1] + page)
                        else:
                            backed.append((piece_gpa + at, page))
    return HoleReport(checked, tuple(backed), outside)


__all__ = [
    "CONVERSION_EVENTS",
    "CONVERSION_GROUPS",
    "ConversionCounts",
    "ConversionEvent",
    "ConversionLedger",
    "ConversionObserver",
    "GmemFd",
    "GmemSample",
    "GuestAsked",
    "HoleReport",
    "RangeStates",
    "available_events",
    "enable_conversion_events",
    "gmem_fds",
    "guest_asked",
    "parse_event",
    "parse_line",
    "sample_gmem",
    "shared_half_holes",
    "subtract_ranges",
]
