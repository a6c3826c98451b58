"""Warm start: a booted guest saved once and restored for later tests.

A cold boot under TCG costs seconds; most tests need a ready guest, not its boot.
The first test that needs a given machine boots cold and, at its readiness
marker (before SSH connects: no session is frozen into the snapshot), saves the
guest with QEMU's migration to a file in the `mapped-ram` format (QEMU >= 9.0:
each RAM page at a fixed offset, zero pages left as holes, so the file is sparse).
Later tests start QEMU with the same argv plus `-incoming defer`, load the file
with `migrate-incoming` and `cont`.

The key (`SnapshotKey`) is everything that makes a snapshot valid: the image's
hashes, the machine's argv (spec, accelerator, CPU model, devices), the QEMU
binary (path, size, mtime, version) and, off TCG, the host kernel and CPU. A
changed image, spec or QEMU is another key and never restores a stale snapshot.

Files (in `cache_dir()`, 0700; every file 0600: they hold guest memory):
`<key>.json` names the data file `<key>.<nonce>.ram` and records its size,
inode, ctime and a CRC-32 of its data extents. The JSON is committed last, with
link() (create-if-absent), so a half-written snapshot is never seen and two
tests saving the same key at once cannot mix their files. Before a restore the
data file's identity (inode, size, mtime, ctime) must match: the kernel moves
ctime on every write, so an unchanged identity means the bytes are the ones we
saved; a changed one triggers the full CRC (a damaged or truncated file is
refused by name) and QEMU itself rejects a structurally broken stream.

What a restore changes, and what is done about it (all in the `StartRecord`):
- QEMU's backing holds only the pages the snapshot has data for (zero pages are
  holes): host-memory measurements see less populated than after a cold boot.
- The guest's clock stands where it was saved: the default image's SSH listener
  sets it from the RTC, which QEMU keeps on the host's time, before any session
  starts; for an image without that, `warm.finish_start` sets it over SSH and
  records the offset it corrected.
- The guest's RNG state is identical in every restore of one snapshot (measured:
  the same /proc/sys/kernel/random/uuid in two restores). A `vmgenid` device is
  part of every warm-capable machine (`WARM_DEVICE_ARGS`): each QEMU gets a new
  generation ID and the guest kernel's vmgenid driver reseeds its RNG on restore
  (drivers/virt/vmgenid.c, vmgenid_notify -> add_vmfork_randomness).
- The serial console, QMP and SSH are new connections; the console shows no
  boot log (guest-dmesg.txt still has it).

Confidential guests cannot be migrated by QEMU (their memory is encrypted and
the migration blockers of sev/tdx refuse it): they always boot cold, with that
reason in the evidence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchestrator.errors import CvmlabError, QemuError, QmpError
from orchestrator.qemu.argv import Plumbing, build_argv
from orchestrator.qemu.qmp import QmpSession
from orchestrator.qemu.spec import MachineSpec

SNAPSHOT_FORMAT = 1
#: Every warm-capable machine has it, cold or restored: a new generation ID per QEMU
#: reseeds the guest's RNG after a restore.
WARM_DEVICE_ARGS: tuple[str, ...] = ("-device", "vmgenid,id=vmgenid0,guid=auto")
#: A restoring QEMU waits for `migrate-incoming` instead of booting.
INCOMING_ARGS: tuple[str, ...] = ("-incoming", "defer")
#: No self-announce after a restore: QEMU would have the guest send gratuitous ARPs in
#: 5 rounds over the first second (virtio-net's guest announce), work a TCG guest does
#: while its first SSH connection waits. A restore is a clone, not a move: user-mode
#: networking, the only network a spec has, has no switch to tell (437 of 36.5k TBs
#: translated from `cont` to the first command, measured with `-d in_asm`).
RESTORE_PARAMETERS: dict[str, Any] = {"announce-rounds": 0}
#: mapped-ram (fixed-offset, sparse file migration) appeared in QEMU 9.0.
MAPPED_RAM_SINCE = (9, 0)
SAVE_TIMEOUT = 120.0
#: On-disk budget of the cache (the newest snapshots are kept): $CVMLAB_SNAPSHOT_MIB.
DEFAULT_BUDGET_MIB = 4096
RESTORE_TIMEOUT = 120.0
_CHUNK = 4 << 20
_PRIVATE_BITS = 0o077

StartMode = Literal["cold", "warm"]


class SnapshotError(CvmlabError):
    """A snapshot cannot be used or saved; the guest boots cold and the reason is recorded."""


class ResumeError(QemuError):
    """The guest could not be resumed after its snapshot was taken: it stays paused, so
    the test cannot go on (unlike a failed save, which only costs later tests a boot)."""


# --- the start record: what the evidence says about how the guest started ------------


@dataclass
class StartRecord:
    """How one test's guest started: `cold` or `warm`, and why.

    `reason` is why it was cold (a cold-only scenario, no snapshot yet, a refused
    snapshot...) or what was restored. `notes` lists what the restore changed and
    what was done about it (clock, RNG, backing population).
    """

    mode: StartMode
    reason: str
    key: str | None = None
    snapshot: str | None = None
    saved: str | None = None  # this cold start saved the snapshot (its file), or why not
    seconds: float | None = None  # launch to ready (cold: readiness marker; warm: running)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "reason": self.reason,
            "key": self.key,
            "snapshot": self.snapshot,
            "saved": self.saved,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "notes": self.notes,
        }


# --- where snapshots live ----------------------------------------------------------------


def cache_dir() -> Path:
    """`$CVMLAB_CACHE/snapshots`, else `$XDG_CACHE_HOME/cvmlab/snapshots` (default
    `~/.cache/cvmlab/snapshots`). In the lab the host's root is read-only: point
    either variable at a writable place."""
    explicit = os.environ.get("CVMLAB_CACHE", "")
    if explicit and Path(explicit).is_absolute():
        return Path(explicit) / "snapshots"
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "cvmlab" / "snapshots"


def private_dir(path: Path) -> Path:
    """`path`, created 0700 if missing; an existing one must be ours and closed to others.

    A directory others can read would expose guest memory: it is refused, not fixed
    (someone chose those permissions; the fix is theirs).
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as err:
        raise SnapshotError(
            f"snapshot cache {path} is not usable: {err.strerror}",
            "set CVMLAB_CACHE to a writable directory",
        ) from None
    if st.st_uid != os.getuid():
        raise SnapshotError(
            f"snapshot cache {path} belongs to uid {st.st_uid}, not to us",
            "use a cache directory of your own (CVMLAB_CACHE)",
        )
    if st.st_mode & _PRIVATE_BITS:
        raise SnapshotError(
            f"snapshot cache {path} is open to others (mode {stat.S_IMODE(st.st_mode):04o}):"
            " snapshots hold guest memory",
            f"chmod 0700 {path}",
        )
    return path


