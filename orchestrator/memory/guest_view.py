"""The guest's own view of its memory (G4), read over SSH in one command.

- /proc/meminfo `MemTotal`: a Linux virtio-balloon driver without
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM takes each inflated page out of the managed page
  count (`adjust_managed_page_count(page, -1)`, drivers/virtio/virtio_balloon.c), so
  MemTotal falls by exactly the balloon's size; with deflate-on-oom it does not move.
  virtio-mem adds and removes whole subblocks of online memory, so MemTotal moves
  by exactly the plugged amount once the memory is online.
- /sys/devices/system/memory: Linux memory blocks (128 MiB on x86 with less than 64 GiB)
  and their state. virtio-mem memory is onlined by the kernel when
  `memhp_default_state=online|online_movable` (or CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE,
  which the Debian cloud kernel has); otherwise it stays offline and MemTotal stays put.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.errors import GuestError
from orchestrator.host.meminfo import parse_meminfo

# One command, so the figures belong together. A constant string: nothing from the guest
# or the user is built into it.
_VIEW_COMMAND = (
    "cat /proc/meminfo; echo @@blocks; "
    "cat /sys/devices/system/memory/block_size_bytes 2>/dev/null; "
    "cat /sys/devices/system/memory/memory*/state 2>/dev/null; true"
)


class Shell(Protocol):
    """The part of `orchestrator.guest.ssh.GuestShell` this module needs."""

    def run(self, cmd: str | Sequence[str], timeout: float = ..., check: bool = ...) -> Any: ...


@dataclass(frozen=True)
class GuestMemory:
    """MemTotal/MemFree/MemAvailable (bytes) and the memory blocks' states."""

    mem_total: int
    mem_free: int
    mem_available: int
    block_size: int | None  # bytes; None when the guest has no memory-block sysfs
    online_blocks: int
    offline_blocks: int

    def to_json(self) -> dict[str, Any]:
        return {
            "mem_total": self.mem_total,
            "mem_free": self.mem_free,
            "mem_available": self.mem_available,
            "block_size": self.block_size,
            "online_blocks": self.online_blocks,
            "offline_blocks": self.offline_blocks,
        }


def parse_guest_memory(text: str) -> GuestMemory:
    """Parse the output of the view command (pure)."""
    meminfo_text, _, blocks_text = text.partition("@@blocks")
    try:
        meminfo = parse_meminfo(meminfo_text)
        total, free, available = (meminfo[k] for k in ("MemTotal", "MemFree", "MemAvailable"))
    except (KeyError, ValueError) as error:
        raise GuestError(
            f"the guest's /proc/meminfo is unreadable ({error})", "see timeline.jsonl"
        ) from None
    lines = [line.strip() for line in blocks_text.splitlines() if line.strip()]
    block_size = int(lines[0], 16) if lines else None
    states = lines[1:]
    return GuestMemory(
        mem_total=total,
        mem_free=free,
        mem_available=available,
        block_size=block_size,
        online_blocks=sum(1 for s in states if s == "online"),
        offline_blocks=sum(1 for s in states if s == "offline"),
    )


def guest_memory(shell: Shell, timeout: float = 30.0) -> GuestMemory:
    """The guest's memory view now."""
    result = shell.run(_VIEW_COMMAND, timeout=timeout)
    return parse_guest_memory(str(result.stdout))
