"""Bring a failed test's guest back: same files, same QEMU command, same steps.

`reproduce(bundle)`:
1. verifies the image and boot files against the bundle's sha256 (a changed file
   is refused, named);
2. relaunches QEMU with the test's recorded argv (only the run-time plumbing is
   new: the QMP socket, the trace file, and a second QMP monitor for a person, since
   QEMU serves one client per monitor socket and cvmlab holds the first);
3. waits for the guest's ready line and opens SSH;
4. replays steps 1..until in order. The default `until` stops right BEFORE the
   failing step, so the developer runs that one by hand and watches it fail. Per kind:
   - qmp: executed on cvmlab's QMP session; an error reply is recorded, not fatal
     (the test may have expected it); then the events the test saw after the step
     are waited for (each by name, bounded), since a test often waited for them;
   - ssh: run in the guest with `check=False`; the exit status is compared;
   - upload: the local file is copied again if it still exists, else skipped;
   - punch: the host hole punch is done again through `HostPuncher`;
   - steps that end or reset the machine (quit, system_powerdown, system_reset)
     are skipped with a note: the point is a running guest;
   a guest crash or QEMU exit ends the replay (the failure may have come early);
5. prints how to attach (ssh command with the pinned host key, QMP socket,
   qmp-shell) and, with `keep_running`, waits for Ctrl-C, SIGTERM or QEMU's own
   exit, then shuts the guest down cleanly (the launcher's ladder; no orphans).

With a seed in the bundle, CVMLAB_SEED is exported (QEMU and anything started
from this process inherit it); the replayed commands already carry the seed in
their text, as the test sent them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from orchestrator.errors import CvmlabError, GuestCrashed, QmpError
from orchestrator.qemu.argv import (
    HUMAN_QMP_CHARDEV_ID,
    QMP_CHARDEV_ID,
    Plumbing,
    build_argv,
    qmp_monitor_args,
)
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.qmp import QmpCommandError
from orchestrator.qemu.snapshot import (
    INCOMING_ARGS,
    Snapshot,
    SnapshotCache,
    SnapshotError,
    StartRecord,
    restore,
)
from orchestrator.qemu.warm import finish_start
from orchestrator.repro.bundle import ReproBundle, ReproError
from orchestrator.repro.steps import Step
from orchestrator.timeline import Timeline, now

if TYPE_CHECKING:
    from orchestrator.guest.ssh import GuestShell

SEED_ENV = "CVMLAB_SEED"
# Bounds on how long a replayed step may take, scaled from how long it took in the test.
MIN_STEP_TIMEOUT = 60.0
STEP_TIMEOUT_FACTOR = 4.0
# How long to wait for each QMP event the test saw after a step.
EVENT_TIMEOUT = 10.0
BOOT_TIMEOUT = 120.0

Say = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


# --- the QEMU command -----------------------------------------------------------------


def binary_prefix(argv: Sequence[str]) -> list[str]:
    """The program part of a recorded argv (QEMU, or a loader prefix and QEMU)."""
    if "-name" not in argv:
        raise ReproError(
            "the recorded QEMU command has no -name option: it was not written by cvmlab",
            "re-run the test for a new bundle",
        )
    return list(argv[: list(argv).index("-name")])


def replug(recorded: Sequence[str], plumbing: Plumbing) -> list[str]:
    """The recorded argv with this run's plumbing: QMP socket, trace file, extra monitor.

    Everything else stays byte for byte what the test ran. Raises ReproError when the
    recorded argv has no cvmlab QMP monitor to re-point.
    """
    argv = list(recorded)
    qmp_prefix = f"socket,id={QMP_CHARDEV_ID},"
    try:
        at = next(
            i for i in range(len(argv) - 1)
            if argv[i] == "-chardev" and argv[i + 1].startswith(qmp_prefix)
        )  # fmt: skip
    except StopIteration:
        raise ReproError(
            "the recorded QEMU command has no cvmlab QMP monitor",
            "re-run the test for a new bundle",
        ) from None
    # The recorded chardev and its -mon pair are replaced by this run's monitors.
    if argv[at + 2 : at + 4] != ["-mon", f"chardev={QMP_CHARDEV_ID},mode=control"]:
        raise ReproError("the recorded QMP monitor is not in cvmlab's form", "re-run the test")
    monitors = qmp_monitor_args(QMP_CHARDEV_ID, plumbing.qmp_socket, plumbing.qmp_fd)
    if plumbing.extra_qmp_socket:
        monitors += qmp_monitor_args(HUMAN_QMP_CHARDEV_ID, plumbing.extra_qmp_socket)
    argv[at : at + 4] = monitors
    if "-D" in argv:
        d = argv.index("-D")
        if plumbing.trace_file:
            argv[d + 1] = plumbing.trace_file
        else:
            del argv[d : d + 2]
    elif plumbing.trace_file:
        argv += ["-D", plumbing.trace_file]
    return argv


def without_incoming(argv: Sequence[str]) -> list[str]:
    """A restored test's argv as a cold boot: without `-incoming defer`."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] == INCOMING_ARGS[0] and out[i + 1] == INCOMING_ARGS[1]:
            del out[i : i + 2]
            break
    return out