# --- the key -------------------------------------------------------------------------------


def _file_identity(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path]
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def _host_identity(accel: str) -> dict[str, Any]:
    """Off TCG the guest's CPU and KVM's state format come from the host."""
    if accel.split(",")[0] == "tcg":
        return {}
    model, flags = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and not model:
                model = value.strip()
            elif name.strip() == "flags" and not flags:
                flags = hashlib.sha256(value.strip().encode()).hexdigest()[:16]
    return {"kernel": os.uname().release, "cpu": model, "cpu_flags": flags}


@dataclass(frozen=True)
class SnapshotKey:
    """Everything a snapshot depends on, and its digest (the file name)."""

    parts: dict[str, Any]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.parts, sort_keys=True).encode()).hexdigest()[:32]


def warm_argv(spec: MachineSpec, binary: Sequence[str]) -> list[str]:
    """The machine's argv as the key sees it: run-time plumbing (QMP fd, trace file
    path) replaced by fixed values, because they are not part of the guest's state."""
    plumbing = Plumbing(
        qmp_socket="/qmp", serial="stdio", trace_file="/trace" if spec.trace_events else None
    )
    return [*build_argv(spec, plumbing, list(binary)), *WARM_DEVICE_ARGS]


def snapshot_key(
    spec: MachineSpec,
    binary: Sequence[str],
    qemu_version: str,
    image_hashes: dict[str, str],
) -> SnapshotKey:
    """The key for `spec` run by `binary` (QEMU `qemu_version`) around an image."""
    return SnapshotKey(
        {
            "format": SNAPSHOT_FORMAT,
            "argv": warm_argv(spec, binary),
            "qemu": {"version": qemu_version, "binary": [_file_identity(b) for b in binary]},
            "image": dict(sorted(image_hashes.items())),
            "host": _host_identity(spec.accel),
        }
    )


