"""Start a guest cold or warm, and say which: `start_guest()`.

The policy, in order (the first that applies decides):
1. The caller says the test needs a cold boot (`cold_reason`: boot checks, boot-time
   state) or the user turned warm starts off (`CVMLAB_WARM=0`): cold, argv as always.
2. The machine cannot be saved (confidential guest, QEMU without mapped-ram): cold
   with that reason.
3. A valid snapshot for the key exists: restore it. A refused snapshot (damaged,
   truncated, from another QEMU, open permissions) or a restore QEMU rejects is one
   reason line, the restoring QEMU is stopped, and the guest boots cold.
4. Otherwise cold, and the snapshot is saved at the readiness marker for the next
   test (a failed save, e.g. a full disk, is a reason line; the test goes on with the
   cold guest). A saved guest is not used further: the save read all its RAM, so
   QEMU's backing holds every page. Its QEMU is stopped, the evidence of its boot kept
   in `saving-boot/`, and the test goes on with a restore, like every later test.

Whatever happens, the caller gets a started, ready `Machine` (or the boot's own
error, exactly as a plain cold boot raises it) and a `StartRecord` for the evidence.
Nothing is left running: a machine that is not returned has been killed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import CvmlabError, QmpError
from orchestrator.qemu.launcher import EVIDENCE_FILES, Machine
from orchestrator.qemu.snapshot import (
    WARM_DEVICE_ARGS,
    Snapshot,
    SnapshotCache,
    SnapshotError,
    SnapshotKey,
    StartRecord,
    cold_only_reason,
    restore,
    resume_after_save,
    save,
    snapshot_key,
)
from orchestrator.qemu.spec import MachineSpec
from orchestrator.timeline import Timeline, now

if TYPE_CHECKING:
    from orchestrator.guest.ssh import GuestShell

#: `CVMLAB_WARM=0` turns warm starts off (every guest boots cold, nothing is saved).
WARM_ENV = "CVMLAB_WARM"


def warm_disabled() -> bool:
    return os.environ.get(WARM_ENV, "1").strip().lower() in ("0", "no", "off", "false")


def _say(timeline: Timeline | None, kind: str, **data: Any) -> None:
    if timeline is not None:
        timeline.record("start", kind, **data)


def start_guest(
    spec: MachineSpec,
    evidence_dir: Path,
    *,
    binary: Sequence[str],
    qemu_version: tuple[int, ...] | None,
    image_hashes: dict[str, str],
    ready_marker: str,
    timeline: Timeline | None = None,
    cold_reason: str | None = None,
    boot_timeout: float = 120.0,
    cache: SnapshotCache | None = None,
    machine_factory: Callable[..., Machine] = Machine,
    **machine_kwargs: Any,
) -> tuple[Machine, StartRecord]:
    """A ready guest for `spec`, restored from a snapshot where that is sound.

    `cold_reason` forces a cold boot (the test needs one). `machine_factory` builds
    the Machine (`cvmlab repro` replays a recorded argv through its own class).
    """
    version_text = ".".join(str(v) for v in qemu_version) if qemu_version else "unknown"

    def machine(**extra: Any) -> Machine:
        return machine_factory(
            spec, evidence_dir, binary=list(binary), timeline=timeline,
            ready_marker=ready_marker, **machine_kwargs, **extra,
        )  # fmt: skip

    reason = cold_reason
    if reason is None and warm_disabled():
        reason = f"warm starts are off ({WARM_ENV}=0)"
    if reason is not None:
        return _cold(machine(), StartRecord("cold", reason), boot_timeout, timeline)
    reason = cold_only_reason(spec, qemu_version)
    if reason is not None:
        return _cold(machine(), StartRecord("cold", reason), boot_timeout, timeline)

    cache = cache if cache is not None else SnapshotCache()
    key = snapshot_key(spec, binary, version_text, image_hashes)
    try:
        snapshot = cache.lookup(key)
    except SnapshotError as error:
        snapshot = None
        reason = f"snapshot refused: {error}"
    if snapshot is not None:
        started = _restore(machine, cache, key, snapshot, timeline)
        if isinstance(started, tuple):
            return started
        reason = started
    record = StartRecord("cold", reason or "no snapshot of this machine yet", key=key.digest)
    cold, record = _cold(machine(extra_args=WARM_DEVICE_ARGS), record, boot_timeout, timeline)
    try:
        snapshot = _save(cold, cache, key, record, timeline)
    except BaseException:  # ResumeError: the guest stays paused, nothing can use it
        cold.kill()
        raise
    if snapshot is None:
        return cold, record  # not saved (the guest runs on): why is in record.saved
    # The save read every page of guest RAM, so QEMU's backing now holds all of it
    # (shmem and file backends: 512 of 512 MiB, against 82 after a cold boot and 70
    # after a restore): no test could measure host memory on this guest. Go on with
    # a restore of the snapshot, as every later test of this machine will.
    cold.kill()
    _keep_saving_boot(evidence_dir)
    started = _restore(machine, cache, key, snapshot, timeline, saved_by_this_test=record)
    if isinstance(started, tuple):
        return started
    record = StartRecord("cold", f"{started}, after this test's save", key=key.digest)
    return _cold(machine(extra_args=WARM_DEVICE_ARGS), record, boot_timeout, timeline)


#: Where a test that saved its machine's snapshot keeps the evidence of that cold boot
#: (the files a Machine writes), before it goes on with a restore of the snapshot.
SAVING_BOOT_DIR = "saving-boot"


def _keep_saving_boot(evidence_dir: Path) -> None:
    kept = evidence_dir / SAVING_BOOT_DIR
    kept.mkdir(mode=0o700, exist_ok=True)
    for name in EVIDENCE_FILES:
        with contextlib.suppress(FileNotFoundError):
            (evidence_dir / name).rename(kept / name)


def _restore(
    machine: Callable[..., Machine],
    cache: SnapshotCache,
    key: SnapshotKey,
    snapshot: Snapshot,
    timeline: Timeline | None,
    saved_by_this_test: StartRecord | None = None,
) -> tuple[Machine, StartRecord] | str:
    """A guest restored from `snapshot`, or why not (its QEMU stopped, the snapshot
    discarded)."""
    warm = machine(extra_args=WARM_DEVICE_ARGS, incoming=True)
    try:
        warm.start()
        started = warm.timings["launch"]
        restore(warm.qmp, snapshot)
        ready = now()  # running; marked ready once its clock is set (finish_start)
    except (SnapshotError, QmpError) as error:
        # QEMU refused the stream (damaged, another QEMU's), or the restore stuck.
        warm.kill()
        cache.discard(key)
        return f"snapshot restore failed: {error}"
    except BaseException:
        warm.kill()
        raise
    reason = f"restored snapshot {snapshot.data_path.name}"
    notes = restore_notes(snapshot.meta, time.time())
    saved = None
    if saved_by_this_test is not None:
        saved = saved_by_this_test.saved
        by = "it had just saved" if saved == str(snapshot.data_path) else "another test saved first"
        reason += (
            f" after this test's cold boot, which {by} (a save populates all of QEMU's RAM backing)"
        )
        notes["saving_boot"] = {
            "seconds": None
            if saved_by_this_test.seconds is None
            else round(saved_by_this_test.seconds, 3),
            "reason": saved_by_this_test.reason,
            "evidence": SAVING_BOOT_DIR,
        }
    record = StartRecord(
        "warm", reason, key=key.digest, snapshot=str(snapshot.data_path), saved=saved,
        seconds=ready - started, notes=notes,
    )  # fmt: skip
    _say(timeline, "warm", **record.to_json())
    return warm, record


def _cold(
    machine: Machine, record: StartRecord, boot_timeout: float, timeline: Timeline | None
) -> tuple[Machine, StartRecord]:
    try:
        machine.start()
        ready = machine.wait_ready(timeout=boot_timeout)
    except BaseException:
        machine.kill()
        raise
    record.seconds = ready - machine.timings["launch"]
    _say(timeline, "cold", **record.to_json())
    return machine, record


def _save(
    machine: Machine,
    cache: SnapshotCache,
    key: SnapshotKey,
    record: StartRecord,
    timeline: Timeline | None,
) -> Snapshot | None:
    """Save the just-booted guest for later tests: the snapshot to go on from (the
    guest left paused), or None when the save failed and the guest runs on (why is
    in `record.saved`; a guest that cannot be resumed after it is: ResumeError)."""
    started = now()
    snapshot: Snapshot | None = None
    try:
        snapshot = save(
            machine.qmp, cache, key, {"saved_by": str(machine.evidence_dir)}, resume=False
        )
        if snapshot is not None:
            record.saved = str(snapshot.data_path)
        else:  # another test committed the same key first: go on from its snapshot
            record.saved = "not saved: another test did"
            try:
                snapshot = cache.lookup(key)
            finally:
                if snapshot is None:
                    resume_after_save(machine.qmp)
    except (SnapshotError, QmpError) as error:
        record.saved = f"not saved: {error}"
    _say(timeline, "snapshot-save", saved=record.saved, seconds=round(now() - started, 3))
    return snapshot


def restore_notes(meta: dict[str, Any], t: float) -> dict[str, Any]:
    """What a restore changed compared with a cold boot (before the clock is synced)."""
    return {
        "snapshot_age_s": round(max(0.0, t - float(meta.get("saved_at", t))), 1),
        "backing": (
            f"QEMU's RAM backing holds the snapshot's {int(meta.get('data_bytes', 0)) >> 20}"
            " MiB of non-zero pages; a cold boot also populates pages the guest zeroed"
        ),
        "rng": (
            "the guest's RNG state is the snapshot's (identical in every restore);"
            " vmgenid gave this QEMU a new generation ID, so the guest reseeded"
        ),
        "channels": "serial console, QMP and SSH are new; the console has no boot log",
    }


def finish_start(
    machine: Machine, shell: GuestShell, record: StartRecord, restored_clock: str = "ssh"
) -> bool:
    """After SSH is up: see a restored guest's clock set to the host's (it stood still in
    the snapshot), then mark the machine ready. True when that ran a guest command.

    `restored_clock` is the image's (`ImageManifest.restored_clock`): "rtc", the guest's
    SSH listener already set it from the RTC before this connection's process started
    (images/minimal/guest-helper/dropbear-rtc-clock.c; a move of 2 s or more is in
    the guest's kernel log); "ssh", cvmlab sets it now with one command and records
    the offset. A guest that refuses is noted, not fatal (only a test comparing guest
    and host wall time cares). Ready comes after the clock, so `cvmlab repro` (which
    replays what came after ready) replays no clock command.
    """
    if record.mode != "warm":
        return False
    ran_command = restored_clock != "rtc"
    if ran_command:
        _sync_clock(shell, record)
    else:
        record.notes["clock"] = (
            "set by the guest from its RTC (QEMU keeps the RTC on the host's time across a"
            " restore), in the SSH listener before this connection's process started;"
            " a move of 2 s or more is in guest-dmesg.txt"
        )
    machine.mark_ready("snapshot")
    return ran_command


#: Read the guest's clock with a shell builtin, then exec date to set it: one round
#: trip and one program. It is the restored guest's first command, so everything it
#: runs is translated afresh by TCG: `date +%s && date -s` (two forks, and date's
#: formatting of the new time) took 0.19 s there against 0.14 s (median of 5).
_CLOCK_COMMAND = "echo $EPOCHSECONDS; exec date -u -s @{host} >/dev/null"


def _sync_clock(shell: GuestShell, record: StartRecord) -> None:
    try:
        host = int(time.time())  # the text is our integer
        out = shell.run(_CLOCK_COMMAND.format(host=host), timeout=20).stdout
    except CvmlabError as error:
        record.notes["clock"] = f"guest clock not synced: {error}"
        return
    before = out.split("\n", 1)[0].strip()
    if before.isdigit():
        record.notes["clock"] = f"guest clock was {host - int(before)} s behind; set to the host's"
    else:  # a shell without EPOCHSECONDS: the clock was still set
        record.notes["clock"] = "guest clock set to the host's (its shell could not read it)"
