"""virtio-balloon: set the guest's logical size and follow it on QEMU's and the guest's side.

QMP `balloon {"value": N}` sets the *logical size of the VM* (not the balloon's
size): the balloon then holds RAM - N bytes. QEMU silently clamps a value above
the RAM size (`virtio_balloon_to_target`), and the Linux driver inflates until its
allocations fail, which on a small guest ends in an out-of-memory guest; so
`set_balloon` refuses a target above the guest's RAM, below a floor, or not a
multiple of the balloon's 4 KiB page, before anything is sent.

QEMU's side: `query-balloon` `actual` (exact at any moment) and the BALLOON_CHANGE
event (rate-limited to one a second). The guest's side: MemTotal (see
`orchestrator.memory.guest_view`). The host's side is not judged here: see
`orchestrator.memory.backing`.

What inflation does to the host, per backend (QEMU hw/virtio/virtio-balloon.c
`balloon_inflate_page` -> system/physmem.c `ram_block_discard_range`): each 4 KiB
page is discarded at once when the RAMBlock's page size is 4 KiB; with larger pages
(hugetlb) QEMU collects 4 KiB pieces of one host page and discards it only when all
of them arrive in the same request, warning "Balloon used with backing page size >
4kiB, this may not be reliable". Linux sends at most 256 PFNs (1 MiB) per request
(VIRTIO_BALLOON_ARRAY_PFNS_MAX), so a 2 MiB huge page is never complete: on hugetlb
the balloon frees nothing on the host. Under SEV/SEV-ES and vhost-vdpa discards are
disabled altogether (`qemu_balloon_is_inhibited`).

Under TCG the guest inflates at roughly 128 MiB/s (measured here: 128 MiB in about
1 s); `BalloonResult.rate` reports it for every call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.errors import MemoryOpError
from orchestrator.memory.guest_view import GuestMemory, Shell, guest_memory
from orchestrator.memory.progress import EventSource, Progress, follow
from orchestrator.qemu.argv import BALLOON_ID
from orchestrator.qemu.qmp import QmpCommandError, QmpEvent
from orchestrator.timeline import Timeline, now
from orchestrator.units import MiB, format_size

#: The balloon's page: targets are whole pages (VIRTIO_BALLOON_PFN_SHIFT = 12).
BALLOON_PAGE = 4096
#: The smallest logical size `set_balloon` accepts unless told otherwise: the default
#: image's kernel, initramfs and SSH need about 60 MiB; below 128 MiB the guest thrashes.
DEFAULT_FLOOR = 128 * MiB
DEFAULT_TIMEOUT = 120.0
#: Seconds without progress after which the balloon is taken to have stopped.
DEFAULT_STALL = 5.0


class BalloonMonitor(EventSource, Protocol):
    """The part of `orchestrator.qemu.qmp.QmpSession` the balloon needs."""

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any: ...

    def mark(self) -> int: ...


def check_balloon_target(target: int, guest_ram: int, floor: int = DEFAULT_FLOOR) -> None:
    """Refuse a logical size QEMU or the guest cannot honour, with the reason (pure)."""
    if isinstance(target, bool) or not isinstance(target, int):
        raise MemoryOpError(
            f"balloon target {target!r} is not a number of bytes", "give an int, e.g. 384 MiB"
        )
    if target > guest_ram:
        raise MemoryOpError(
            f"balloon target {format_size(target)} is above the guest's RAM "
            f"({format_size(guest_ram)}): QEMU would clamp it silently",
            f"give a logical size of at most {format_size(guest_ram)} (the value is the "
            "guest's size after ballooning, not the balloon's size)",
        )
    if target < floor:
        raise MemoryOpError(
            f"balloon target {format_size(target)} is below the floor {format_size(floor)}: "
            "the guest would run out of memory",
            f"give at least {format_size(floor)}, or pass a lower floor= on purpose",
        )
    if target % BALLOON_PAGE:
        raise MemoryOpError(
            f"balloon target {target} is not a multiple of the balloon's {BALLOON_PAGE}-byte page",
            f"round it to a multiple of {BALLOON_PAGE}",
        )


def guest_ram_size(qmp: BalloonMonitor) -> int:
    """The guest's RAM as QEMU counts it for the balloon: base plus plugged memory."""
    summary = qmp.execute("query-memory-size-summary")
    return int(summary["base-memory"]) + int(summary.get("plugged-memory", 0))


