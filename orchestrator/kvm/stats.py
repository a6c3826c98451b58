"""KVM binary statistics (`KVM_GET_STATS_FD`), read by name.

Layout (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"; kvm.h): a header
at offset 0, an id string at `id_offset` ("kvm-<pid>" for a VM), `num_desc`
descriptors at `desc_offset`, each a 16-byte `kvm_stats_desc` followed by a
`name_size`-byte NUL-padded name, and the data block at `data_offset`, where
descriptor `d` owns `d.size` u64 values at `data_offset + d.offset`. The
header and descriptors never change for the life of the fd; the data does.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from types import TracebackType

from orchestrator.kvm import uapi

_DESC_FIXED = ctypes.sizeof(uapi.KvmStatsDesc)


@dataclass(frozen=True)
class StatDescriptor:
    """One statistic: its name, kind, unit and where its values live."""

    name: str
    flags: int
    exponent: int
    size: int  # number of u64 values (1 for plain counters, >1 for histograms)
    offset: int  # relative to the data block
    bucket_size: int

    @property
    def kind(self) -> str:
        return uapi.STATS_TYPE_NAMES.get(self.flags & uapi.KVM_STATS_TYPE_MASK, "unknown")

    @property
    def unit(self) -> str:
        return uapi.STATS_UNIT_NAMES.get((self.flags & uapi.KVM_STATS_UNIT_MASK) >> 4, "unknown")


@dataclass(frozen=True)
class StatsLayout:
    """The parsed, immutable part of a stats fd: id and descriptors by name."""

    id: str
    data_offset: int
    descriptors: dict[str, StatDescriptor]


def parse_layout(blob: bytes) -> StatsLayout:
    """Parse header, id and descriptors from the first bytes of a stats fd.

    `blob` must reach at least the end of the descriptor block.
    """
    header = uapi.KvmStatsHeader.from_buffer_copy(blob[: ctypes.sizeof(uapi.KvmStatsHeader)])
    ident = blob[header.id_offset : header.id_offset + header.name_size]
    descriptors: dict[str, StatDescriptor] = {}
    stride = _DESC_FIXED + header.name_size
    for index in range(header.num_desc):
        start = header.desc_offset + index * stride
        raw = blob[start : start + stride]
        if len(raw) < stride:
            raise ValueError(f"stats descriptor {index} is truncated ({len(raw)} < {stride} bytes)")
        fixed = uapi.KvmStatsDesc.from_buffer_copy(raw[:_DESC_FIXED])
        name = raw[_DESC_FIXED:].split(b"\0", 1)[0].decode()
        descriptors[name] = StatDescriptor(
            name, fixed.flags, fixed.exponent, fixed.size, fixed.offset, fixed.bucket_size
        )
    return StatsLayout(ident.split(b"\0", 1)[0].decode(), header.data_offset, descriptors)


class KvmStats:
    """An open stats fd; `read("pages_4k")` returns the current value."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        try:
            header_bytes = os.pread(fd, ctypes.sizeof(uapi.KvmStatsHeader), 0)
            header = uapi.KvmStatsHeader.from_buffer_copy(header_bytes)
            end = header.desc_offset + header.num_desc * (_DESC_FIXED + header.name_size)
            end = max(end, header.id_offset + header.name_size)
            self.layout = parse_layout(os.pread(fd, end, 0))
        except BaseException:
            self.close()
            raise

    @property
    def id(self) -> str:
        """ "kvm-<pid>" for a VM's stats."""
        return self.layout.id

    @property
    def names(self) -> list[str]:
        return list(self.layout.descriptors)

    def read_values(self, name: str) -> tuple[int, ...]:
        """All u64 values of statistic `name` (histograms have several)."""
        if self._fd is None:
            raise ValueError("stats fd is closed")
        try:
            desc = self.layout.descriptors[name]
        except KeyError:
            raise KeyError(f"no KVM statistic {name!r}; have: {', '.join(self.names)}") from None
        raw = os.pread(self._fd, 8 * desc.size, self.layout.data_offset + desc.offset)
        return struct.unpack(f"<{desc.size}Q", raw)

    def read(self, name: str) -> int:
        """The value of a single-valued statistic `name`."""
        values = self.read_values(name)
        if len(values) != 1:
            raise ValueError(f"KVM statistic {name!r} has {len(values)} values; use read_values")
        return values[0]

    def read_all(self) -> dict[str, tuple[int, ...]]:
        return {name: self.read_values(name) for name in self.layout.descriptors}

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> KvmStats:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
