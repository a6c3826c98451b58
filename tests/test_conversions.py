"""orchestrator.memory.conversions: QEMU's conversion trace, counted and compared with the guest.

Trace lines are rendered from the format strings of the trace-events-all files that the
installed QEMU 10.0.2 and the private QEMU 11.1.3 ship (so a format change in either
fails here), in the `log` backend's three line forms. The switching-on runs against
both real QEMUs over QMP; the hole check runs against a real QEMU's memfd backing.
Under TCG no conversion reaches QEMU, so the counts are fed from rendered lines.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu_process import RunningQemu, started_qemu

from orchestrator.errors import QemuError
from orchestrator.invariants.conversions import conversion_verdicts, shared_half_verdict
from orchestrator.memory.conversions import (
    CONVERSION_EVENTS,
    ConversionCounts,
    ConversionLedger,
    ConversionObserver,
    RangeStates,
    available_events,
    gmem_fds,
    guest_asked,
    parse_line,
    shared_half_holes,
    subtract_ranges,
)
from orchestrator.memory.host_punch import HostPuncher, borrowed_fd
from orchestrator.qemu.private_build import ArchiveUnreachable, private_qemu
from orchestrator.qemu.qmp import QmpSession
from orchestrator.qemu.trace import DISCARD_EVENTS, DISCARD_GROUP, EventGroup, set_trace_events
from orchestrator.timeline import Timeline

QEMU = shutil.which("qemu-system-x86_64")
TRACE_EVENTS_10 = Path("/usr/share/qemu/trace-events-all")
KIB = 1024


# --- lines rendered from QEMU's own trace-events files -----------------------------------------


def event_format(trace_events: Path, name: str) -> str | None:
    """The printf format of event `name` in a trace-events file, macros expanded."""
    for line in trace_events.read_text().splitlines():
        if not line.startswith(name + "("):
            continue
        tail = line[line.index(")") + 1 :]
        pieces = re.findall(r'"((?:[^"\\]|\\.)*)"|\b(PRI[xudi]64)\b', tail)
        text = "".join(q or {"PRIx64": "x", "PRIu64": "u"}.get(m, "d") for q, m in pieces)
        return text
    return None


def render(fmt: str, *values: object) -> str:
    """C printf as QEMU's log backend does it, for the conversions used here (%p: a string)."""
    return fmt.replace("%zx", "%x").replace("%p", "%s") % values


def trace_sources() -> list[Path]:
    sources = [TRACE_EVENTS_10] if TRACE_EVENTS_10.is_file() else []
    cached = Path.home() / ".cache" / "cvmlab" / "qemu"
    sources += sorted(cached.glob("*/usr/share/qemu/trace-events-all"))
    return sources


SOURCES = trace_sources()
needs_sources = pytest.mark.skipif(not SOURCES, reason="no QEMU trace-events-all on this host")


def lines_for(source: Path) -> dict[str, str]:
    """One rendered line per conversion event of this QEMU (name -> line)."""
    out: dict[str, str] = {}
    convert = event_format(source, "kvm_convert_memory")
    assert convert is not None, f"{source} has no kvm_convert_memory"
    out["convert"] = "kvm_convert_memory " + render(
        convert, 0x80000000, 0x2000, "private_to_shared"
    )
    fault = event_format(source, "kvm_memory_fault")
    assert fault is not None
    out["fault"] = "kvm_memory_fault " + render(fault, 0x1000, 0x1000, 8)
    hypercall = event_format(source, "kvm_hc_map_gpa_range")
    assert hypercall is not None
    out["hypercall"] = "kvm_hc_map_gpa_range " + render(hypercall, 0x80000000, 0x2000, 0x10, 0)
    for discard in ("ram_block_discard_range", "ram_block_discard_shared_range"):
        fmt = event_format(source, discard)
        if fmt is not None:
            out["discard"] = f"{discard} " + render(fmt, "ram0", "0x7f0012340000", 0x2000, 1, 1, 0)
    assert "discard" in out, f"{source} has neither discard event"
    return out


@needs_sources
@pytest.mark.parametrize(
    "source", SOURCES, ids=["installed" if p == TRACE_EVENTS_10 else p.parts[-5] for p in SOURCES]
)
def test_every_conversion_event_of_this_qemu_parses(source: Path) -> None:
    lines = lines_for(source)
    convert = parse_line(lines["convert"])
    assert convert is not None and convert.kind == "convert"
    assert (convert.address, convert.size, convert.to_private) == (0x80000000, 0x2000, False)
    fault = parse_line(lines["fault"])
    assert fault is not None and (fault.kind, fault.to_private) == ("fault", True)
    hypercall = parse_line(lines["hypercall"])
    assert hypercall is not None and (hypercall.kind, hypercall.size) == ("hypercall", 0x2000)
    assert hypercall.to_private is True  # attributes 0x10 = KVM_MAP_GPA_RANGE_ENCRYPTED
    discard = parse_line(lines["discard"])
    assert discard is not None and discard.kind == "discard"
    assert (discard.ramblock, discard.size, discard.ret) == ("ram0", 0x2000, 0)


