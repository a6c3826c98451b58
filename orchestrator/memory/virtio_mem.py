"""virtio-mem: resize a device's plugged memory and follow it on QEMU's and the guest's side.

The host asks with `qom-set {"path": "/machine/peripheral/<id>", "property":
"requested-size", "value": N}` (a device created with `-device virtio-mem-pci,id=<id>`
lives under /machine/peripheral); the guest driver plugs or unplugs blocks
towards it. QEMU reports the plugged `size` in `query-memory-devices` and in the
MEMORY_DEVICE_SIZE_CHANGE event (rate-limited to one a second per device).

QEMU refuses a requested size that is not a multiple of the block size or exceeds
the memdev ("'requested-size' has to be multiples of 'block-size'", "... cannot
exceed the memory backend size", hw/virtio/virtio-mem.c); `resize` refuses the same
before anything is sent, saying what to do.

On unplug QEMU discards the blocks (`virtio_mem_set_block_state` ->
`ram_block_discard_range`: fallocate(PUNCH_HOLE) on a memfd/file, MADV_DONTNEED on
anonymous memory, whole huge pages on hugetlb since blocks are at least one huge
page), so the host backing of the memdev falls by what the guest had touched in
those blocks. Plugging allocates nothing on the host (without prealloc=on).

The guest needs the new memory online to use it: the Debian cloud kernel onlines
hot-added memory by itself (CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE); pass
`memhp_default_state=online_movable` so it lands in ZONE_MOVABLE, where unplug can
always migrate pages away (ZONE_NORMAL may hold unmovable kernel allocations).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.errors import MemoryOpError
from orchestrator.memory.guest_view import GuestMemory, Shell, guest_memory
from orchestrator.memory.progress import EventSource, Progress, follow
from orchestrator.qemu.argv import VMEM_DEVICE_ID
from orchestrator.qemu.qmp import QmpCommandError, QmpEvent
from orchestrator.timeline import Timeline, now
from orchestrator.units import format_size

DEFAULT_TIMEOUT = 120.0
#: Linux retries a failed unplug with back-off (starting at a few seconds).
DEFAULT_STALL = 10.0


class VirtioMemMonitor(EventSource, Protocol):
    """The part of `orchestrator.qemu.qmp.QmpSession` virtio-mem needs."""

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any: ...

    def mark(self) -> int: ...


def qom_path(device_id: str) -> str:
    """The QOM path of a device created with `-device ...,id=<device_id>`."""
    return f"/machine/peripheral/{device_id}"


@dataclass(frozen=True)
class VirtioMemDevice:
    """One virtio-mem device as `query-memory-devices` describes it (bytes)."""

    id: str
    memdev: str  # backend id ("vmem0"), not its QOM path
    memaddr: int  # GPA of the device's first byte
    block_size: int
    size: int  # plugged now
    max_size: int  # the memdev's size
    requested_size: int
    node: int

    @classmethod
    def from_qmp(cls, entry: Mapping[str, Any]) -> VirtioMemDevice:
        data = entry["data"]
        return cls(
            id=str(data.get("id", "")),
            memdev=str(data["memdev"]).rsplit("/", 1)[-1],
            memaddr=int(data["memaddr"]),
            block_size=int(data["block-size"]),
            size=int(data["size"]),
            max_size=int(data["max-size"]),
            requested_size=int(data["requested-size"]),
            node=int(data.get("node", 0)),
        )

    def contains(self, gpa: int) -> bool:
        return self.memaddr <= gpa < self.memaddr + self.max_size


def virtio_mem_devices(qmp: VirtioMemMonitor) -> list[VirtioMemDevice]:
    return [
        VirtioMemDevice.from_qmp(e)
        for e in qmp.execute("query-memory-devices")
        if e.get("type") == "virtio-mem"
    ]


def virtio_mem_device(qmp: VirtioMemMonitor, device_id: str = VMEM_DEVICE_ID) -> VirtioMemDevice:
    """The device `device_id`; MemoryOpError naming the ones there are when it is missing."""
    devices = virtio_mem_devices(qmp)
    for device in devices:
        if device.id == device_id:
            return device
    known = ", ".join(d.id for d in devices) or "none"
    raise MemoryOpError(
        f"this machine has no virtio-mem device {device_id!r} (virtio-mem devices: {known})",
        "start it with virtio_mem_size=<size>",
    )


def check_requested_size(requested: int, block_size: int, max_size: int) -> None:
    """Refuse a requested size QEMU would refuse, with the reason (pure)."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise MemoryOpError(
            f"virtio-mem requested size {requested!r} is not a byte count >= 0",
            "give an int number of bytes",
        )
    if requested % block_size:
        down = requested - requested % block_size
        raise MemoryOpError(
            f"virtio-mem requested size {requested} ({format_size(requested)}) is not a "
            f"multiple of the device's block size {format_size(block_size)}",
            f"use a multiple of {format_size(block_size)}, e.g. {format_size(down)} or "
            f"{format_size(down + block_size)}",
        )
    if requested > max_size:
        raise MemoryOpError(
            f"virtio-mem requested size {format_size(requested)} exceeds the device's "
            f"memory backend ({format_size(max_size)})",
            f"give at most {format_size(max_size)}, or start with a larger virtio_mem_size",
        )