def warm_start_of(
    evidence_dir: Path, argv: Sequence[str]
) -> tuple[Snapshot | None, StartRecord | None]:
    """How the test's guest started (repro.json's `start`, else start.json) and, for a
    warm start, the same snapshot if the cache still has it unchanged (else the repro
    boots cold)."""
    raw: Any = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        raw = json.loads((Path(evidence_dir) / "repro.json").read_text()).get("start")
    if raw is None:
        with contextlib.suppress(OSError, ValueError):
            raw = json.loads((Path(evidence_dir) / "start.json").read_text())
    try:
        start = StartRecord(raw["mode"], str(raw["reason"]), key=raw.get("key"))
    except (KeyError, TypeError):
        return None, None
    if start.mode != "warm" or INCOMING_ARGS[0] not in argv or not start.key:
        return None, start
    try:
        snapshot = SnapshotCache().lookup_digest(start.key)
    except SnapshotError as error:
        start.reason = f"the snapshot was refused: {error}"
        return None, start
    if snapshot is None:
        start.reason = "the snapshot is no longer in the cache"
    return snapshot, start


class ReplayMachine(Machine):
    """A Machine that runs the test's recorded argv (re-plumbed) instead of rebuilding it.

    The spec still drives pre-flight, SSH forwarding and run.sh; the argv builder of
    today's cvmlab may differ from the one that ran the test, and a reproducer must
    run what the test ran.
    """

    def __init__(self, recorded_argv: Sequence[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded_argv = list(recorded_argv)

    def _argv(self, plumbing: Plumbing) -> list[str]:
        return replug(self.recorded_argv, plumbing)


def argv_drift(bundle: ReproBundle) -> str | None:
    """How today's argv builder differs from the recorded command for the same spec, if it does."""
    probe = Plumbing(qmp_socket="/run/probe.sock", serial="stdio", trace_file=None)
    try:
        recorded = replug(bundle.qemu_argv, probe)
    except ReproError:
        return None
    rebuilt = build_argv(bundle.spec, probe, binary_prefix(bundle.qemu_argv))
    if recorded == rebuilt:
        return None
    for i, (was, now_) in enumerate(zip(recorded, rebuilt, strict=False)):
        if was != now_:
            return f"argument {i}: the test ran {was!r}, cvmlab now builds {now_!r}"
    return f"the test ran {len(recorded)} arguments, cvmlab now builds {len(rebuilt)}"


# --- replaying steps -------------------------------------------------------------------


@dataclass(frozen=True)
class StepReplay:
    """What replaying one step did. `done` False: skipped (see `note`)."""

    step: Step
    done: bool
    ok: bool | None = None
    outcome: str = ""
    note: str = ""

    @property
    def as_recorded(self) -> bool | None:
        """Same result as in the test (ok/exit status/QMP error class); None when skipped."""
        if not self.done:
            return None
        return self.outcome.split(":")[0] == self.step.outcome.split(":")[0]

    def line(self, total: int) -> str:
        head = f"  [{self.step.n}/{total}] {self.step.describe()}"
        if not self.done:
            return f"{head}: skipped ({self.note})"
        compared = "as recorded" if self.as_recorded else f"recorded: {self.step.outcome}"
        tail = f"; {self.note}" if self.note else ""
        return f"{head}: {self.outcome} ({compared}){tail}"


@dataclass
class ReproResult:
    """What `reproduce` did. Stamps are now() values."""

    evidence_dir: Path
    until: int
    started_at: float
    ready_at: float | None = None
    replayed: list[StepReplay] = field(default_factory=list)
    stopped: str | None = None  # why the replay ended early (the guest crashed, QEMU exited)
    ssh_port: int | None = None
    human_qmp_socket: Path | None = None
    known_hosts: Path | None = None
    shutdown_rung: str | None = None

    @property
    def differences(self) -> list[StepReplay]:
        return [r for r in self.replayed if r.as_recorded is False]


def _timeout(step: Step) -> float:
    return max(MIN_STEP_TIMEOUT, STEP_TIMEOUT_FACTOR * (step.seconds or 0.0))


class _Replayer:
    """Does each step again on one machine and shell."""

    def __init__(self, machine: Machine, shell: GuestShell | None, timeline: Timeline) -> None:
        self.machine = machine
        self.shell = shell
        self.timeline = timeline
        self._puncher: Any = None

    def run(self, step: Step) -> StepReplay:
        if step.ends_machine:
            return StepReplay(step, False, note="it ends or resets the machine; run it by hand")
        mark = self.machine.qmp.mark()
        if step.kind == "qmp":
            result = self._qmp(step)
        elif step.kind == "ssh":
            result = self._ssh(step)
        elif step.kind == "upload":
            result = self._upload(step)
        else:
            result = self._punch(step)
        if result.done and step.events_after and self.machine.running:
            missing = self._wait_events(step.events_after, mark)
            if missing:
                note = "; ".join(x for x in (result.note, missing) if x)
                result = StepReplay(step, True, result.ok, result.outcome, note)
        return result

    def _qmp(self, step: Step) -> StepReplay:
        command = str(step.action["execute"])
        arguments = step.action.get("arguments") or None
        try:
            self.machine.qmp.execute(command, arguments, timeout=_timeout(step))
        except QmpCommandError as error:
            return StepReplay(step, True, False, f"{error.error_class}: {error.desc}")
        except QmpError as error:
            return StepReplay(step, True, False, f"error: {error.problem}")
        return StepReplay(step, True, True, "ok")

    def _need_shell(self, step: Step) -> GuestShell | StepReplay:
        if self.shell is None:
            return StepReplay(step, False, note="no SSH to this guest (no image or no forward)")
        return self.shell

    def _ssh(self, step: Step) -> StepReplay:
        shell = self._need_shell(step)
        if isinstance(shell, StepReplay):
            return shell
        result = shell.run(
            str(step.action["cmd"]),
            timeout=_timeout(step),
            check=False,
            input=step.action.get("input"),
        )
        outcome = "ok" if result.exit_status == 0 else f"exit {result.exit_status}"
        return StepReplay(step, True, result.exit_status == 0, outcome)

    def _upload(self, step: Step) -> StepReplay:
        shell = self._need_shell(step)
        if isinstance(shell, StepReplay):
            return shell
        local = Path(str(step.action["local"]))
        if not local.is_file():
            return StepReplay(step, False, note=f"{local} no longer exists on this host")
        mode = int(str(step.action.get("mode") or "0o644"), 8)
        shell.upload(local, str(step.action["remote"]), mode)
        return StepReplay(step, True, True, "ok", note="the file is today's copy")

    def _punch(self, step: Step) -> StepReplay:
        # Imported here: only replays with a host punch need the memory layer.
        from orchestrator.memory.host_punch import HostPuncher

        if self._puncher is None:
            self._puncher = HostPuncher(self.machine.qmp, self.machine.pid, self.timeline)
        self._puncher.punch(int(step.action["gpa"]), int(step.action["length"]), allow_private=True)
        return StepReplay(step, True, True, "ok")

    def _wait_events(self, names: Sequence[str], mark: int) -> str:
        """Wait for each event the test saw after this step; what did not come, in words."""
        missing: list[str] = []
        for name in names:
            try:
                self.machine.qmp.wait_event(name, after=mark, timeout=EVENT_TIMEOUT)
            except QmpError:
                missing.append(name)
        if not missing:
            return ""
        return f"event {', '.join(missing)} did not come within {EVENT_TIMEOUT:g} s"


# --- attaching ---------------------------------------------------------------------------


def known_hosts_line(port: int, host_key: str) -> str:
    """An OpenSSH known_hosts line pinning `host_key` for 127.0.0.1:`port`."""
    key_type, key_data = host_key.split()[:2]
    return f"[127.0.0.1]:{port} {key_type} {key_data}\n"


def ssh_command(key: Path, port: int, known_hosts: Path, user: str) -> list[str]:
    """The ssh argv a person runs to log into the guest, with its host key pinned."""
    return [
        "ssh", "-i", str(key), "-p", str(port),
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes", f"{user}@127.0.0.1",
    ]  # fmt: skip


def _attach_lines(result: ReproResult, bundle: ReproBundle) -> list[str]:
    lines = ["", "The guest is running. Attach with:"]
    image = bundle.image
    if image is not None and result.ssh_port is not None and result.known_hosts is not None:
        argv = ssh_command(image.ssh_key, result.ssh_port, result.known_hosts, image.ssh_user)
        lines.append(f"  SSH: {shlex.join(argv)}")
    if result.human_qmp_socket is not None:
        lines.append(f"  QMP socket: {result.human_qmp_socket}")
        lines.append(f"  qmp-shell {shlex.quote(str(result.human_qmp_socket))}")
    if bundle.seed is not None:
        lines.append(f"  seed: export {SEED_ENV}={bundle.seed}")
    failed = bundle.failed_step
    if failed is not None and result.until < failed and result.until < len(bundle.steps):
        nxt = bundle.step(result.until + 1)
        which = "the failing step" if nxt.n == failed else "the next step"
        lines.append(f"  {which}, {nxt.n}: {nxt.describe()} (recorded: {nxt.outcome})")
    lines.append(f"  evidence of this run: {result.evidence_dir}")
    return lines


# --- signals -------------------------------------------------------------------------------


class _StopSignals:
    """SIGINT/SIGTERM: during replay they interrupt (KeyboardInterrupt: the machine is shut
    down on the way out); while the guest is kept running they end the wait."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.waiting = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()
        if not self.waiting:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopSignals]:
        main = threading.current_thread() is threading.main_thread()
        if main:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


# --- the whole reproduction -----------------------------------------------------------


def _check_until(bundle: ReproBundle, until: int | None, replay: bool) -> int:
    if not replay:
        return 0
    if until is None:
        return bundle.default_until
    if not 0 <= until <= len(bundle.steps):
        raise ReproError(
            f"there is no step {until}: the bundle has steps 1..{len(bundle.steps)}",
            "see them with `cvmlab repro --list`",
        )
    return until


def _evidence_dir(given: Path | None) -> Path:
    if given is None:
        return Path(tempfile.mkdtemp(prefix="cvmlab-repro-"))
    given.mkdir(mode=0o700, parents=True, exist_ok=True)
    return given


def reproduce(
    bundle: ReproBundle,
    *,
    until: int | None = None,
    replay: bool = True,
    keep_running: bool = True,
    evidence_dir: Path | None = None,
    say: Say = _print,
    boot_timeout: float = BOOT_TIMEOUT,
) -> ReproResult:
    """Relaunch the bundle's guest, replay steps 1..`until`, then attach info (see module doc).

    `until` None: up to just before the failing step. `replay` False: no step at all.
    `keep_running` False: shut down right after the replay (tests, bench). The
    evidence of this run (argv.json, qmp.jsonl, serial.log, timeline.jsonl, the
    known_hosts file) goes to `evidence_dir` (default: a new private temp dir, kept).
    """
    started = now()
    last = _check_until(bundle, until, replay)
    bundle.verify()
    if bundle.image is None:
        raise ReproError(
            "the bundle has no image manifest, so the guest's readiness line and SSH "
            "login are unknown",
            f"start {bundle.evidence_dir / 'run.sh'} by hand",
        )
    image = bundle.image
    directory = _evidence_dir(evidence_dir)
    result = ReproResult(directory, last, started)
    if bundle.seed is not None:
        os.environ[SEED_ENV] = str(bundle.seed)
    drift = argv_drift(bundle)
    if drift:
        say(f"note: running the recorded QEMU command; {drift}")
    snapshot, start = warm_start_of(bundle.evidence_dir, bundle.qemu_argv)
    argv = bundle.qemu_argv if snapshot is not None else without_incoming(bundle.qemu_argv)
    if start is not None:
        say(f"note: the test's guest started {start.mode}; " + (
            f"restoring the same snapshot {snapshot.data_path.name}" if snapshot is not None
            else f"this run boots cold ({start.reason})"))  # fmt: skip
    signals = _StopSignals()
    with signals.installed(), Timeline(directory / "timeline.jsonl") as timeline:
        machine = ReplayMachine(
            argv,
            bundle.spec,
            directory,
            binary=binary_prefix(bundle.qemu_argv),
            timeline=timeline,
            ready_marker=image.ready_marker,
            human_qmp=True,
        )
        with machine:
            machine.start()
            if snapshot is not None:
                restore(machine.qmp, snapshot)
            else:
                machine.wait_ready(boot_timeout)
            shell = None
            if machine.ssh_port is not None:
                shell = machine.ssh(image.ssh_user, image.ssh_key, image.host_key)
                if snapshot is not None and start is not None:
                    finish_start(machine, shell, start, image.restored_clock)
                known = directory / "known_hosts"
                known.write_text(known_hosts_line(machine.ssh_port, image.host_key))
                known.chmod(0o600)
                result.known_hosts = known
            result.ready_at = now()
            result.ssh_port = machine.ssh_port
            result.human_qmp_socket = machine.human_qmp_socket
            say(f"guest ready for SSH in {result.ready_at - started:.1f} s")
            _replay_steps(bundle, last, _Replayer(machine, shell, timeline), result, say)
            if keep_running and machine.running:
                for line in _attach_lines(result, bundle):
                    say(line)
                say("Ctrl-C (or SIGTERM) shuts the guest down.")
                signals.waiting = True
                while not signals.stop.is_set() and machine.wait_exited(0.5) is None:
                    pass
                signals.waiting = False
                if not machine.running:
                    say(f"QEMU exited (status {machine.returncode})")
            result.shutdown_rung = machine.shutdown()
    say(f"guest stopped ({result.shutdown_rung})")
    return result


def _replay_steps(
    bundle: ReproBundle, last: int, replayer: _Replayer, result: ReproResult, say: Say
) -> None:
    total = len(bundle.steps)
    failing = f" (the failing step is {bundle.failed_step})" if bundle.failed_step else ""
    if last == 0:
        say(f"no steps replayed{failing}")
        return
    say(f"replaying steps 1..{last} of {total}{failing}")
    for step in bundle.steps[:last]:
        try:
            replayed = replayer.run(step)
        except GuestCrashed as error:
            result.stopped = f"the guest crashed at step {step.n}: {error.problem}"
            result.replayed.append(StepReplay(step, True, False, "guest crashed"))
            say(result.replayed[-1].line(total))
            break
        except CvmlabError as error:
            replayed = StepReplay(step, True, False, f"error: {error.problem}")
        result.replayed.append(replayed)
        say(replayed.line(total))
        if not replayer.machine.running:
            status = replayer.machine.returncode
            result.stopped = f"QEMU exited during step {step.n} (status {status})"
            break
    if result.stopped:
        say(f"replay stopped: {result.stopped}")
    differing = len(result.differences)
    say(f"replayed {len(result.replayed)} step(s); {differing} differ from the recording")