def test_the_three_log_line_forms_parse_alike() -> None:
    body = "kvm_convert_memory start 0x1000 size 0x3000 shared_to_private"
    forms = [body, f"8363@1795242984.974739:{body}", f"2026-11-21T06:36:25.018583Z {body}"]
    parsed = [parse_line(line) for line in forms]
    assert parsed[0] is not None and parsed[0].to_private is True
    assert parsed == [parsed[0]] * 3


def test_other_lines_are_not_conversions() -> None:
    assert parse_line("virtio_balloon_to_target balloon target: 0x1 num_pages: 2") is None
    assert parse_line("qemu-system-x86_64: warning: something") is None
    assert parse_line("kvm_convert_memory garbled") is None


def test_a_discard_of_a_null_host_address_parses() -> None:
    event = parse_line(
        "ram_block_discard_range ram0@(nil) + 0x1000: madvise: 0 fallocate: 1 ret: -22"
    )
    assert event is not None and (event.address, event.ret) == (0, -22)


# --- the ledger --------------------------------------------------------------------------------


def storm_lines(gpa: int, pages: int, loops: int) -> list[str]:
    """What QEMU prints for a guest driver converting one chunk back and forth `loops` times."""
    size = pages * 4096
    lines = []
    for _ in range(loops):
        lines += [
            f"kvm_hc_map_gpa_range gpa {gpa:#x} size {size:#x} attributes 0x0 flags 0x0",
            f"kvm_convert_memory start {gpa:#x} size {size:#x} private_to_shared",
            f"kvm_hc_map_gpa_range gpa {gpa:#x} size {size:#x} attributes 0x10 flags 0x0",
            f"kvm_convert_memory start {gpa:#x} size {size:#x} shared_to_private",
            f"ram_block_discard_range ram0@0x7f0000000000 + {size:#x}: madvise: 1 fallocate: 1 "
            "ret: 0",
        ]
    return lines


def test_ledger_counts_a_storm_per_direction_and_cause() -> None:
    ledger = ConversionLedger()
    assert ledger.add_lines(storm_lines(0x100000, 4, 3)) == 15
    counts = ledger.counts()
    assert counts.to_shared == counts.to_private == 3 * 4 * 4096
    assert counts.hypercalls_to_shared == counts.hypercalls_to_private == 3
    assert counts.shared_discarded == 3 * 4 * 4096 and counts.failed_discards == 0
    assert counts.faults == 0


def test_last_direction_per_range_is_remembered() -> None:
    ledger = ConversionLedger()
    ledger.add_lines(storm_lines(0x100000, 4, 2))
    ledger.add_lines(["kvm_convert_memory start 0x101000 size 0x1000 private_to_shared"])
    assert ledger.ranges(private=True) == [(0x100000, 0x1000), (0x102000, 0x2000)]
    assert ledger.ranges(private=False) == [(0x101000, 0x1000)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 12), st.booleans()), min_size=1, max_size=30
    )
)
def test_range_states_agree_with_a_page_by_page_model(
    updates: list[tuple[int, int, bool]],
) -> None:
    states = RangeStates()
    model: dict[int, bool] = {}
    for start, length, private in updates:
        states.set(start, start + length, private)
        for page in range(start, start + length):
            model[page] = private
    for page in range(0, 60):
        assert states.state(page) == model.get(page), page
    # Intervals are disjoint, sorted, and maximal (neighbours that touch differ).
    items = sorted(
        [(s, s + n, True) for s, n in states.ranges(True)]
        + [(s, s + n, False) for s, n in states.ranges(False)]
    )
    assert len(items) == len(states)
    for (_s1, e1, p1), (s2, _e2, p2) in itertools.pairwise(items):
        assert e1 <= s2 and (e1 < s2 or p1 != p2)


def test_subtracting_ranges_leaves_what_is_new() -> None:
    assert subtract_ranges([(0, 100)], [(10, 20), (50, 10)]) == [(0, 10), (30, 20), (60, 40)]
    assert subtract_ranges([(0, 100)], [(0, 100)]) == []
    assert subtract_ranges([(0, 10), (20, 10)], [(5, 20)]) == [(0, 5), (25, 5)]


def test_counts_subtract_to_the_window_between_two_snapshots() -> None:
    ledger = ConversionLedger()
    ledger.add_lines(storm_lines(0x100000, 1, 1))
    before = ledger.counts()
    ledger.add_lines(storm_lines(0x200000, 2, 1))
    window = ledger.counts().minus(before)
    assert window.to_shared == 2 * 4096 and window.hypercalls_to_shared == 1