def cold_only_reason(spec: MachineSpec, qemu_version: tuple[int, ...] | None) -> str | None:
    """Why this machine cannot be saved and restored at all, or None when it can."""
    if spec.confidential is not None:
        return (
            f"a confidential guest ({type(spec.confidential).__name__}) cannot be migrated:"
            " QEMU blocks migration of TDX/SNP/SEV guests"
        )
    if qemu_version is not None and tuple(qemu_version[:2]) < MAPPED_RAM_SINCE:
        have = ".".join(str(v) for v in qemu_version)
        return f"QEMU {have} has no mapped-ram migration (needs >= 9.0)"
    return None


# --- the files -----------------------------------------------------------------------------


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every data extent of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            return  # ENXIO: no data after offset
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def data_crc(path: Path) -> tuple[int, int]:
    """(CRC-32 of the data extents with their offsets, bytes of data) of a sparse file."""
    crc = 0
    total = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        for start, end in data_extents(fd, size):
            crc = zlib.crc32(start.to_bytes(8, "little"), crc)
            os.lseek(fd, start, os.SEEK_SET)
            left = end - start
            while left > 0:
                chunk = os.read(fd, min(left, _CHUNK))
                if not chunk:
                    break
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
                total += len(chunk)
    finally:
        os.close(fd)
    return crc, total


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


@dataclass(frozen=True)
class Snapshot:
    """A committed snapshot: its metadata file and the data file it names."""

    meta_path: Path
    data_path: Path
    meta: dict[str, Any]

    @property
    def saved_at(self) -> float:
        return float(self.meta.get("saved_at", 0.0))


