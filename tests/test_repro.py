"""Reproducer bundles and `cvmlab repro`.

Pure tests: step extraction on synthetic qmp.jsonl/timeline.jsonl records, bundle
round trip, refusals (changed image file, not a result dir, half-written jobs, a
cut-off file). VM tests (marked `vm`): one real avocado job with a passing and a
failing scenario writes the evidence once; then `cvmlab repro` relaunches the
failure, replays to the step before it, and the guest answers over SSH and QMP
(qmp-shell) until SIGTERM, which leaves no QEMU behind.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from report_jobs import run_killed_job

from orchestrator.cli import main
from orchestrator.errors import ImageError
from orchestrator.guest.ssh import GuestShell
from orchestrator.image import ImageManifest, load_manifest
from orchestrator.image.pvh import kernel_entry
from orchestrator.qemu.argv import Plumbing, build_argv
from orchestrator.qemu.spec import KernelBoot, MachineSpec
from orchestrator.repro import (
    BUNDLE_NAME,
    ReproError,
    extract_steps,
    load_repro_bundle,
    reproduce,
    write_repro_bundle,
)
from orchestrator.repro.cli import list_lines
from orchestrator.repro.replay import known_hosts_line, replug
from orchestrator.repro.steps import Step, parse_jsonl
from orchestrator.timeline import now

AVOCADO = str(Path(sys.executable).with_name("avocado"))
DEADLINE_S = 180.0

# --- synthetic records, shaped as QmpSession and GuestShell write them ---------------


def qmp_cmd(t: float, execute: str, qid: str | None, **arguments: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"execute": execute}
    if arguments:
        msg["arguments"] = arguments
    if qid is not None:
        msg["id"] = qid
    return {"t": t, "dir": "send", "kind": "command", "msg": msg}


def qmp_reply(t: float, qid: str | None, error: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = (
        {"error": {"class": error, "desc": "no such thing"}} if error else {"return": {}}
    )
    if qid is not None:
        msg["id"] = qid
    return {"t": t, "dir": "recv", "kind": "reply", "msg": msg}


def qmp_event(t: float, name: str) -> dict[str, Any]:
    return {"t": t, "dir": "recv", "kind": "event", "seq": 0, "msg": {"event": name}}


def ssh_run(t: float, cmd: str, status: int) -> list[dict[str, Any]]:
    return [
        {"t": t, "source": "ssh", "kind": "command", "cmd": cmd},
        {"t": t + 0.05, "source": "ssh", "kind": "result", "cmd": cmd, "exit_status": status,
         "seconds": 0.05, "stdout": "", "stderr": ""},
    ]  # fmt: skip


def machine(t: float, kind: str, **data: Any) -> dict[str, Any]:
    return {"t": t, "source": "machine", "kind": kind, **data}


# A test: launch (handshake, info usernet), ready at 10, its own steps 11..15, a
# failed verdict at 15.5, tearDown from 16 (dmesg, then the shutdown ladder).
QMP = [
    {"t": 1.0, "dir": "recv", "kind": "greeting", "msg": {"QMP": {}}},
    qmp_cmd(1.1, "qmp_capabilities", None, enable=["oob"]),
    qmp_reply(1.2, None),
    qmp_cmd(1.3, "human-monitor-command", "q0", **{"command-line": "info usernet"}),
    qmp_reply(1.4, "q0"),
    qmp_cmd(12.0, "balloon", "q1", value=268435456),
    qmp_reply(12.1, "q1"),
    qmp_event(12.5, "BALLOON_CHANGE"),
    qmp_cmd(14.0, "qom-get", "q2", path="/objects/nothing", property="size"),
    qmp_reply(14.1, "q2", error="DeviceNotFound"),
    qmp_cmd(16.5, "system_powerdown", "q3"),
    qmp_reply(16.6, "q3"),
    {"t": 16.6, "dir": "note", "kind": "shutdown-rung", "rung": "powerdown", "mark": 1},
]
TIMELINE = [
    machine(1.0, "launch", argv=[]),
    machine(1.5, "ssh-port", port=2222),
    machine(10.0, "ready", seconds=9.0),
    *ssh_run(11.0, "echo 1 > /tmp/x", 0),
    *ssh_run(13.0, "grep MemTotal /proc/meminfo", 0),
    *ssh_run(15.0, "test -e /tmp/y", 1),
    {"t": 15.5, "source": "verdict", "kind": "fail", "invariant": "G4"},
    *ssh_run(16.0, "dmesg", 0),
    machine(16.7, "shutdown", rung="powerdown", seconds=0.2),
]


def test_steps_are_the_tests_own_actions_in_time_order_numbered_from_one() -> None:
    found = extract_steps(QMP, TIMELINE, end=15.9)
    assert [(s.n, s.kind, s.describe()) for s in found.steps] == [
        (1, "ssh", "ssh echo 1 > /tmp/x"),
        (2, "qmp", 'qmp balloon {"value": 268435456}'),
        (3, "ssh", "ssh grep MemTotal /proc/meminfo"),
        (4, "qmp", 'qmp qom-get {"path": "/objects/nothing", "property": "size"}'),
        (5, "ssh", "ssh test -e /tmp/y"),
    ]


def test_handshake_and_launcher_queries_before_ready_are_not_steps() -> None:
    found = extract_steps(QMP, TIMELINE, end=15.9)
    commands = [s.action.get("execute") for s in found.steps if s.kind == "qmp"]
    assert "qmp_capabilities" not in commands
    assert "human-monitor-command" not in commands
    assert found.ready == 10.0


def test_a_cold_starts_snapshot_save_after_ready_is_not_a_step() -> None:
    # The first test of a machine boots cold, then saves its snapshot (after ready).
    save = [
        qmp_cmd(10.1, "migrate-set-capabilities", "s0", capabilities=[]),
        qmp_reply(10.11, "s0"),
        qmp_cmd(10.2, "stop", "s1"),
        qmp_reply(10.21, "s1"),
        qmp_cmd(10.3, "migrate", "s2", uri="file:/cache/x.ram"),
        qmp_reply(10.31, "s2"),
        qmp_cmd(10.8, "cont", "s3"),
        qmp_reply(10.81, "s3"),
    ]
    qmp = sorted([*QMP, *save], key=lambda r: r["t"])
    timeline = sorted([*TIMELINE, {"t": 10.9, "source": "start", "kind": "snapshot-save",
                                   "saved": "/cache/x.ram", "seconds": 0.8}],
                      key=lambda r: r["t"])  # fmt: skip
    found = extract_steps(qmp, timeline, end=15.9)
    assert [s.describe() for s in found.steps] == [
        s.describe() for s in extract_steps(QMP, TIMELINE, end=15.9).steps
    ]
    assert found.ready == 10.0


def test_machines_a_start_stopped_before_the_tests_own_do_not_end_its_steps() -> None:
    # The first test of a machine: a cold boot (ready at 4) saves the snapshot, is
    # killed, and the test goes on with a restore (ready at 10): the test's machine is
    # the last one made ready, and the killed one does not close the window.
    earlier = [
        machine(3.0, "launch", argv=[]),
        machine(4.0, "ready", seconds=1.0),
        {"t": 5.0, "source": "start", "kind": "snapshot-save", "saved": "/c/x.ram"},
        machine(5.1, "killed", status=-9),
    ]
    timeline = sorted([*earlier, *TIMELINE], key=lambda r: r["t"])
    found = extract_steps(QMP, timeline, end=15.9)
    assert found.ready == 10.0
    assert [s.describe() for s in found.steps] == [
        s.describe() for s in extract_steps(QMP, TIMELINE, end=15.9).steps
    ]
    assert extract_steps(QMP, timeline).end == 16.5  # the test's own machine's stop


def test_teardown_commands_and_the_shutdown_ladder_are_not_steps() -> None:
    found = extract_steps(QMP, TIMELINE, end=15.9)
    described = [s.describe() for s in found.steps]
    assert "ssh dmesg" not in described
    assert not any("system_powerdown" in d for d in described)


def test_without_an_end_the_shutdown_bounds_the_steps() -> None:
    found = extract_steps(QMP, TIMELINE)
    assert found.steps[-1].describe() == "ssh dmesg"  # tearDown's: why scenarios pass end
    assert not any(s.ends_machine for s in found.steps)


def test_failing_step_is_the_last_step_before_the_first_failed_verdict() -> None:
    found = extract_steps(QMP, TIMELINE, end=15.9)
    assert found.failed_step == 5
    assert found.failure_cause == "the first failed verdict"


def test_failing_step_without_verdict_or_crash_is_the_last_step_of_the_test() -> None:
    timeline = [r for r in TIMELINE if r.get("source") != "verdict"]
    found = extract_steps(QMP, timeline, end=14.5)
    assert found.failed_step == 4
    assert found.failure_cause == "the end of the test"


def test_failing_step_follows_a_guest_crash() -> None:
    timeline = [*TIMELINE, machine(13.02, "crash", via="console", line="Oops")]
    found = extract_steps(QMP, timeline, end=15.9)
    assert found.failed_step == 3
    assert found.failure_cause == "the guest crash"


def test_each_step_keeps_its_recorded_outcome() -> None:
    steps = extract_steps(QMP, TIMELINE, end=15.9).steps
    assert [(s.ok, s.outcome) for s in steps] == [
        (True, "ok"),
        (True, "ok"),
        (True, "ok"),
        (False, "DeviceNotFound: no such thing"),
        (False, "exit 1"),
    ]


def test_events_after_a_step_are_kept_for_the_replay_to_wait_for() -> None:
    steps = extract_steps(QMP, TIMELINE, end=15.9).steps
    assert steps[1].events_after == ("BALLOON_CHANGE",)
    assert all(s.events_after == () for i, s in enumerate(steps) if i != 1)


def test_command_without_a_reply_is_recorded_as_such() -> None:
    qmp = [*QMP[:5], qmp_cmd(12.0, "query-status", "q9")]
    steps = extract_steps(qmp, TIMELINE, end=15.9).steps
    assert [(s.ok, s.outcome) for s in steps if s.kind == "qmp"] == [(False, "no reply recorded")]


def test_machine_ending_steps_are_recognised_in_qmp_and_hmp() -> None:
    def qmp_step(execute: str, **arguments: Any) -> Step:
        return Step(1, 0.0, "qmp", {"execute": execute, "arguments": arguments}, True, "ok")

    assert qmp_step("quit").ends_machine
    assert qmp_step("system_reset").ends_machine
    assert qmp_step("human-monitor-command", **{"command-line": "system_powerdown"}).ends_machine
    assert not qmp_step("human-monitor-command", **{"command-line": "info mtree"}).ends_machine
    assert not qmp_step("query-status").ends_machine


def test_cut_off_last_line_is_reported_and_complete_lines_are_kept() -> None:
    text = '{"t": 1, "kind": "a"}\n{"t": 2, "kind": "b"}\n{"t": 3, "ki'
    read = parse_jsonl(text, "qmp.jsonl")
    assert [r["kind"] for r in read.records] == ["a", "b"]
    assert read.problems == ["qmp.jsonl line 3 is cut off (the writer was killed?)"]


def test_broken_line_in_the_middle_is_reported_as_not_json() -> None:
    read = parse_jsonl('{"t": 1}\nnot json\n{"t": 2}\n', "timeline.jsonl")
    assert len(read.records) == 2
    assert read.problems == ["timeline.jsonl line 2 is not JSON"]


# --- bundles on disk -------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict[str, Any]], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def kernel_spec(kernel: Path, initrd: Path) -> MachineSpec:
    return MachineSpec(boot=KernelBoot(kernel=str(kernel), initrd=str(initrd), cmdline="x"))


def argv_of(spec: MachineSpec) -> list[str]:
    return build_argv(spec, Plumbing(qmp_socket="/tmp/cvmlab-test/qmp.sock"))


@pytest.fixture
def boot_files(tmp_path: Path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    return kernel, initrd


def synthetic_bundle(evidence: Path, boot_files: tuple[Path, Path], tail: str = "") -> Path:
    evidence.mkdir()
    write_jsonl(evidence / "qmp.jsonl", QMP)
    write_jsonl(evidence / "timeline.jsonl", TIMELINE, tail)
    spec = kernel_spec(*boot_files)
    return write_repro_bundle(
        evidence, test_id="1-x.py:X.test", status="FAIL", fail_reason="boom", spec=spec,
        qemu_command=argv_of(spec), image=None, seed=4242, end=15.9,
    )  # fmt: skip


def test_bundle_round_trip_keeps_spec_command_seed_and_steps(
    tmp_path: Path, boot_files: tuple[Path, Path]
) -> None:
    path = synthetic_bundle(tmp_path / "data", boot_files)
    bundle = load_repro_bundle(path)
    spec = kernel_spec(*boot_files)
    assert bundle.spec == spec
    assert list(bundle.qemu_argv) == argv_of(spec)
    assert bundle.seed == 4242
    assert (bundle.status, bundle.fail_reason) == ("FAIL", "boom")
    assert [s.describe() for s in bundle.steps] == [
        s.describe() for s in extract_steps(QMP, TIMELINE, end=15.9).steps
    ]
    assert bundle.failed_step == 5 and bundle.default_until == 4
    assert set(bundle.files) == {str(p) for p in boot_files}
    assert bundle.incomplete == ()


def test_bundle_from_a_cut_off_timeline_says_it_is_incomplete(
    tmp_path: Path, boot_files: tuple[Path, Path]
) -> None:
    path = synthetic_bundle(tmp_path / "data", boot_files, tail='{"t": 15.95, "sour')
    bundle = load_repro_bundle(path)
    assert len(bundle.steps) == 5
    line = len(TIMELINE) + 1
    assert bundle.incomplete == (f"timeline.jsonl line {line} is cut off (the writer was killed?)",)
    assert any("incomplete" in line for line in list_lines(bundle))


def test_changed_boot_file_outside_an_image_is_refused_naming_it(
    tmp_path: Path, boot_files: tuple[Path, Path]
) -> None:
    bundle = load_repro_bundle(synthetic_bundle(tmp_path / "data", boot_files))
    boot_files[1].write_bytes(b"initrd, rebuilt")
    with pytest.raises(ImageError, match=f"boot file {boot_files[1]} changed since the test ran"):
        bundle.verify()


def test_a_pvh_kernel_cleaned_from_the_cache_is_unpacked_again_for_the_reproducer(
    tmp_path: Path, guest_image: ImageManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    entry = kernel_entry(guest_image.kernel)
    assert entry.pvh, entry.reason
    evidence = tmp_path / "data"
    evidence.mkdir()
    write_jsonl(evidence / "qmp.jsonl", QMP)
    write_jsonl(evidence / "timeline.jsonl", TIMELINE)
    spec = kernel_spec(entry.path, guest_image.initrd)
    path = write_repro_bundle(
        evidence, test_id="1-x.py:X.test", status="FAIL", fail_reason="boom", spec=spec,
        qemu_command=argv_of(spec), image=guest_image, seed=1, end=15.9,
    )  # fmt: skip
    bundle = load_repro_bundle(path)
    assert str(entry.path) in bundle.files  # outside the image: hashed into the bundle
    entry.path.unlink()
    bundle.verify()
    assert entry.path.is_file()


def test_step_number_beyond_the_bundle_is_refused_before_any_launch(
    tmp_path: Path, boot_files: tuple[Path, Path]
) -> None:
    bundle = load_repro_bundle(synthetic_bundle(tmp_path / "data", boot_files))
    with pytest.raises(ReproError, match=r"there is no step 9: the bundle has steps 1\.\.5"):
        reproduce(bundle, until=9, keep_running=False)


def test_list_marks_the_failing_step_and_what_is_replayed_by_default(
    tmp_path: Path, boot_files: tuple[Path, Path]
) -> None:
    lines = list_lines(load_repro_bundle(synthetic_bundle(tmp_path / "data", boot_files)))
    assert "seed: 4242" in lines
    assert "[replayed by default]" in lines[3]  # step 1
    assert lines[-1].startswith("   5  ssh test -e /tmp/y  -> exit 1  [<- failing step")


def test_recorded_command_is_replayed_with_new_plumbing_and_a_monitor_for_people() -> None:
    spec = MachineSpec(boot=KernelBoot(kernel="/k", initrd="/i", cmdline="c"))
    recorded = build_argv(spec, Plumbing(qmp_socket="/old/qmp.sock"), ["ld.so", "qemu"])
    new = Plumbing(qmp_socket="/new/qmp.sock", extra_qmp_socket="/new/human.sock")
    assert replug(recorded, new) == build_argv(spec, new, ["ld.so", "qemu"])
    assert "chardev=qmp1,mode=control" in replug(recorded, new)


def test_known_hosts_line_pins_the_key_for_the_forwarded_port() -> None:
    line = known_hosts_line(40123, "ssh-ed25519 AAAAC3Nza image-key")
    assert line == "[127.0.0.1]:40123 ssh-ed25519 AAAAC3Nza\n"


def test_repro_runs_without_avocado(tmp_path: Path, boot_files: tuple[Path, Path]) -> None:
    synthetic_bundle(tmp_path / "data", boot_files)
    blocked = (
        "import sys; sys.modules['avocado'] = None; from orchestrator.cli import main; "
        f"sys.exit(main(['repro', {str(tmp_path / 'data')!r}, '--list']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "   5  ssh test -e /tmp/y  -> exit 1" in proc.stdout


# --- bad input through the CLI: one line, no traceback ---------------------------------


def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["repro", *args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_not_a_result_dir_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, said = run_cli(str(tmp_path), capsys=capsys)
    assert status == 2
    assert f"{tmp_path} is not an avocado job or test result directory" in said
    assert "Traceback" not in said


def test_cut_off_bundle_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / BUNDLE_NAME).write_text('{"format": 1, "kind": "cvmlab-re')
    status, said = run_cli(str(tmp_path), capsys=capsys)
    assert status == 2
    assert "is cut off or not JSON" in said and "Traceback" not in said


def test_result_dir_without_bundle_but_with_run_sh_points_at_it(tmp_path: Path) -> None:
    result = tmp_path / "job-1" / "test-results" / "1-x.py_X.test"
    (result / "data").mkdir(parents=True)
    (result / "debug.log").write_text("")
    (result / "data" / "argv.json").write_text("[]")
    (result / "data" / "run.sh").write_text("#!/bin/sh\n")
    with pytest.raises(ReproError) as caught:
        load_repro_bundle(result)
    assert "the test did not finish (its runner was killed?)" in caught.value.problem
    assert str(result / "data" / "run.sh") in caught.value.fix


def test_half_written_job_killed_mid_test_is_reported_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = run_killed_job(tmp_path / "killed")
    status, said = run_cli(str(job), capsys=capsys)
    assert status == 2
    assert "is a half-written avocado job (no results.json" in said
    test_dir = next((job / "test-results").glob("*test_b_hangs*"))
    status, said = run_cli(str(test_dir), capsys=capsys)
    assert status == 2
    assert "the test did not finish (its runner was killed?)" in said
    assert "Traceback" not in said


# --- a changed image: refused, naming the file ----------------------------------------


@pytest.fixture
def image_copy(guest_image: ImageManifest, tmp_path: Path) -> ImageManifest:
    """A private copy of the default image (modes kept), safe to damage."""
    copy = tmp_path / "image"
    shutil.copytree(guest_image.directory, copy)
    return load_manifest(copy)


def test_bundle_whose_image_file_changed_is_refused_naming_the_file(
    image_copy: ImageManifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evidence = tmp_path / "data"
    evidence.mkdir()
    spec = kernel_spec(image_copy.kernel, image_copy.initrd)
    write_repro_bundle(
        evidence, test_id="t", status="FAIL", fail_reason=None, spec=spec,
        qemu_command=argv_of(spec), image=image_copy, seed=None,
    )  # fmt: skip
    assert load_repro_bundle(evidence).files == {}  # the image's own hashes cover both
    with image_copy.initrd.open("ab") as initrd:
        initrd.write(b"\0")
    status, said = run_cli(str(evidence), "--exit-after-replay", capsys=capsys)
    assert status == 2
    assert f"image file {image_copy.initrd} changed" in said
    assert "since the test ran" in said
    assert "guest ready" not in said  # refused before any launch


# --- real: a failed scenario's bundle and its reproduction -----------------------------

SCENARIO = '''
from orchestrator.machine_scenario import MachineScenario


class Recorded(MachineScenario):
    """
    :avocado: enable
    """

    timeout = 300

    def test_passes(self):
        self.guest.run("true")

    def test_fails_after_steps(self):
        self.guest.run("echo replayed > /tmp/marker")
        self.machine.qmp.execute("query-status")
        self.guest.run(["cat", "/tmp/marker"])
        self.machine.qmp.execute("query-memdev")
        result = self.guest.run("test -e /tmp/never-made", check=False)
        self.assertEqual(result.exit_status, 0, "the file should exist")

    def test_errors_on_a_guest_command(self):
        self.machine.qmp.execute("query-status")
        self.guest.run("exit 3")
'''


@pytest.fixture(scope="module")
def recorded_job(tmp_path_factory: pytest.TempPathFactory, guest_image: ImageManifest) -> Path:
    """One real avocado job: a passing, a failing and an erroring machine test (seed 4242)."""
    root = tmp_path_factory.mktemp("recorded")
    (root / "recorded.py").write_text(SCENARIO)
    proc = subprocess.run(
        [AVOCADO, "run", "--disable-sysinfo", "--job-results-dir", str(root / "jobs"),
         "recorded.py", "-p", "seed=4242"],
        cwd=root, capture_output=True, text=True, timeout=DEADLINE_S, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one FAIL, one ERROR
    return next((root / "jobs").glob("job-*"))


def result_dir(job: Path, test: str) -> Path:
    return next((job / "test-results").glob(f"*{test}"))


@pytest.mark.vm
def test_failed_scenario_writes_a_bundle_with_its_steps_and_a_passed_one_does_not(
    recorded_job: Path, guest_image: ImageManifest
) -> None:
    assert not (result_dir(recorded_job, "test_passes") / "data" / BUNDLE_NAME).exists()
    bundle = load_repro_bundle(result_dir(recorded_job, "test_fails_after_steps"))
    assert bundle.status == "FAIL" and bundle.fail_reason == "1 != 0 : the file should exist"
    assert [s.describe() for s in bundle.steps] == [
        "ssh echo replayed > /tmp/marker",
        "qmp query-status",
        "ssh cat /tmp/marker",
        "qmp query-memdev",
        "ssh test -e /tmp/never-made",
    ]
    assert [s.outcome for s in bundle.steps] == ["ok"] * 4 + ["exit 1"]
    assert bundle.failed_step == 5 and bundle.default_until == 4
    assert bundle.seed == 4242
    assert bundle.image is not None and bundle.image.outputs == guest_image.outputs
    assert bundle.qemu_argv[0] == "qemu-system-x86_64"


@pytest.mark.vm
def test_erroring_scenario_writes_a_bundle_whose_failing_step_raised(recorded_job: Path) -> None:
    bundle = load_repro_bundle(result_dir(recorded_job, "test_errors_on_a_guest_command"))
    assert bundle.status == "ERROR"
    assert [(s.describe(), s.outcome) for s in bundle.steps] == [
        ("qmp query-status", "ok"),
        ("ssh exit 3", "exit 3"),
    ]
    assert bundle.failed_step == 2 and bundle.default_until == 1


class Lines:
    """A child's stdout read line by line on a thread; waits have deadlines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, text: str, timeout: float) -> str:
        deadline = now() + timeout
        while (remaining := deadline - now()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not printed; output so far:\n" + "\n".join(self.seen))


@pytest.fixture
def repro_process(
    recorded_job: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    failed = result_dir(recorded_job, "test_fails_after_steps")
    evidence = tmp_path / "repro"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "repro", str(failed),
         "--evidence-dir", str(evidence)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield proc, evidence
    finally:
        # SIGTERM first: repro shuts its guest down and removes its run directory (a
        # SIGKILL left /tmp/cvmlab-*/qmp-human.sock behind when a test failed).
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(30)


def qemu_pid(evidence: Path) -> int:
    for line in (evidence / "timeline.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "spawned":
            return int(record["pid"])
    raise AssertionError("no spawned record")


@pytest.mark.vm
def test_repro_replays_to_the_step_before_the_failure_and_the_guest_answers(
    repro_process: tuple[subprocess.Popen[str], Path], guest_image: ImageManifest
) -> None:
    proc, evidence = repro_process
    out = Lines(proc)
    out.until("replaying steps 1..4 of 5 (the failing step is 5)", DEADLINE_S)
    out.until("replayed 4 step(s); 0 differ from the recording", 60)
    port = int(out.until("SSH: ssh -i", 30).split(" -p ")[1].split()[0])
    socket = out.until("QMP socket:", 10).split("QMP socket: ")[1]
    out.until("Ctrl-C (or SIGTERM) shuts the guest down.", 10)
    assert "  seed: export CVMLAB_SEED=4242" in out.seen
    pid = qemu_pid(evidence)
    assert b"CVMLAB_SEED=4242" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")

    # Step 1 was replayed: its file is there; the failing step, run by hand, fails again.
    with GuestShell(port, guest_image.ssh_user, guest_image.ssh_key,
                    host_key=guest_image.host_key) as shell:  # fmt: skip
        shell.open(30)
        assert shell.run(["cat", "/tmp/marker"]).stdout == "replayed\n"
        assert shell.run("test -e /tmp/never-made", check=False).exit_status == 1

    # A person's qmp-shell attaches while cvmlab holds its own monitor.
    qmp_shell = Path(sys.executable).with_name("qmp-shell")
    shell_out = subprocess.run(
        [str(qmp_shell), socket], input="query-status\n", capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert '"status": "running"' in shell_out.stdout, shell_out.stdout + shell_out.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    out.until("guest stopped (powerdown)", 10)
    assert not_qemu(pid)
    assert not Path(socket).parent.exists()  # the human monitor's run dir is gone


def not_qemu(pid: int) -> bool:
    """`pid` is gone (or recycled by another program)."""
    try:
        return b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


@pytest.mark.vm
def test_replay_that_crashes_the_guest_stops_there_and_leaves_nothing_running(
    guest_image: ImageManifest, tmp_path: Path
) -> None:
    """A bundle made by hand on the real image: a QMP error, then a guest crash."""
    evidence = tmp_path / "data"
    evidence.mkdir()
    crash = "echo c > /proc/sysrq-trigger; sleep 600"
    write_jsonl(
        evidence / "qmp.jsonl",
        [
            qmp_cmd(11.0, "qom-get", "q1", path="/objects/nothing", property="size"),
            qmp_reply(11.1, "q1", error="DeviceNotFound"),
        ],
    )
    write_jsonl(
        evidence / "timeline.jsonl",
        [
            machine(10.0, "ready", seconds=5.0),
            {"t": 12.0, "source": "ssh", "kind": "command", "cmd": crash},
            {"t": 12.5, "source": "ssh", "kind": "command-failed", "cmd": crash,
             "error": "GuestCrashed", "seconds": 0.5},
            *ssh_run(13.0, "true", 0),
        ],
    )  # fmt: skip
    spec = MachineSpec(
        boot=KernelBoot(kernel=str(guest_image.kernel), initrd=str(guest_image.initrd),
                        cmdline=guest_image.cmdline)
    )  # fmt: skip
    write_repro_bundle(
        evidence, test_id="t", status="ERROR", fail_reason="crashed", spec=spec,
        qemu_command=argv_of(spec), image=guest_image, seed=None, end=14.0,
    )  # fmt: skip
    bundle = load_repro_bundle(evidence)
    said: list[str] = []
    result = reproduce(
        bundle, until=3, keep_running=False, evidence_dir=tmp_path / "repro", say=said.append
    )
    assert [r.outcome for r in result.replayed] == [
        "DeviceNotFound: Device '/objects/nothing' not found",
        "guest crashed",
    ]
    assert result.replayed[0].as_recorded
    assert result.stopped is not None and result.stopped.startswith("the guest crashed at step 2: ")
    assert not_qemu(qemu_pid(tmp_path / "repro"))


def test_a_command_with_stdin_keeps_its_input_for_replay() -> None:
    from orchestrator.repro.steps import extract_steps

    timeline = [
        {"t": 1.0, "source": "machine", "kind": "ready"},
        {"t": 2.0, "source": "ssh", "kind": "command", "cmd": "cat > /tmp/x", "input": "secret"},
        {"t": 2.1, "source": "ssh", "kind": "result", "cmd": "cat > /tmp/x", "exit_status": 0},
        {"t": 3.0, "source": "ssh", "kind": "command", "cmd": "true"},
        {"t": 3.1, "source": "ssh", "kind": "result", "cmd": "true", "exit_status": 0},
    ]
    steps = extract_steps([], timeline, end=10.0)
    assert [s.action for s in steps.steps] == [
        {"cmd": "cat > /tmp/x", "input": "secret"},
        {"cmd": "true"},
    ]
