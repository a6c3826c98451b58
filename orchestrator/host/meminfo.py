"""/proc/meminfo samples and deltas, in bytes.

guest_memfd memory shows up host-wide only: its folios are page cache on an
unevictable mapping, so `Cached` and `Unevictable` move by the allocated and
punched amounts while `Shmem`, `Mlocked` and `AnonPages` stay put; a memfd
moves `Shmem` and `Cached` instead (research/interfaces.md section 6,
measured on 6.18). Counters are machine-wide, so other work on the host adds
noise: compare samples taken close together, and see `settle.py`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# The counters the guest_memfd and memfd invariants (H2, H9) look at.
TRACKED: tuple[str, ...] = ("Cached", "Unevictable", "Shmem", "Mlocked", "AnonPages")

_UNITS = {"kB": 1024, "": 1}


def parse_meminfo(text: str) -> dict[str, int]:
    """`/proc/meminfo` text as {name: value}; "kB" values become bytes, counts stay counts."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts:
            continue
        unit = parts[1] if len(parts) > 1 else ""
        if unit not in _UNITS:
            raise ValueError(f"unknown unit {unit!r} in meminfo line {line!r}")
        values[name.strip()] = int(parts[0]) * _UNITS[unit]
    return values


@dataclass(frozen=True)
class MeminfoSample:
    """One reading of /proc/meminfo at monotonic time `at`."""

    at: float
    values: Mapping[str, int] = field(repr=False)

    def __getitem__(self, name: str) -> int:
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(f"/proc/meminfo has no {name!r}") from None

    def delta(self, earlier: MeminfoSample, fields: Iterable[str] = TRACKED) -> dict[str, int]:
        """{field: self - earlier} in bytes, for `fields`."""
        return {name: self[name] - earlier[name] for name in fields}


def sample_meminfo(path: str = "/proc/meminfo") -> MeminfoSample:
    """Read `path` now (a synthetic file in tests)."""
    with open(path, encoding="ascii") as handle:
        text = handle.read()
    return MeminfoSample(time.monotonic(), parse_meminfo(text))


def meminfo_field(name: str, path: str = "/proc/meminfo") -> int:
    """One counter now, in bytes: a `read` callable for `settle`.

    Parses only its own line: settle loops call this every 10-20 ms, and the whole
    file (about 55 lines) cost 9 ms a call in Python under TCG.
    """
    with open(path, encoding="ascii") as handle:
        text = "\n" + handle.read()
    start = text.find(f"\n{name}:")  # the newline: "Cached" is not "SwapCached"
    if start < 0:
        raise KeyError(f"/proc/meminfo has no {name!r}")
    end = text.find("\n", start + 1)
    return parse_meminfo(text[start + 1 : end if end > 0 else None])[name]


def format_delta(delta: Mapping[str, int]) -> str:
    """ "Cached +128.0 MiB, Unevictable +128.0 MiB, Shmem +0.0 MiB" for messages and evidence."""
    return ", ".join(f"{name} {value / 2**20:+.1f} MiB" for name, value in delta.items())