class SnapshotCache:
    """The snapshots of one cache directory (see the module docstring for the layout)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cache_dir()

    def _meta_path(self, key: SnapshotKey) -> Path:
        return self.root / f"{key.digest}.json"

    def discard(self, key: SnapshotKey) -> None:
        """Forget `key`'s snapshot (its metadata and data file), e.g. after a refusal."""
        meta_path = self._meta_path(key)
        with contextlib.suppress(OSError, ValueError, KeyError):
            name = json.loads(meta_path.read_text())["data"]
            (self.root / Path(name).name).unlink()
        with contextlib.suppress(OSError):
            meta_path.unlink()

    def lookup(self, key: SnapshotKey) -> Snapshot | None:
        """The usable snapshot of `key`, None when there is none yet.

        Raises SnapshotError (and forgets the snapshot) when one exists but must not
        be restored: another key or format, a data file changed since it was saved
        (truncated, damaged), or files open to others.
        """
        private_dir(self.root)
        meta_path = self._meta_path(key)
        try:
            text = meta_path.read_text()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SnapshotError(f"snapshot {meta_path} is unreadable: {err.strerror}") from None
        try:
            return self._check(key, meta_path, text)
        except SnapshotError:
            self.discard(key)
            raise

    def lookup_digest(self, digest: str) -> Snapshot | None:
        """The snapshot a test's start.json names by its key digest (`cvmlab repro`),
        checked as lookup() checks it; None when it is no longer in the cache."""
        try:
            parts = json.loads((self.root / f"{Path(digest).name}.json").read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        key = SnapshotKey(parts)
        return self.lookup(key) if key.digest == digest else None

    def _check(self, key: SnapshotKey, meta_path: Path, text: str) -> Snapshot:
        try:
            meta = json.loads(text)
            data_path = self.root / Path(str(meta["data"])).name
            recorded = [int(v) for v in meta["identity"]]
            crc = int(meta["crc32"])
        except (ValueError, KeyError, TypeError):
            raise SnapshotError(f"snapshot metadata {meta_path} is damaged") from None
        if meta.get("format") != SNAPSHOT_FORMAT or meta.get("key") != key.parts:
            qemu = (meta.get("key") or {}).get("qemu", {}).get("version", "?")
            raise SnapshotError(
                f"snapshot {meta_path.name} was made for another machine, image or QEMU"
                f" (its QEMU: {qemu})"
            )
        try:
            st = data_path.stat()
        except OSError:
            raise SnapshotError(f"snapshot data {data_path.name} is missing") from None
        for path, mode in ((meta_path, meta_path.stat().st_mode), (data_path, st.st_mode)):
            if mode & _PRIVATE_BITS:
                raise SnapshotError(
                    f"snapshot file {path.name} is open to others"
                    f" (mode {stat.S_IMODE(mode):04o}): it holds guest memory"
                )
        if st.st_size != recorded[1]:
            raise SnapshotError(
                f"snapshot data {data_path.name} is truncated or extended"
                f" ({st.st_size} bytes, saved {recorded[1]})"
            )
        if _identity(st) != recorded:
            # Written since we saved it (ctime moved): only its contents can tell.
            seen, _ = data_crc(data_path)
            if seen != crc:
                raise SnapshotError(
                    f"snapshot data {data_path.name} is damaged (CRC-32 {seen:08x}, saved"
                    f" {crc:08x})"
                )
        return Snapshot(meta_path, data_path, meta)

    # --- saving ----------------------------------------------------------------------

    def new_data_path(self, key: SnapshotKey) -> Path:
        """A fresh 0600 data file for `key` (QEMU writes into it)."""
        private_dir(self.root)
        path = self.root / f"{key.digest}.{secrets.token_hex(4)}.ram"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        return path

    def commit(self, key: SnapshotKey, data_path: Path, extra: dict[str, Any]) -> Snapshot | None:
        """Publish `data_path` as `key`'s snapshot; None when another test published first
        (ours is deleted). The metadata appears atomically, last."""
        try:
            with open(data_path, "rb") as data:
                os.fsync(data.fileno())
            crc, data_bytes = data_crc(data_path)
            st = data_path.stat()
            meta = {
                "format": SNAPSHOT_FORMAT,
                "key": key.parts,
                "data": data_path.name,
                "identity": _identity(st),
                "crc32": crc,
                "data_bytes": data_bytes,
                "saved_at": time.time(),  # wall clock: ages survive reboots
                **extra,
            }
            tmp = self.root / f".{data_path.name}.json"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(meta, out)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, self._meta_path(key))
            except FileExistsError:
                data_path.unlink()
                return None
            finally:
                tmp.unlink()
        except OSError as err:
            with contextlib.suppress(OSError):
                data_path.unlink()
            raise SnapshotError(f"could not store the snapshot: {err.strerror}") from None
        self.prune()
        return Snapshot(self._meta_path(key), data_path, meta)

    def prune(self, budget: int | None = None) -> list[str]:
        """Keep the newest snapshots within `budget` bytes on disk (default
        $CVMLAB_SNAPSHOT_MIB, 4096 MiB); forget the older ones, and data files no
        metadata names that are older than a save can take (a killed save's).
        Returns the names removed."""
        if budget is None:
            mib = os.environ.get("CVMLAB_SNAPSHOT_MIB", "")
            budget = (int(mib) if mib.isdigit() else DEFAULT_BUDGET_MIB) << 20
        entries: list[tuple[float, Path, Path, int]] = []
        for meta_path in self.root.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                meta = json.loads(meta_path.read_text())
                data = self.root / Path(str(meta["data"])).name
                entries.append(
                    (float(meta["saved_at"]), meta_path, data, data.stat().st_blocks * 512)
                )
        removed: list[str] = []
        used = 0
        for _, meta_path, data, size in sorted(entries, key=lambda e: e[0], reverse=True):
            used += size
            if used > budget:
                for path in (meta_path, data):
                    with contextlib.suppress(OSError):
                        path.unlink()
                        removed.append(path.name)
        named = {data.name for _, _, data, _ in entries}
        stale = time.time() - 2 * SAVE_TIMEOUT
        for data in self.root.glob("*.ram"):
            with contextlib.suppress(OSError):
                if data.name not in named and data.stat().st_mtime < stale:
                    data.unlink()
                    removed.append(data.name)
        return removed


# --- QMP sides of a save and a restore ---------------------------------------------------


def _capabilities(on: bool) -> dict[str, Any]:
    return {
        "capabilities": [
            {"capability": "mapped-ram", "state": on},
            {"capability": "events", "state": on},
        ]
    }


