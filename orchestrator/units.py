"""Byte sizes as QEMU and humans write them ("512M", "2G", 4096)."""

from __future__ import annotations

import re

from orchestrator.errors import SpecError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
#: The x86 base page: the unit of guest conversions, punches and SEEK_DATA walks.
PAGE = 4096

_SUFFIX = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(value: int | str, what: str = "size") -> int:
    """Return `value` in bytes; suffixes K, M, G, T are powers of 1024, as in QEMU."""
    if isinstance(value, bool):
        raise SpecError(f"{what} must be a size, not {value!r}", "write e.g. 512M or 2G")
    if isinstance(value, int):
        if value < 0:
            raise SpecError(f"{what} is negative ({value})", "give a size in bytes or with K/M/G")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise SpecError(f"{what} {value!r} is not a size", "write e.g. 512M, 2G or 4096")
    return int(match.group(1)) * _SUFFIX[match.group(2).upper()]


def format_size(nbytes: int) -> str:
    """The shortest exact QEMU spelling of `nbytes` ("512M", "2G", "4095")."""
    for suffix in ("T", "G", "M", "K"):
        unit = _SUFFIX[suffix]
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return str(nbytes)


def kib(nbytes: float) -> int:
    """Bytes -> KiB, rounded: memory verdicts speak KiB, like /proc/meminfo."""
    return round(nbytes / 1024)
