"""Warm start: the snapshot key, the cache's refusals, and real save/restore cycles.

The pure tests build committed snapshots from small sparse files (what QEMU's
mapped-ram format looks like to the cache: a sparse data file plus our metadata)
and feed the cache each bug it must catch: a truncated or damaged data file, a
snapshot of another QEMU, a cache directory open to others, two tests committing
the same key. The `vm` tests boot real guests under QEMU: cold + save, restores,
a snapshot QEMU rejects, and a save onto a full file system.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.errors import QmpError
from orchestrator.image import ImageManifest
from orchestrator.memory.backing import BackingProbe
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.snapshot import (
    ResumeError,
    SnapshotCache,
    SnapshotError,
    SnapshotKey,
    cache_dir,
    cold_only_reason,
    data_crc,
    private_dir,
    resume_after_save,
    snapshot_key,
)
from orchestrator.qemu.spec import KernelBoot, MachineSpec, MemfdBackend, SnpGuest
from orchestrator.qemu.warm import finish_start, start_guest

BINARY = ["qemu-system-x86_64"]
HASHES = {"vmlinuz": "aa" * 32, "initrd.img": "bb" * 32}


def _spec(**changes: object) -> MachineSpec:
    spec = MachineSpec(boot=KernelBoot(kernel="/img/vmlinuz", initrd="/img/initrd.img"))
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


# --- the key -----------------------------------------------------------------------------


def test_key_changes_with_image_spec_qemu_and_accelerator() -> None:
    base = snapshot_key(_spec(), BINARY, "10.0.2", HASHES)
    assert snapshot_key(_spec(), BINARY, "10.0.2", dict(HASHES)).digest == base.digest
    changed = [
        snapshot_key(_spec(), BINARY, "10.0.2", {**HASHES, "initrd.img": "cc" * 32}),
        snapshot_key(_spec(memory=1 << 30), BINARY, "10.0.2", HASHES),
        snapshot_key(_spec(), BINARY, "10.1.0", HASHES),
        snapshot_key(_spec(), ["/opt/qemu/bin/qemu-system-x86_64"], "10.0.2", HASHES),
        snapshot_key(_spec(accel="kvm"), BINARY, "10.0.2", HASHES),
    ]
    digests = {k.digest for k in changed}
    assert base.digest not in digests and len(digests) == len(changed)


def test_key_ignores_run_time_plumbing() -> None:
    # The trace file path and the QMP fd differ per test; the guest's state does not.
    key = snapshot_key(_spec(trace_events=("ram_block_discard_range",)), BINARY, "10.0.2", HASHES)
    argv = key.parts["argv"]
    assert "/trace" in argv and "vmgenid,id=vmgenid0,guid=auto" in argv
    assert not any("fd=" in a for a in argv)


def test_confidential_guests_and_old_qemu_cannot_be_snapshotted() -> None:
    snp = _spec(confidential=SnpGuest(cbitpos=51, reduced_phys_bits=1))
    reason = cold_only_reason(snp, (10, 0, 2))
    assert reason is not None and "cannot be migrated" in reason
    old = cold_only_reason(_spec(), (8, 2, 0))
    assert old is not None and "mapped-ram" in old
    assert cold_only_reason(_spec(), (10, 0, 2)) is None


def test_cache_dir_follows_cvmlab_cache_then_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVMLAB_CACHE", "/lab/cache")
    assert cache_dir() == Path("/lab/cache/snapshots")
    monkeypatch.delenv("CVMLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cache_dir() == Path("/xdg/cvmlab/snapshots")


# --- the cache's refusals --------------------------------------------------------------------


KEY = snapshot_key(_spec(), BINARY, "10.0.2", HASHES)


def _committed(cache: SnapshotCache, key: SnapshotKey = KEY) -> Path:
    """A committed snapshot whose data is sparse: a page of data, a hole, a page."""
    data = cache.new_data_path(key)
    with open(data, "r+b") as out:
        out.write(b"QEVM" + bytes(range(256)) * 16)
        out.seek(1 << 20)
        out.write(b"\x5a" * 4096)
    snapshot = cache.commit(key, data, {})
    assert snapshot is not None
    return snapshot.data_path


def test_an_untouched_snapshot_is_found(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "snapshots")
    data = _committed(cache)
    found = cache.lookup(KEY)
    assert found is not None and found.data_path == data
    assert found.meta["data_bytes"] == 3 * 4096  # only the data extents (sparse)
    assert os.stat(data).st_mode & 0o777 == 0o600
    assert os.stat(cache.root).st_mode & 0o777 == 0o700


def test_missing_snapshot_is_none(tmp_path: Path) -> None:
    assert SnapshotCache(tmp_path / "snapshots").lookup(KEY) is None


def test_truncated_snapshot_is_refused_and_forgotten(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "snapshots")
    data = _committed(cache)
    os.truncate(data, 4096)
    with pytest.raises(SnapshotError, match="truncated"):
        cache.lookup(KEY)
    assert not data.exists() and cache.lookup(KEY) is None


def test_damaged_snapshot_is_refused_by_its_crc(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "snapshots")
    data = _committed(cache)
    with open(data, "r+b") as out:
        out.seek(1 << 20)
        out.write(b"\xa5")
    with pytest.raises(SnapshotError, match="damaged"):
        cache.lookup(KEY)
    assert not data.exists()


def test_rewritten_with_the_same_bytes_is_still_accepted(tmp_path: Path) -> None:
    # ctime moved, so the cache reads the data: same CRC, same snapshot.
    cache = SnapshotCache(tmp_path / "snapshots")
    data = _committed(cache)
    with open(data, "r+b") as out:
        out.write(b"QEVM")
    assert cache.lookup(KEY) is not None


def test_snapshot_of_another_qemu_is_refused(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "snapshots")
    other = snapshot_key(_spec(), BINARY, "11.1.3", HASHES)
    _committed(cache, other)
    # Someone copied 11.1's snapshot under 10.0's name.
    os.replace(cache.root / f"{other.digest}.json", cache.root / f"{KEY.digest}.json")
    with pytest.raises(SnapshotError, match=r"another machine, image or QEMU \(its QEMU: 11.1.3\)"):
        cache.lookup(KEY)


def test_damaged_metadata_is_refused(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "snapshots")
    _committed(cache)
    (cache.root / f"{KEY.digest}.json").write_text("{not json")
    with pytest.raises(SnapshotError, match=r"metadata .* is damaged"):
        cache.lookup(KEY)


def test_cache_dir_open_to_others_is_refused_not_fixed(tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    with pytest.raises(SnapshotError, match="open to others") as caught:
        SnapshotCache(root).lookup(KEY)
    assert caught.value.fix == f"chmod 0700 {root}"
    assert "\n" not in str(caught.value)
    assert os.stat(root).st_mode & 0o777 == 0o755
    with pytest.raises(SnapshotError):
        private_dir(root)


def test_a_data_file_open_to_others_is_refused(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "snapshots")
    data = _committed(cache)
    data.chmod(0o644)
    with pytest.raises(SnapshotError, match="open to others"):
        cache.lookup(KEY)


def test_second_commit_of_a_key_loses_and_leaves_nothing(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "snapshots")
    first = _committed(cache)
    late = cache.new_data_path(KEY)
    late.write_bytes(b"x" * 4096)
    assert cache.commit(KEY, late, {}) is None
    assert not late.exists()
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(
        [first.name, f"{KEY.digest}.json"]
    )


def test_data_crc_covers_offsets_not_only_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for path, offset in ((a, 0), (b, 1 << 20)):
        with open(path, "wb") as out:
            out.truncate(2 << 20)
            out.seek(offset)
            out.write(b"\x11" * 4096)
    assert data_crc(a)[0] != data_crc(b)[0]
    assert data_crc(a)[1] == data_crc(b)[1] == 4096


# --- real guests ------------------------------------------------------------------------------


def _real_spec(image: ImageManifest) -> MachineSpec:
    # memfd: its backing shows what a save populates (anon's zero pages it does not).
    boot = KernelBoot(kernel=str(image.kernel), initrd=str(image.initrd), cmdline=image.cmdline)
    return MachineSpec(boot=boot, accel="tcg", backend=MemfdBackend(share=True))


def _start(image: ImageManifest, evidence: Path, cache: SnapshotCache) -> tuple[Machine, object]:
    evidence.mkdir(parents=True, exist_ok=True)
    return start_guest(
        _real_spec(image), evidence, binary=BINARY, qemu_version=(10, 0, 2),
        image_hashes=image.outputs, ready_marker=image.ready_marker, cache=cache,
    )  # fmt: skip


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Machine]]:
    """Every Machine start_guest creates, to prove none is left running."""
    made: list[Machine] = []
    real_init = Machine.__init__

    def init(self: Machine, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(Machine, "__init__", init)
    yield made
    for machine in made:
        assert not machine.running


@pytest.mark.vm
def test_cold_then_warm_restores_a_working_reseeded_guest(
    guest_image: ImageManifest, tmp_path: Path, spawned: list[Machine]
) -> None:
    cache = SnapshotCache(tmp_path / "snapshots")
    uuids = []
    held = []
    for n in range(3):
        machine, record = _start(guest_image, tmp_path / f"run{n}", cache)
        with machine:
            shell = machine.ssh(guest_image.ssh_user, guest_image.ssh_key, guest_image.host_key)
            # The default image's guest sets its own clock (restored_clock rtc); the third
            # start sets it the way an image without that has it set, over SSH.
            restored_clock = "ssh" if n == 2 else guest_image.restored_clock
            ran = finish_start(machine, shell, record, restored_clock)  # type: ignore[arg-type]
            before = time.time()
            guest_time = int(shell.run(["date", "+%s"]).stdout.strip())
            # `date -s` sets the host's second; the RTC lags the host by up to 2 s (QEMU
            # starts it at a whole second), as the clock of every cold boot does.
            slack = 2 if n == 2 else 3
            assert before - slack <= guest_time <= time.time() + 1, (n, before, guest_time)
            uuids.append(shell.run(["cat", "/proc/sys/kernel/random/uuid"]).stdout.strip())
            held.append(BackingProbe(machine.qmp, machine.pid, "ram0").held())
            info = record.to_json()  # type: ignore[attr-defined]
            # Every start is a restore, the first too: it saved the snapshot from a cold
            # boot, stopped that QEMU and restored what it saved.
            assert info["mode"] == "warm", info
            assert machine.ready_by == "snapshot"
            if n == 0:
                assert (
                    info["saved"].endswith(".ram") and "which it had just saved" in info["reason"]
                )
                saving = info["notes"]["saving_boot"]
                assert saving["reason"] == "no snapshot of this machine yet"
                kept = tmp_path / "run0" / saving["evidence"]
                assert guest_image.ready_marker in (kept / "serial.log").read_text()
                assert "-incoming" not in json.loads((kept / "argv.json").read_text())
            else:
                assert info["saved"] is None
            if n == 1:
                assert not ran and "from its RTC" in info["notes"]["clock"]
            elif n == 2:
                assert ran and "behind; set to the host's" in info["notes"]["clock"]
            assert "-incoming" in json.loads((tmp_path / f"run{n}/argv.json").read_text())
            # No self-announce rounds after a restore (RESTORE_PARAMETERS).
            params = machine.qmp.execute("query-migrate-parameters")
            assert params["announce-rounds"] == 0
    # The saving test's backing is a restore's, not the save's (which read all 512 MiB
    # of RAM into the memfd): held within 1.5x of a plain restore's.
    assert held[0] <= 1.5 * held[1] + (8 << 20), [h >> 20 for h in held]
    # The restores started from one RNG state; vmgenid made them diverge.
    assert uuids[1] != uuids[2]

    # A snapshot QEMU rejects (damaged when it was saved: our identity and CRC agree
    # with it): one reason line, the restoring QEMU stopped, a cold boot instead.
    found = cache.lookup(snapshot_key(_real_spec(guest_image), BINARY, "10.0.2",
                                      guest_image.outputs))  # fmt: skip
    assert found is not None
    with open(found.data_path, "r+b") as out:
        out.write(b"NOT A QEMU STREAM")
    meta = json.loads(found.meta_path.read_text())
    st = found.data_path.stat()
    meta["identity"] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    meta["crc32"] = data_crc(found.data_path)[0]
    found.meta_path.write_text(json.dumps(meta))
    before = len(spawned)
    machine, record = _start(guest_image, tmp_path / "damaged", cache)
    with machine:
        info = record.to_json()  # type: ignore[attr-defined]
        reason = info["notes"]["saving_boot"]["reason"]  # the cold boot that saved anew
        assert reason.startswith("snapshot restore failed: QEMU's migration failed")
        assert "\n" not in reason
        assert spawned[before].incoming and not spawned[before].running
        assert not spawned[before + 1].incoming and not spawned[before + 1].running
        assert info["mode"] == "warm" and info["saved"].endswith(".ram")  # a good one


@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root")
def test_a_full_disk_while_saving_boots_cold_and_leaves_nothing(
    guest_image: ImageManifest, tmp_path: Path, spawned: list[Machine]
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(small)],
                   check=True)  # fmt: skip
    try:
        cache = SnapshotCache(small / "snapshots")
        machine, record = _start(guest_image, tmp_path / "run", cache)
        with machine:
            info = record.to_json()  # type: ignore[attr-defined]
            assert info["mode"] == "cold"
            assert info["saved"].startswith("not saved: QEMU's migration failed")
            # The guest runs on after the failed save.
            shell = machine.ssh(guest_image.ssh_user, guest_image.ssh_key, guest_image.host_key)
            assert shell.run("true").exit_status == 0
        assert list(cache.root.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.vm
def test_a_save_that_lost_the_race_restores_the_other_tests_snapshot(
    guest_image: ImageManifest, tmp_path: Path, spawned: list[Machine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Another test committed the key first: this test's cold guest (left paused by its
    save) is stopped, and the test goes on with a restore of the committed snapshot."""
    from orchestrator.qemu.snapshot import save as real_save

    def lost_the_race(qmp, cache, key, extra, **kwargs):  # type: ignore[no-untyped-def]
        real_save(qmp, cache, key, extra, **kwargs)
        return None  # as cache.commit says when the key was committed first

    monkeypatch.setattr("orchestrator.qemu.warm.save", lost_the_race)
    machine, record = _start(guest_image, tmp_path / "run", SnapshotCache(tmp_path / "s"))
    with machine:
        info = record.to_json()  # type: ignore[attr-defined]
        assert info["mode"] == "warm" and info["saved"] == "not saved: another test did"
        assert "which another test saved first" in info["reason"]
        shell = machine.ssh(guest_image.ssh_user, guest_image.ssh_key, guest_image.host_key)
        assert shell.run("true").exit_status == 0
    assert [m.incoming for m in spawned] == [False, True]