@dataclass(frozen=True)
class ResizeResult:
    """What one `resize` did, on QEMU's side and (with a shell) the guest's."""

    device: VirtioMemDevice  # as it was before the resize
    progress: Progress
    guest_before: GuestMemory | None
    guest_after: GuestMemory | None

    @property
    def reached(self) -> bool:
        return self.progress.reached

    @property
    def plugged_change(self) -> int:
        """after - before: positive when memory was plugged."""
        return -self.progress.moved

    @property
    def guest_total_change(self) -> int | None:
        if self.guest_before is None or self.guest_after is None:
            return None
        return self.guest_after.mem_total - self.guest_before.mem_total

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device.id,
            "block_size": self.device.block_size,
            **self.progress.to_json(),
            "guest_before": self.guest_before.to_json() if self.guest_before else None,
            "guest_after": self.guest_after.to_json() if self.guest_after else None,
        }


def resize(
    qmp: VirtioMemMonitor,
    requested: int,
    *,
    device_id: str = VMEM_DEVICE_ID,
    guest: Shell | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    stall: float = DEFAULT_STALL,
    interval: float = 0.05,
    timeline: Timeline | None = None,
) -> ResizeResult:
    """Ask virtio-mem device `device_id` for `requested` bytes plugged and follow it.

    Refuses bad sizes first (MemoryOpError, nothing sent). Returns when the plugged
    size reaches `requested`, stops moving for `stall` seconds, or at `timeout`.
    """
    device = virtio_mem_device(qmp, device_id)
    check_requested_size(requested, device.block_size, device.max_size)
    path = qom_path(device_id)
    guest_before = guest_memory(guest) if guest is not None else None

    def plugged() -> int:
        return virtio_mem_device(qmp, device_id).size

    def event_size(event: QmpEvent) -> int | None:
        if event.data.get("id") != device_id and event.data.get("qom-path") != path:
            return None
        return int(event.data["size"])

    mark = qmp.mark()
    started = now()
    if timeline is not None:
        timeline.record(
            "op", "virtio-mem-resize", t=started, device=device_id, requested=requested,
            before=device.size,
        )  # fmt: skip
    try:
        qmp.execute("qom-set", {"path": path, "property": "requested-size", "value": requested})
    except QmpCommandError as error:
        raise MemoryOpError(
            f"QEMU refused requested-size {format_size(requested)} on {path}: {error.desc}",
            "see qmp.jsonl",
        ) from None
    progress = follow(
        plugged, requested, qmp, "MEMORY_DEVICE_SIZE_CHANGE", event_size,
        before=device.size, mark=mark, started=started, timeout=timeout, stall=stall,
        interval=interval,
    )  # fmt: skip
    guest_after = guest_memory(guest) if guest is not None else None
    result = ResizeResult(device, progress, guest_before, guest_after)
    if timeline is not None:
        timeline.record("op", "virtio-mem-resize-done", **result.to_json())
    return result