def balloon_actual(qmp: BalloonMonitor) -> int:
    """`query-balloon` `actual`: the guest's logical size now (bytes).

    MemoryOpError when the machine has no balloon device (QEMU: DeviceNotActive).
    """
    try:
        return int(qmp.execute("query-balloon")["actual"])
    except QmpCommandError as error:
        if error.error_class == "DeviceNotActive":
            raise MemoryOpError(
                "this machine has no balloon device", "start it with balloon=on"
            ) from None
        raise


def free_page_reporting(qmp: BalloonMonitor, device_id: str = BALLOON_ID) -> bool:
    """Whether the balloon offers free page reporting (the guest then returns freed pages)."""
    return bool(
        qmp.execute(
            "qom-get",
            {"path": f"/machine/peripheral/{device_id}", "property": "free-page-reporting"},
        )
    )


@dataclass(frozen=True)
class BalloonResult:
    """What one `set_balloon` did, on QEMU's side and (when a shell was given) the guest's."""

    progress: Progress
    guest_before: GuestMemory | None
    guest_after: GuestMemory | None

    @property
    def target(self) -> int:
        return self.progress.target

    @property
    def reached(self) -> bool:
        return self.progress.reached

    @property
    def inflated(self) -> int:
        """Bytes the balloon took from the guest (negative when it deflated)."""
        return self.progress.moved

    @property
    def guest_total_drop(self) -> int | None:
        """MemTotal before - after (bytes), when the guest's view was read."""
        if self.guest_before is None or self.guest_after is None:
            return None
        return self.guest_before.mem_total - self.guest_after.mem_total

    def to_json(self) -> dict[str, Any]:
        return {
            **self.progress.to_json(),
            "guest_before": self.guest_before.to_json() if self.guest_before else None,
            "guest_after": self.guest_after.to_json() if self.guest_after else None,
        }


def _actual(event: QmpEvent) -> int | None:
    value = event.data.get("actual")
    return int(value) if value is not None else None


def set_balloon(
    qmp: BalloonMonitor,
    target: int,
    *,
    guest: Shell | None = None,
    floor: int = DEFAULT_FLOOR,
    timeout: float = DEFAULT_TIMEOUT,
    stall: float = DEFAULT_STALL,
    interval: float = 0.05,
    timeline: Timeline | None = None,
) -> BalloonResult:
    """Balloon the guest to logical size `target` bytes and follow it until it gets there.

    Checks the target first (MemoryOpError, nothing sent). Returns when `actual`
    reaches `target`, stops moving for `stall` seconds, or at `timeout`; the result
    says which (`reached`), with the progress, the confirming BALLOON_CHANGE and,
    with `guest`, MemTotal before and after. QMP failures raise QmpError.
    """
    check_balloon_target(target, guest_ram_size(qmp), floor)
    before = balloon_actual(qmp)
    guest_before = guest_memory(guest) if guest is not None else None
    mark = qmp.mark()
    started = now()
    if timeline is not None:
        timeline.record("op", "balloon", t=started, target=target, before=before)
    try:
        qmp.execute("balloon", {"value": target})
    except QmpCommandError as error:
        raise MemoryOpError(
            f"QEMU refused balloon {format_size(target)}: {error.desc}", "see qmp.jsonl"
        ) from None
    progress = follow(
        lambda: balloon_actual(qmp), target, qmp, "BALLOON_CHANGE", _actual,
        before=before, mark=mark, started=started, timeout=timeout, stall=stall,
        interval=interval,
    )  # fmt: skip
    guest_after = guest_memory(guest) if guest is not None else None
    result = BalloonResult(progress, guest_before, guest_after)
    if timeline is not None:
        timeline.record("op", "balloon-done", **result.to_json())
    return result


def balloon_by(qmp: BalloonMonitor, inflate: int, **kwargs: Any) -> BalloonResult:
    """Inflate the balloon by `inflate` bytes from the guest's full RAM (a convenience)."""
    ram = guest_ram_size(qmp)
    return set_balloon(qmp, ram - inflate, **kwargs)
