"""The QMP session, the orphan-proof spawn and the Machine's launch and failure paths.

QMP tests run a QEMU with `-machine none` (no guest, milliseconds to start). The
orphan tests start a real guest in a child Python process and kill that process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.errors import GuestError, LaunchError, QemuError, QmpError, SpecError
from orchestrator.image import ImageManifest
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.qmp import QmpCommandError, QmpSession
from orchestrator.qemu.spawn import GUARD_PARENT_GONE, guarded_argv, spawn
from orchestrator.qemu.spec import KernelBoot, MachineSpec
from orchestrator.timeline import Timeline, now

PR_SET_CHILD_SUBREAPER = 36
PR_GET_PDEATHSIG = 2


# --- a bare QEMU for QMP ------------------------------------------------------------


@dataclasses.dataclass
class BareQemu:
    proc: subprocess.Popen[bytes]
    socket: Path

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def bare_qemu(qemu_binary: str) -> Iterator[BareQemu]:
    """QEMU with no machine at all: a QMP server and nothing else."""
    rundir = Path(tempfile.mkdtemp(prefix="cvmlab-test-"))
    socket = rundir / "qmp.sock"
    proc = spawn(
        [
            qemu_binary, "-machine", "none", "-nodefaults", "-display", "none",
            "-chardev", f"socket,id=qmp0,path={socket},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield BareQemu(proc, socket)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture
def qmp(bare_qemu: BareQemu, tmp_path: Path) -> Iterator[QmpSession]:
    session = QmpSession(tmp_path / "qmp.jsonl", Timeline(tmp_path / "timeline.jsonl"))
    session.connect(bare_qemu.socket, deadline=now() + 30, alive=bare_qemu.alive)
    try:
        yield session
    finally:
        session.close()


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_qmp_records_commands_replies_and_events_in_order(qmp: QmpSession, tmp_path: Path) -> None:
    qmp.execute("stop")
    qmp.execute("cont")
    records = _records(tmp_path / "qmp.jsonl")
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "greeting"
    commands = [r["msg"]["execute"] for r in records if r["kind"] == "command"]  # type: ignore[index]
    assert commands == ["qmp_capabilities", "stop", "cont"]
    events = [r["msg"]["event"] for r in records if r["kind"] == "event"]  # type: ignore[index]
    assert events == ["STOP", "RESUME"]
    stamps = [float(r["t"]) for r in records]  # type: ignore[arg-type]
    assert stamps == sorted(stamps)
    assert [e.seq for e in qmp.events()] == [0, 1]
    timeline_sources = {r["source"] for r in _records(tmp_path / "timeline.jsonl")}
    assert timeline_sources == {"qmp"}


def test_qmp_error_reply_becomes_qmp_error_with_qemu_class(qmp: QmpSession) -> None:
    with pytest.raises(QmpCommandError) as caught:
        qmp.execute("device_del", {"id": "no-such-device"})
    assert caught.value.error_class == "DeviceNotFound"
    assert "no-such-device" in caught.value.desc
    assert isinstance(caught.value, QmpError)


def test_wait_event_returns_an_event_that_came_before_the_wait(qmp: QmpSession) -> None:
    mark = qmp.mark()
    qmp.execute("stop")
    # A later round trip guarantees the STOP event was read before we wait.
    qmp.execute("query-status")
    assert [e.name for e in qmp.events("STOP")] == ["STOP"]
    event = qmp.wait_event("STOP", after=mark, timeout=5)
    assert event.seq >= mark


def test_wait_event_after_a_mark_ignores_older_events(qmp: QmpSession) -> None:
    qmp.execute("stop")
    qmp.execute("cont")
    mark = qmp.mark()
    qmp.execute("query-status")
    with pytest.raises(QmpError, match="did not come within"):
        qmp.wait_event("STOP", after=mark, timeout=0.2)


def test_wait_event_predicate_selects_the_matching_event(qmp: QmpSession) -> None:
    qmp.execute("stop")
    qmp.execute("cont")
    resumed = qmp.wait_event("RESUME", predicate=lambda e: e.seq == 1, timeout=5)
    assert resumed.name == "RESUME"


def test_human_monitor_answers_text(qmp: QmpSession) -> None:
    assert "VM status: running" in qmp.human_monitor("info status")


def test_close_after_quit_leaves_no_thread_behind(bare_qemu: BareQemu, tmp_path: Path) -> None:
    before = set(threading.enumerate())
    session = QmpSession(tmp_path / "qmp.jsonl")
    session.connect(bare_qemu.socket, deadline=now() + 30, alive=bare_qemu.alive)
    session.execute("quit")
    assert bare_qemu.proc.wait(10) == 0
    session.close()
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(QmpError, match="not connected"):
        session.execute("query-status")


def test_wait_event_fails_at_once_when_qemu_goes_away(qmp: QmpSession, bare_qemu: BareQemu) -> None:
    qmp.execute("quit")
    bare_qemu.proc.wait(10)
    started = now()
    with pytest.raises(QmpError, match="connection closed"):
        qmp.wait_event("NEVER", timeout=30)
    assert now() - started < 5


def test_connect_fails_fast_when_qemu_dies(qemu_binary: str, tmp_path: Path) -> None:
    socket = tmp_path / "qmp.sock"
    proc = spawn([qemu_binary, "-no-such-option"], stderr=subprocess.DEVNULL)
    session = QmpSession()
    started = now()
    with pytest.raises(LaunchError, match="QEMU exited"):
        session.connect(socket, deadline=now() + 30, alive=lambda: proc.poll() is None)
    assert now() - started < 5
    assert proc.wait(10) != 0


# --- the orphan-proof spawn -----------------------------------------------------------


def test_spawned_process_has_sigkill_as_parent_death_signal() -> None:
    code = (
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True); v = ctypes.c_int();"
        f"libc.prctl({PR_GET_PDEATHSIG}, ctypes.byref(v)); print(v.value)"
    )
    proc = spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    assert int(out) == signal.SIGKILL


def test_guard_refuses_to_start_when_the_spawner_is_already_gone() -> None:
    # Pid 1 is never our parent: this is what the child sees when its spawner died
    # between fork and prctl (it was reparented).
    result = subprocess.run(guarded_argv(["echo", "started"], parent_pid=1), capture_output=True)
    assert result.returncode == GUARD_PARENT_GONE
    assert result.stdout == b""


def test_guard_passes_arguments_verbatim() -> None:
    argv = ["printf", "%s|", "a b", "$HOME", "'quoted'"]
    result = subprocess.run(guarded_argv(argv, parent_pid=os.getpid()), capture_output=True)
    assert result.stdout == b"a b|$HOME|'quoted'|"


# --- the Machine: pre-flight and launch failures -------------------------------------


def _spec(image: ImageManifest, **changes: object) -> MachineSpec:
    spec = MachineSpec(
        boot=KernelBoot(kernel=str(image.kernel), initrd=str(image.initrd), cmdline=image.cmdline)
    )
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def test_missing_kernel_is_one_error_before_launch(evidence_dir: Path) -> None:
    spec = MachineSpec(boot=KernelBoot(kernel=str(evidence_dir / "no-vmlinuz")))
    machine = Machine(spec, evidence_dir)
    with pytest.raises(SpecError) as caught:
        machine.start()
    assert "no-vmlinuz does not exist" in str(caught.value)
    assert "cvmlab image build" in caught.value.fix
    assert machine.rundir is None and not machine.running
    assert list(evidence_dir.iterdir()) == []


def test_missing_qemu_binary_names_the_setup_script(
    guest_image: ImageManifest, evidence_dir: Path
) -> None:
    machine = Machine(_spec(guest_image), evidence_dir, binary="qemu-system-none-such")
    with pytest.raises(QemuError, match="not found") as caught:
        machine.start()
    assert "ci/setup-host.sh" in caught.value.fix


def test_bad_cpu_model_is_launch_error_with_qemu_stderr(
    guest_image: ImageManifest, evidence_dir: Path
) -> None:
    machine = Machine(_spec(guest_image, cpu="no-such-cpu"), evidence_dir)
    with pytest.raises(LaunchError) as caught:
        machine.start()
    message = str(caught.value)
    assert "\n" not in message
    assert "no-such-cpu" in message
    assert "unable to find CPU model" in caught.value.detail
    assert machine.returncode not in (None, 0)
    assert not machine.running and not Path(f"/proc/{machine.pid}").exists()
    assert machine.rundir is None  # QMP over a socket pair: no run directory at all
    # The evidence explains it: the exact command and QEMU's words.
    assert json.loads((evidence_dir / "argv.json").read_text())[0] == "qemu-system-x86_64"
    assert "no-such-cpu" in (evidence_dir / "qemu.stderr").read_text()


@pytest.mark.vm
def test_a_guest_that_never_gets_ready_leaves_its_registers_in_the_timeline(
    guest_image: ImageManifest, evidence_dir: Path
) -> None:
    timeline = Timeline(evidence_dir / "timeline.jsonl")
    # A marker the guest never prints: the wait ends at its deadline with QEMU alive.
    machine = Machine(_spec(guest_image), evidence_dir, ready_marker="CVMLAB-NEVER-PRINTED",
                      timeline=timeline)  # fmt: skip
    with machine:
        machine.start()
        with pytest.raises(GuestError, match="did not appear on the console"):
            machine.wait_ready(timeout=2)
    stuck = [r for r in _records(evidence_dir / "timeline.jsonl") if r.get("kind") == "stuck"]
    assert len(stuck) == 1, stuck
    assert isinstance(stuck[0]["status"], dict) and "status" in stuck[0]["status"]
    assert "RIP=" in str(stuck[0]["registers"]) and "CR3=" in str(stuck[0]["registers"])


# --- no orphans ---------------------------------------------------------------------------

_CHILD = """
import json, sys
from pathlib import Path
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.spec import KernelBoot, MachineSpec