# --- what the guest asked for ---------------------------------------------------------------------


def test_guest_asked_when_every_call_succeeded() -> None:
    asked = guest_asked(pages=1000, chunk=7, loops=2, decrypt_ok=2 * 143, encrypt_ok=2 * 143)
    assert asked.to_shared == asked.to_private == 2 * 1000 * 4096
    assert asked.calls_to_shared == 286


def test_guest_asked_with_a_failed_call_counts_equal_chunks() -> None:
    """The driver's fail_call=4 case: 8 pages in chunks of 2, 3 loops, one encrypt failed."""
    asked = guest_asked(pages=8, chunk=2, loops=3, decrypt_ok=10, encrypt_ok=9)
    assert (asked.to_shared, asked.to_private) == (10 * 2 * 4096, 9 * 2 * 4096)


def test_guest_asked_refuses_to_guess_with_unequal_chunks() -> None:
    with pytest.raises(ValueError, match="smaller last chunk"):
        guest_asked(pages=7, chunk=2, loops=1, decrypt_ok=3, encrypt_ok=4)


def storm_counts(
    pages: int, loops: int, extra_shared: int = 0, discarded: int | None = None
) -> ConversionCounts:
    ledger = ConversionLedger()
    ledger.add_lines(storm_lines(0x100000, pages, loops))
    counts = ledger.counts()
    if extra_shared:
        ledger.add_lines(
            [
                f"kvm_hc_map_gpa_range gpa 0x900000 size {extra_shared:#x} attributes 0x0 "
                "flags 0x0",
                f"kvm_convert_memory start 0x900000 size {extra_shared:#x} private_to_shared",
            ]
        )
        counts = ledger.counts()
    if discarded is not None:
        counts = ConversionCounts(**{**counts.to_json(), "shared_discarded": discarded})
    return counts


def failed(verdicts: list) -> list[str]:  # type: ignore[type-arg]
    return [v.summary for v in verdicts if v.failed]


def test_matching_counts_pass_every_verdict() -> None:
    asked = guest_asked(pages=4, chunk=4, loops=3, decrypt_ok=3, encrypt_ok=3)
    assert failed(conversion_verdicts(asked, storm_counts(4, 3))) == []


def test_a_conversion_qemu_never_saw_fails() -> None:
    asked = guest_asked(pages=4, chunk=4, loops=3, decrypt_ok=3, encrypt_ok=3)
    problems = failed(conversion_verdicts(asked, storm_counts(4, 2)))
    assert any("to shared" in p for p in problems) and any("to private" in p for p in problems)


def test_extra_conversions_pass_within_the_allowance_and_fail_beyond_it() -> None:
    asked = guest_asked(pages=4, chunk=4, loops=1, decrypt_ok=1, encrypt_ok=1)
    seen = storm_counts(4, 1, extra_shared=8 * KIB)
    assert failed(conversion_verdicts(asked, seen, allowance=8 * KIB)) == []
    assert any(
        "to shared" in p for p in failed(conversion_verdicts(asked, seen, allowance=4 * KIB))
    )


def test_a_conversion_to_private_that_kept_its_shared_half_fails_h2() -> None:
    asked = guest_asked(pages=4, chunk=4, loops=1, decrypt_ok=1, encrypt_ok=1)
    verdicts = conversion_verdicts(asked, storm_counts(4, 1, discarded=0))
    assert [v.invariant for v in verdicts if v.failed] == ["H2"]


# --- real QEMUs: the events exist and switch on over QMP ----------------------------------


def qemu_commands() -> list[tuple[str, list[str]]]:
    commands = []
    if QEMU is not None:
        commands.append(("qemu-10.0", [QEMU]))
    with contextlib.suppress(ArchiveUnreachable):
        commands.append(("qemu-11.1", private_qemu(progress=lambda message: None).command()))
    return commands


@pytest.fixture(params=qemu_commands(), ids=lambda c: c[0])
def bare_qemu(request: pytest.FixtureRequest) -> Iterator[RunningQemu]:
    with started_qemu(request.param[1], "-machine", "none") as qemu:
        yield qemu


def test_this_qemu_has_every_conversion_event(bare_qemu: RunningQemu) -> None:
    found = available_events(bare_qemu.qmp, CONVERSION_EVENTS)
    assert all(found[name] for name in CONVERSION_EVENTS[:3]), found
    # Exactly one of the two discard names, whichever this version uses.
    assert sum(len(found[name]) for name in DISCARD_EVENTS) == 1, found