def _wait_migration(qmp: QmpSession, mark: int, timeout: float) -> None:
    """Wait for MIGRATION completed; a failure raises SnapshotError with QEMU's reason."""
    event = qmp.wait_event(
        "MIGRATION",
        predicate=lambda e: e.data.get("status") in ("completed", "failed", "cancelled"),
        after=mark,
        timeout=timeout,
    )
    status = event.data.get("status")
    if status != "completed":
        desc = ""
        with contextlib.suppress(QmpError):
            desc = str(qmp.execute("query-migrate").get("error-desc", ""))
        raise SnapshotError(f"QEMU's migration {status}: {desc or 'no reason given'}")


#: How long QEMU may take to leave `finish-migrate` after MIGRATION completed.
FINALIZE_TIMEOUT = 30.0
_FINALIZE_POLL_S = 0.01


def wait_finalized(qmp: QmpSession, timeout: float = FINALIZE_TIMEOUT) -> None:
    """Wait until QEMU has finalized a save's migration (left `finish-migrate`).

    QEMU sends MIGRATION `completed` from the migration thread and leaves the
    `finish-migrate` run state later, in its main loop; a `cont` in between fails with
    "Migration is not finalized yet" (seen under load in `make test`, the guest left
    paused). No event marks that transition, so the run state is polled, with a
    deadline. ResumeError when it does not happen.
    """
    deadline = time.monotonic() + timeout
    try:
        while qmp.execute("query-status").get("status") == "finish-migrate":
            if time.monotonic() > deadline:
                raise ResumeError(
                    f"QEMU stayed in finish-migrate {timeout:.0f} s after the snapshot's "
                    "migration completed; the guest is paused",
                    "see qmp.jsonl; a QEMU this slow to finalize is worth a bug report",
                )
            time.sleep(_FINALIZE_POLL_S)
    except QmpError as error:
        raise ResumeError(
            f"QEMU's state after the snapshot could not be read: {error}", "see qmp.jsonl"
        ) from None


def resume_after_save(qmp: QmpSession, timeout: float = FINALIZE_TIMEOUT) -> None:
    """`cont` the guest a save paused, once QEMU has finalized the migration
    (`wait_finalized`). ResumeError when the guest cannot be resumed."""
    wait_finalized(qmp, timeout)
    try:
        qmp.execute("cont")
    except QmpError as error:
        raise ResumeError(
            f"the guest could not be resumed after its snapshot: {error}", "see qmp.jsonl"
        ) from None


def save(
    qmp: QmpSession,
    cache: SnapshotCache,
    key: SnapshotKey,
    extra: dict[str, Any],
    *,
    resume: bool = True,
) -> Snapshot | None:
    """Save the running guest behind `qmp` as `key`'s snapshot.

    The guest is paused for the save (about a second). With `resume` it runs on
    afterwards; without, a saved guest stays paused (its QEMU is about to be stopped),
    and a failed save resumes it all the same, so the caller can go on with it.
    Returns the snapshot, None when another test saved the same key first; raises
    SnapshotError (nothing left behind) when the save fails, e.g. on a full disk, and
    ResumeError when the guest cannot run on (`resume_after_save`).
    """
    data_path = cache.new_data_path(key)
    try:
        qmp.execute("migrate-set-capabilities", _capabilities(True))
        qmp.execute("stop")
        saved = False
        try:
            mark = qmp.mark()
            qmp.execute("migrate", {"uri": f"file:{data_path}"})
            _wait_migration(qmp, mark, SAVE_TIMEOUT)
            saved = True
        finally:
            if resume or not saved:
                resume_after_save(qmp)
                qmp.execute("migrate-set-capabilities", _capabilities(False))
            else:
                wait_finalized(qmp)  # the file is complete once QEMU has finalized
    except BaseException:
        with contextlib.suppress(OSError):
            data_path.unlink()
        raise
    return cache.commit(key, data_path, extra)


def restore(qmp: QmpSession, snapshot: Snapshot, timeout: float = RESTORE_TIMEOUT) -> None:
    """Load `snapshot` into a QEMU started with INCOMING_ARGS, and run it."""
    qmp.execute("migrate-set-capabilities", _capabilities(True))
    qmp.execute("migrate-set-parameters", RESTORE_PARAMETERS)
    mark = qmp.mark()
    qmp.execute("migrate-incoming", {"uri": f"file:{snapshot.data_path}"})
    _wait_migration(qmp, mark, timeout)
    # The source was paused when it was saved, so the restored guest is too.
    qmp.execute("cont")
