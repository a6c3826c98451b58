"""The host kernel log since a baseline, and the bug signatures in it (invariant H8).

`HostLogWatch` opens `/dev/kmsg` and seeks to its end: that is the baseline.
Every later read returns only records logged since, one record per read, so
nothing before the baseline can leak in and no text diffing is needed. If the
ring buffer overwrote records before they were read (EPIPE), the watch marks
the delta incomplete and carries on from the oldest record still there.

Record format (Documentation/ABI/testing/dev-kmsg):
`<facility*8+level>,<seq>,<usec>,<flags>[,...];<message>` followed by
continuation lines " KEY=value". Signatures (research/interfaces.md section 6)
are matched only on kernel records (facility 0), so text that a user process
writes to /dev/kmsg cannot fake or hide a kernel bug.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from types import TracebackType

from orchestrator.errors import HostError

KMSG = "/dev/kmsg"
# A read must fit the largest record; the kernel's limit is 8 KiB (CONSOLE_EXT_LOG_MAX).
_RECORD_MAX = 16384


@dataclass(frozen=True)
class Signature:
    """A named pattern that means the host kernel hit a bug or a hardware error."""

    name: str
    pattern: re.Pattern[str]


def _sig(name: str, regex: str) -> Signature:
    return Signature(name, re.compile(regex))


# research/interfaces.md section 6 "Host dmesg bug signatures".
SIGNATURES: tuple[Signature, ...] = (
    _sig("WARNING", r"^WARNING: "),  # WARN()/WARN_ON(): "WARNING: CPU: 1 PID: 42 at ..."
    _sig("BUG", r"\bBUG: |^kernel BUG at "),  # incl. "watchdog: BUG: soft lockup"
    _sig("Oops", r"^Oops\b|\bOops: "),
    _sig("general protection fault", r"general protection fault"),
    _sig("RCU stall", r"rcu: INFO: .*detected stall|rcu_\w+ (self-)?detected stall"),
    _sig("hung task", r"INFO: task .* blocked for more than"),
    _sig("gmem prepare", r"gmem: Failed to prepare folio"),
    _sig("SEAMCALL", r"SEAMCALL"),  # TDX: "SEAMCALL TDH_... failed", "virt/tdx: SEAMCALL (0x..)"
    _sig("RMP", r"\bRMP\b|RMPUPDATE|rmpentry"),  # SNP RMP violations and entry dumps
    _sig("MCE", r"\bmce: "),  # "mce: [Hardware Error]: ..."
    _sig("SEV lock limit", r"locked pages exceed the lock limit"),
    _sig("panic", r"Kernel panic"),
)


@dataclass(frozen=True)
class KmsgRecord:
    """One kernel log record."""

    seq: int
    usec: int  # CLOCK_MONOTONIC microseconds at logging time
    facility: int  # 0 = kernel; user processes writing /dev/kmsg get 1 (LOG_USER)
    level: int  # 0 (emerg) .. 7 (debug)
    message: str
    context: dict[str, str] = field(default_factory=dict)  # continuation KEY=value lines

    def render(self) -> str:
        """dmesg-like text: "[   12.345678] message"."""
        return f"[{self.usec // 1_000_000:5d}.{self.usec % 1_000_000:06d}] {self.message}"


def parse_kmsg_record(raw: str) -> KmsgRecord:
    """Parse one record as read from /dev/kmsg (one read() returns exactly one)."""
    prefix, sep, rest = raw.partition(";")
    if not sep:
        raise ValueError(f"not a /dev/kmsg record: {raw[:80]!r}")
    fields = prefix.split(",")
    if len(fields) < 4:
        raise ValueError(f"/dev/kmsg record prefix has {len(fields)} fields: {prefix!r}")
    prio = int(fields[0])
    lines = rest.rstrip("\n").split("\n")
    context: dict[str, str] = {}
    for extra in lines[1:]:
        key, _, value = extra.strip().partition("=")
        if key:
            context[key] = value
    return KmsgRecord(
        seq=int(fields[1]),
        usec=int(fields[2]),
        facility=prio >> 3,
        level=prio & 7,
        message=lines[0],
        context=context,
    )


def kmsg_message(raw: str) -> str:
    """The message of one /dev/kmsg record, without parsing the rest (see parse_kmsg_record).

    For reading the whole ring buffer, as the probe does in every test: 2.5x faster than
    parsing each record in full.
    """
    return raw.partition(";")[2].split("\n", 1)[0]


def find_signatures(
    records: list[KmsgRecord], signatures: tuple[Signature, ...] = SIGNATURES
) -> list[tuple[str, KmsgRecord]]:
    """(signature name, record) for every kernel record that matches a signature."""
    hits: list[tuple[str, KmsgRecord]] = []
    for record in records:
        if record.facility != 0:
            continue
        for signature in signatures:
            if signature.pattern.search(record.message):
                hits.append((signature.name, record))
                break
    return hits


@dataclass(frozen=True)
class LogDelta:
    """Kernel records logged since the baseline and the signatures found in them."""

    records: tuple[KmsgRecord, ...]
    problems: tuple[tuple[str, KmsgRecord], ...]
    incomplete: bool  # the ring buffer overwrote records before they were read

    @property
    def clean(self) -> bool:
        return not self.problems

    def text(self) -> str:
        """The delta as dmesg-like text (evidence file `host-dmesg.txt`)."""
        lines = [record.render() for record in self.records]
        if self.incomplete:
            lines.append("(cvmlab: some records were overwritten before they could be read)")
        return "\n".join(lines) + ("\n" if lines else "")

    def summary(self) -> str:
        """One line per problem, for a failure message."""
        if self.clean:
            return f"host kernel log clean ({len(self.records)} new record(s))"
        return "; ".join(f"{name}: {record.message}" for name, record in self.problems)


class HostLogWatch:
    """The host kernel log from the moment of construction; a context manager.

    Raises `HostError` if the log cannot be read (no root, dmesg_restrict).
    """

    def __init__(self, path: str = KMSG) -> None:
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise HostError(
                f"cannot read the host kernel log {path} ({errno.errorcode.get(exc.errno or 0)})",
                "run as root, or set kernel.dmesg_restrict=0",
            ) from None
        os.lseek(self._fd, 0, os.SEEK_END)
        self._records: list[KmsgRecord] = []
        self._incomplete = False

    def _drain(self) -> None:
        if self._fd is None:
            return
        while True:
            try:
                raw = os.read(self._fd, _RECORD_MAX)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten; the next read resynchronises
                    self._incomplete = True
                    continue
                raise
            if not raw:
                return
            self._records.append(parse_kmsg_record(raw.decode("utf-8", errors="replace")))

    def delta(self) -> LogDelta:
        """Everything logged since the baseline, read now."""
        self._drain()
        records = tuple(self._records)
        return LogDelta(records, tuple(find_signatures(list(records))), self._incomplete)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> HostLogWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