def test_observer_switches_the_events_on_and_counts_new_lines(bare_qemu: RunningQemu) -> None:
    trace = bare_qemu.rundir / "trace.log"
    trace.write_text("kvm_convert_memory start 0x0 size 0x1000 private_to_shared\n")  # old
    timeline = Timeline(bare_qemu.rundir / "timeline.jsonl")
    with ConversionObserver(bare_qemu.qmp, trace, timeline) as observer:
        states = bare_qemu.qmp.execute("trace-event-get-state", {"name": "kvm_convert_memory"})
        assert [s["state"] for s in states] == ["enabled"]
        with trace.open("a") as stream:
            stream.write("\n".join(storm_lines(0x100000, 2, 2)) + "\n")
            stream.write("kvm_convert_memory start 0x5000 size")  # unfinished: not counted yet
        counts = observer.counts()
    timeline.close()
    assert counts.to_shared == counts.to_private == 2 * 2 * 4096
    assert "kvm_convert_memory" in observer.enabled


def discard_name_of(qmp: QmpSession) -> str:
    """The discard event this QEMU should have, by its version (renamed in 11.1)."""
    version = qmp.execute("query-version")["qemu"]
    return (
        "ram_block_discard_shared_range"
        if (version["major"], version["minor"]) >= (11, 1)
        else "ram_block_discard_range"
    )


def test_set_trace_events_enables_this_qemus_discard_name(bare_qemu: RunningQemu) -> None:
    states = set_trace_events(bare_qemu.qmp, [DISCARD_GROUP])
    assert states == {discard_name_of(bare_qemu.qmp): "enabled"}


def test_set_trace_events_enables_every_memory_group(bare_qemu: RunningQemu) -> None:
    states = set_trace_events(bare_qemu.qmp)  # MEMORY_GROUPS, as MemoryScenario does
    assert states[discard_name_of(bare_qemu.qmp)] == "enabled"
    assert set(DISCARD_EVENTS) - set(states) == {
        name for name in DISCARD_EVENTS if name != discard_name_of(bare_qemu.qmp)
    }
    assert any(n.startswith("virtio_balloon_") for n in states)
    assert any(n.startswith("virtio_mem_") for n in states)
    assert set(states.values()) == {"enabled"}


def test_a_required_group_this_qemu_lacks_is_an_error_naming_the_qemu(
    bare_qemu: RunningQemu,
) -> None:
    version = bare_qemu.qmp.execute("query-version")["qemu"]
    absent = EventGroup("an event no QEMU has", ("cvmlab_no_such_event", "cvmlab_none_*"))
    with pytest.raises(QemuError, match=rf"QEMU {version['major']}\.{version['minor']}\.") as err:
        set_trace_events(bare_qemu.qmp, [DISCARD_GROUP, absent])
    assert "cvmlab_no_such_event" in err.value.problem
    # Nothing was switched on: the check comes before any set-state.
    states = bare_qemu.qmp.execute(
        "trace-event-get-state", {"name": discard_name_of(bare_qemu.qmp)}
    )
    assert [s["state"] for s in states] == ["disabled"]


def test_enabling_on_a_qemu_without_the_events_is_a_clear_error() -> None:
    class NoEvents:
        def execute(self, command: str, arguments: object = None) -> list[object]:
            return []

    from orchestrator.memory.conversions import enable_conversion_events

    with pytest.raises(QemuError, match="kvm_convert_memory"):
        enable_conversion_events(NoEvents())


# --- the shared half, on a real QEMU memfd backing ---------------------------------------------


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_shared_half_holes_name_exactly_the_pages_that_hold_data() -> None:
    """A stopped q35 guest (-S) on a memfd: every page is a hole until we write two pages
    through QEMU's own fd; the check must name exactly those and no other."""
    assert QEMU is not None
    with started_qemu(
        QEMU, "-machine", "q35,memory-backend=ram0", "-accel", "tcg", "-S", "-m", "256M",
        "-object", "memory-backend-memfd,id=ram0,size=256M,share=on",
    ) as qemu:  # fmt: skip
        puncher = HostPuncher(qemu.qmp, qemu.proc.pid)
        ((_gpa, _length, offset, backing),) = puncher.plan(0x4000000, 0x10000)
        with borrowed_fd(backing.qemu_pid, backing.qemu_fd) as fd:
            os.pwrite(fd, b"\xaa" * 4096, offset + 0x3000)
            os.pwrite(fd, b"\xbb" * 4096, offset + 0x4000)
        report = shared_half_holes(puncher, [(0x4000000, 0x10000), (0xFEC00000, 0x1000)])
        assert report.backed == ((0x4003000, 0x2000),)
        assert report.checked == 0x10000
        assert report.outside_ram == 0x1000  # the IOAPIC page is not RAM
        assert not report.clean
        # The H2 check on that observation: a page still backed after going private FAILs.
        assert shared_half_verdict(report).failed
        assert shared_half_holes(puncher, [(0x4000000, 0x3000)]).clean


def test_gmem_fds_of_a_process_without_guest_memfd_is_empty() -> None:
    assert gmem_fds(os.getpid()) == []