@pytest.mark.vm
def test_a_save_that_finds_another_tests_snapshot_gone_runs_on_cold(
    guest_image: ImageManifest, tmp_path: Path, spawned: list[Machine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Another test committed the key first, and its snapshot is gone by the time this
    one looks: the guest this test saved (left paused) is resumed and used cold."""
    from orchestrator.qemu.snapshot import save as real_save

    def lost_the_race(qmp, cache, key, extra, **kwargs):  # type: ignore[no-untyped-def]
        real_save(qmp, cache, key, extra, **kwargs)
        cache.discard(key)
        return None

    monkeypatch.setattr("orchestrator.qemu.warm.save", lost_the_race)
    machine, record = _start(guest_image, tmp_path / "run", SnapshotCache(tmp_path / "s"))
    with machine:
        info = record.to_json()  # type: ignore[attr-defined]
        assert info["mode"] == "cold" and info["saved"] == "not saved: another test did"
        shell = machine.ssh(guest_image.ssh_user, guest_image.ssh_key, guest_image.host_key)
        assert shell.run("true").exit_status == 0
    assert len(spawned) == 1


# --- resuming the guest after a save ---------------------------------------------------------


class _RunStates:
    """What QEMU answers while it finalizes a migration: `query-status` gives each of
    `states` in turn, then `cont` succeeds or fails as QEMU's qmp_cont does. The window
    between MIGRATION `completed` and the end of finish-migrate cannot be held open on a
    real QEMU, so its answers are replayed (text from QEMU's monitor/qmp-cmds.c)."""

    def __init__(self, states: list[str], cont_error: str | None = None) -> None:
        self.states = states
        self.cont_error = cont_error
        self.calls: list[str] = []

    def execute(self, command: str, arguments: object = None, timeout: float = 10) -> object:
        self.calls.append(command)
        if command == "query-status":
            return {"status": self.states.pop(0) if len(self.states) > 1 else self.states[0]}
        if command == "cont" and self.cont_error:
            raise QmpError(f"QMP cont failed: GenericError: {self.cont_error}")
        return {}


def test_resume_waits_until_qemu_has_finalized_the_migration() -> None:
    qmp = _RunStates(["finish-migrate", "finish-migrate", "postmigrate"])
    resume_after_save(qmp)  # type: ignore[arg-type]
    assert qmp.calls == ["query-status"] * 3 + ["cont"]


def test_a_cont_qemu_refuses_is_a_resume_error() -> None:
    qmp = _RunStates(["postmigrate"], cont_error="Resetting the Virtual Machine is required")
    with pytest.raises(ResumeError, match="could not be resumed after its snapshot"):
        resume_after_save(qmp)  # type: ignore[arg-type]


def test_qemu_stuck_in_finish_migrate_is_a_resume_error_at_the_deadline() -> None:
    qmp = _RunStates(["finish-migrate"])
    with pytest.raises(ResumeError, match="stayed in finish-migrate"):
        resume_after_save(qmp, timeout=0.05)  # type: ignore[arg-type]
    assert "cont" not in qmp.calls


@pytest.mark.vm
def test_a_guest_that_cannot_be_resumed_after_its_save_errors_and_is_stopped(
    guest_image: ImageManifest, tmp_path: Path, spawned: list[Machine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Before the fix the paused guest was kept and the test waited 60 s for SSH."""

    def save_then_stay_paused(qmp, *_args, **_kwargs):  # type: ignore[no-untyped-def]
        qmp.execute("stop")
        raise ResumeError("the guest could not be resumed after its snapshot: test", "")

    monkeypatch.setattr("orchestrator.qemu.warm.save", save_then_stay_paused)
    with pytest.raises(ResumeError):
        _start(guest_image, tmp_path / "run", SnapshotCache(tmp_path / "snapshots"))
    assert len(spawned) == 1  # the fixture asserts it is not running


# --- the evidence: report and repro know the start ------------------------------------------


def test_report_page_shows_cold_or_warm(tmp_path: Path) -> None:
    from orchestrator.report.html import _start_cell

    assert "not recorded" in _start_cell(tmp_path)
    (tmp_path / "start.json").write_text(
        json.dumps({"mode": "warm", "reason": "restored snapshot k.ram", "seconds": 0.41})
    )
    cell = _start_cell(tmp_path)
    assert '<span id="start">warm</span>' in cell and "restored snapshot k.ram" in cell
    assert "0.41 s" in cell


def test_repro_of_a_warm_test_restores_or_boots_cold_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.repro.replay import warm_start_of, without_incoming

    monkeypatch.setenv("CVMLAB_CACHE", str(tmp_path / "cache"))
    argv = ["qemu", "-name", "x", "-device", "vmgenid,id=vmgenid0,guid=auto", "-incoming", "defer"]
    assert without_incoming(argv) == argv[:-2]
    evidence = tmp_path / "data"
    evidence.mkdir()
    assert warm_start_of(evidence, argv) == (None, None)  # no start.json: an older bundle
    cache = SnapshotCache()
    data = _committed(cache)
    start = {"mode": "warm", "reason": "restored", "key": KEY.digest}
    (evidence / "start.json").write_text(json.dumps(start))
    snapshot, record = warm_start_of(evidence, argv)
    assert snapshot is not None and snapshot.data_path == data and record is not None
    data.unlink()
    snapshot, record = warm_start_of(evidence, argv)
    assert snapshot is None and record is not None
    assert record.reason.startswith("the snapshot was refused: snapshot data")
    (evidence / "start.json").write_text(json.dumps({**start, "mode": "cold"}))
    snapshot, record = warm_start_of(evidence, without_incoming(argv))
    assert snapshot is None and record is not None and record.mode == "cold"


def test_prune_keeps_the_newest_within_the_budget_and_drops_killed_saves(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "snapshots")
    keys = [snapshot_key(_spec(memory=(n + 1) << 30), BINARY, "10.0.2", HASHES) for n in range(3)]
    datas = [_committed(cache, key) for key in keys]  # 12 KiB of data each, newest last
    orphan = cache.new_data_path(keys[0])  # a save killed before its commit
    os.utime(orphan, (0, 0))
    fresh = cache.new_data_path(keys[1])  # a save in progress right now
    removed = cache.prune(budget=2 * 12 * 1024)
    assert set(removed) == {datas[0].name, f"{keys[0].digest}.json", orphan.name}
    assert cache.lookup(keys[0]) is None
    assert cache.lookup(keys[1]) is not None and cache.lookup(keys[2]) is not None
    assert fresh.exists()