kernel, initrd, cmdline, evidence, how = sys.argv[1:6]
machine = Machine(MachineSpec(boot=KernelBoot(kernel, initrd, cmdline)), Path(evidence))
machine.start()
print(json.dumps({"pid": machine.pid, "rundir": str(machine.rundir)}), flush=True)
if how == "wait":
    sys.stdin.read()      # until the test kills us
# how == "exit": leave without shutting down; the atexit hook must clean up
"""


def _run_child(
    image: ImageManifest, evidence: Path, how: str
) -> tuple[subprocess.Popen[str], dict[str, object]]:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(image.kernel), str(image.initrd), image.cmdline,
         str(evidence), how],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, "the child did not start its machine"
    return child, json.loads(line)


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    readable, _, _ = select.select([pidfd], [], [], timeout)
    return bool(readable)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this process the reaper of orphans for the test, so it can collect QEMU's
    exit status (this host's PID 1 does not reap orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.mark.vm
def test_qemu_dies_when_the_python_that_started_it_is_sigkilled(
    guest_image: ImageManifest, evidence_dir: Path, subreaper: None
) -> None:
    child, info = _run_child(guest_image, evidence_dir, "wait")
    qemu_pid = int(info["pid"])  # type: ignore[call-overload]
    pidfd = os.pidfd_open(qemu_pid)
    try:
        assert not _wait_pidfd(pidfd, 0), "QEMU should be running before the kill"
        child.kill()
        assert child.wait(10) == -signal.SIGKILL
        assert _wait_pidfd(pidfd, 10), "QEMU outlived the Python that started it"
    finally:
        os.close(pidfd)
    # Orphaned QEMU was reparented to us (the subreaper): reap it and read why it died.
    _, status = os.waitpid(qemu_pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not Path(f"/proc/{qemu_pid}").exists()
    assert not Path(str(info["rundir"])).exists()


@pytest.mark.vm
def test_machine_left_running_at_exit_is_killed_by_the_atexit_hook(
    guest_image: ImageManifest, evidence_dir: Path
) -> None:
    child, info = _run_child(guest_image, evidence_dir, "exit")
    qemu_pid = int(info["pid"])  # type: ignore[call-overload]
    # The child reaps QEMU itself (atexit kill + wait) before it exits.
    assert child.wait(30) == 0
    assert not Path(f"/proc/{qemu_pid}").exists()
    assert not Path(str(info["rundir"])).exists()


@pytest.mark.vm
def test_machine_started_in_a_short_lived_thread_outlives_the_thread(
    guest_image: ImageManifest, evidence_dir: Path
) -> None:
    # avocado runs tests in worker threads: the parent-death signal must not fire
    # when the thread that called start() ends.
    machine = Machine(_spec(guest_image), evidence_dir)
    starter = threading.Thread(target=machine.start)
    starter.start()
    starter.join()
    # join() returns before the OS thread is gone; the death signal would fire then.
    task = Path(f"/proc/self/task/{starter.native_id}")
    deadline = now() + 10
    while task.exists() and now() < deadline:
        threading.Event().wait(0.01)
    assert not task.exists()
    try:
        assert machine.running
        assert machine.qmp.execute("query-status")["status"] == "running"
    finally:
        rung = machine.shutdown()
    assert rung == "quit"  # not ready yet, so no powerdown rung
    assert not Path(f"/proc/{machine.pid}").exists()


@pytest.mark.vm
def test_qmp_socket_directory_stays_short_under_a_long_tmpdir(
    guest_image: ImageManifest, evidence_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # avocado's per-test directories are far longer than AF_UNIX's 108 bytes; only the
    # human monitor has a socket path at all.
    long_tmp = evidence_dir / ("x" * 100)
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    with Machine(_spec(guest_image), evidence_dir, human_qmp=True) as machine:
        machine.start()
        human = machine.human_qmp_socket
        assert human is not None and len(str(human)) < 108 and human.is_socket()
        assert machine.qmp.connected


@pytest.mark.vm
def test_qmp_runs_over_an_inherited_socket_pair_without_a_socket_file(
    guest_image: ImageManifest, evidence_dir: Path
) -> None:
    # No socket path to poll for: QEMU gets a connected fd and greets on it.
    with Machine(_spec(guest_image), evidence_dir) as machine:
        machine.start()
        argv = json.loads((evidence_dir / "argv.json").read_text())
        chardev = argv[argv.index("-mon") - 1]
        assert re.fullmatch(r"socket,id=qmp0,fd=\d+", chardev), chardev
        assert machine.rundir is None
        assert machine.qmp.execute("query-status")["status"] == "running"
        kinds = [r["kind"] for r in _records(evidence_dir / "qmp.jsonl")]
        assert kinds[:2] == ["greeting", "command"]  # still recorded in qmp.jsonl
    # run.sh stays runnable by hand: it names a socket path, not an fd.
    assert "fd=" not in (evidence_dir / "run.sh").read_text()


@pytest.mark.vm
def test_qemu_can_run_through_an_argv_prefix(
    guest_image: ImageManifest, evidence_dir: Path
) -> None:
    # A prefix is how a private QEMU build runs through its own loader.
    prefix = ["env", "qemu-system-x86_64"]
    with Machine(_spec(guest_image), evidence_dir, binary=prefix) as machine:
        machine.start()
        assert Path(f"/proc/{machine.pid}/exe").resolve().name == "qemu-system-x86_64"
    assert json.loads((evidence_dir / "argv.json").read_text())[:2] == prefix
    run_sh = (evidence_dir / "run.sh").read_text()
    assert re.search(r"exec 'env'\s+\\?\s*'qemu-system-x86_64'", run_sh)
