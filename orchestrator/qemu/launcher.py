"""`Machine`: one object that owns a guest's whole life, from pre-flight to reaping.

    with Machine(spec, evidence_dir, ready_marker=image.ready_marker) as machine:
        machine.start()                       # QEMU up, QMP connected, SSH port known
        machine.wait_ready()                  # the guest printed its readiness line
        shell = machine.ssh(image.ssh_user, image.ssh_key, image.host_key)
        shell.run("uname -r")
        machine.shutdown()                    # powerdown -> quit -> SIGTERM -> SIGKILL

What it guarantees:
- Pre-flight: every file the spec names exists and is readable, and QEMU is
  installed, before anything starts; each problem is one error naming the fix.
- Evidence in `evidence_dir`: argv.json, run.sh, qmp.jsonl, serial.log,
  qemu.stderr (and trace.log with trace events).
- No orphans: QEMU is started through `orchestrator.qemu.spawn`, so it is
  SIGKILLed if this process dies, even by SIGKILL; normal exits, exceptions and
  timeouts go through the shutdown ladder; an atexit hook kills machines still
  running. QMP runs over a socket pair (QEMU inherits one end), so there is
  no socket file to poll for and none a killed test could leave behind; only
  the optional human monitor (`human_qmp`) has a 0700 run directory.
- Crashes are noticed as they happen (a kernel crash line on the console, or
  QMP GUEST_PANICKED from the pvpanic device) and interrupt whatever waits on
  the guest: `wait_ready()` and running SSH commands raise GuestCrashed at once.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from orchestrator.errors import (
    CvmlabError,
    GuestCrashed,
    GuestError,
    LaunchError,
    QemuError,
    QmpError,
    SpecError,
)
from orchestrator.guest.serial import CrashReport, SerialConsole
from orchestrator.qemu.argv import Plumbing, build_argv, render_run_sh
from orchestrator.qemu.qmp import QmpEvent, QmpSession
from orchestrator.qemu.spawn import setpriv_path, spawn
from orchestrator.qemu.spec import Backend, DiskBoot, FileBackend, KernelBoot, MachineSpec
from orchestrator.timeline import Timeline, now

if TYPE_CHECKING:
    from orchestrator.guest.ssh import GuestShell

# Budgets of the shutdown rungs after the first (the first gets `timeout`).
QUIT_TIMEOUT = 5.0
SIGTERM_TIMEOUT = 5.0
SIGKILL_TIMEOUT = 10.0
# After a crash is seen, how long to wait for the rest of the kernel's report (call
# trace; it trails the first line by milliseconds) before raising GuestCrashed.
CRASH_SETTLE_TIMEOUT = 2.0

_log = logging.getLogger(__name__)

# Machines whose QEMU may be running: strong references, dropped on release.
_LIVE: set[Machine] = set()
_LIVE_LOCK = threading.Lock()


def _kill_live_machines() -> None:
    """atexit: whatever the caller forgot, QEMU does not outlive us."""
    with _LIVE_LOCK:
        machines = list(_LIVE)
    for machine in machines:
        with contextlib.suppress(Exception):
            machine.kill()


atexit.register(_kill_live_machines)


# Room left for "/cvmlab-XXXXXXXX/qmp.sock" under the 108-byte AF_UNIX limit.
_MAX_TEMPDIR_LEN = 80


def _short_tempdir() -> str:
    """$TMPDIR when it is short enough for a socket path, else /tmp."""
    candidate = tempfile.gettempdir()
    return candidate if len(candidate) <= _MAX_TEMPDIR_LEN else "/tmp"


def _first_error_line(stderr: str) -> str:
    """QEMU's own one-line reason (`qemu-system-x86_64: -cpu x: unable to find ...`)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "warning:" not in line.lower():
            return line
    return lines[0] if lines else "no message on stderr"


#: The files a Machine writes into its evidence directory (a start that stops one
#: machine and launches another keeps the first one's aside: orchestrator.qemu.warm).
EVIDENCE_FILES = ("serial.log", "qemu.stderr", "argv.json", "run.sh", "qmp.jsonl", "trace.log")


class Machine:
    """A QEMU guest from launch to reaping. See the module docstring."""

    def __init__(
        self,
        spec: MachineSpec,
        evidence_dir: Path,
        *,
        binary: str | list[str] = "qemu-system-x86_64",
        timeline: Timeline | None = None,
        ready_marker: str | None = None,
        human_qmp: bool = False,
        extra_args: Sequence[str] = (),
        incoming: bool = False,
    ) -> None:
        """`human_qmp` adds a second QMP monitor socket for a person (qmp-shell), kept
        in `rundir` until the machine is released (`human_qmp_socket`). `extra_args`
        go after the spec's argv, in run.sh too (e.g. the warm start's vmgenid device).
        `incoming` starts QEMU with `-incoming defer` (a snapshot restore: the guest is
        loaded over QMP, then `mark_ready()`); run.sh stays a cold boot."""
        self.spec = spec
        self.evidence_dir = Path(evidence_dir)
        # A list runs QEMU through a prefix (e.g. a private loader for a newer build).
        self.binary: list[str] = [binary] if isinstance(binary, str) else list(binary)
        if not self.binary:
            raise QemuError("empty QEMU binary", "give a path such as qemu-system-x86_64")
        self.timeline = timeline
        self.ready_marker = ready_marker
        self.human_qmp = human_qmp
        self.extra_args = list(extra_args)
        self.incoming = incoming
        # How the guest became ready without its console marker (a restore), if it did.
        self.ready_by: str | None = None

        self.qmp = QmpSession(self.evidence_dir / "qmp.jsonl", timeline, name=f"qmp-{spec.name}")
        self.console = SerialConsole(timeline, on_crash=self._on_crash)
        self.ssh_port: int | None = None
        self.rundir: Path | None = None
        self.crashed: CrashReport | None = None
        self.returncode: int | None = None
        self.shutdown_rung: str | None = None
        # now() stamps of the milestones: launch, qmp_up, ready, shutdown, exited.
        self.timings: dict[str, float] = {}

        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._exited = threading.Event()
        self._shells: list[GuestShell] = []
        self._serial_log: IO[bytes] | None = None
        self._stderr_file: IO[bytes] | None = None
        self._serial_thread: threading.Thread | None = None
        self._exit_thread: threading.Thread | None = None
        self._released = False

    # --- small helpers ---------------------------------------------------------------

    def _record(self, kind: str, **data: Any) -> float:
        if self.timeline is not None:
            return self.timeline.record("machine", kind, **data)
        return now()

    @property
    def pid(self) -> int:
        """QEMU's pid (valid after start())."""
        if self._proc is None:
            raise QemuError("the machine has not been started", "call start() first")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """QEMU has been started and has not exited."""
        return self._proc is not None and not self._exited.is_set()

    @property
    def human_qmp_socket(self) -> Path | None:
        """The second QMP monitor's socket (with `human_qmp`, after start())."""
        if not self.human_qmp or self.rundir is None:
            return None
        return self.rundir / "qmp-human.sock"

    def stderr_text(self) -> str:
        """What QEMU wrote to stderr so far."""
        try:
            return (self.evidence_dir / "qemu.stderr").read_text(errors="replace")
        except OSError:
            return ""

    # --- pre-flight ----------------------------------------------------------------------

    def _check_file(self, path: str, what: str, fix: str) -> None:
        if not os.path.exists(path):
            raise SpecError(f"{what} {path} does not exist", fix)
        if not os.access(path, os.R_OK):
            raise SpecError(f"{what} {path} is not readable", f"check its permissions; {fix}")

    def _check_backend(self, backend: Backend, what: str) -> None:
        if not isinstance(backend, FileBackend):
            return
        path = backend.mem_path
        target = path if os.path.exists(path) else os.path.dirname(path) or "."
        if not os.path.isdir(target) and not os.path.exists(path):
            raise SpecError(
                f"{what} mem_path {path}: neither it nor its directory exists",
                "give an existing directory (e.g. /dev/shm) or a file in one",
            )
        if not os.access(target, os.R_OK | os.W_OK):
            raise SpecError(
                f"{what} mem_path {path} is not readable and writable",
                "use a directory you can write, such as /dev/shm",
            )

    def preflight(self) -> None:
        """Check everything the launch needs, raising one clear error for the first problem."""
        image_fix = "build the image (`cvmlab image build`) or correct the path in the spec"
        boot = self.spec.boot
        if isinstance(boot, KernelBoot):
            self._check_file(boot.kernel, "kernel", image_fix)
            if boot.initrd:
                self._check_file(boot.initrd, "initrd", image_fix)
        elif isinstance(boot, DiskBoot):
            self._check_file(boot.disk, "disk image", "correct the disk path in the spec")
        firmware = boot.firmware
        if firmware is not None:
            fw_fix = "install the firmware (the lab provides TDVF/OVMF) or correct the path"
            self._check_file(firmware.path, "firmware", fw_fix)
            if firmware.vars_path:
                self._check_file(firmware.vars_path, "firmware variable store", fw_fix)
        self._check_backend(self.spec.backend, "memory backend")
        if self.spec.virtio_mem is not None:
            self._check_backend(self.spec.virtio_mem.backend, "virtio-mem backend")
        # With a prefix (a private loader running a newer QEMU), the first and the
        # last word are programs: the loader and QEMU itself.
        for program in dict.fromkeys((self.binary[0], self.binary[-1])):
            if shutil.which(program) is None and not os.path.isfile(program):
                raise QemuError(
                    f"QEMU binary {program} not found",
                    "run ci/setup-host.sh (installs QEMU from bookworm-backports) or pass --qemu",
                )
        setpriv_path()

    # --- start -------------------------------------------------------------------------

    def _argv(self, plumbing: Plumbing) -> list[str]:
        return build_argv(self.spec, plumbing, self.binary)

    def _write_evidence(self, argv: list[str]) -> None:
        (self.evidence_dir / "argv.json").write_text(json.dumps(argv, indent=1) + "\n")
        script = render_run_sh(
            self.spec, self.binary, header=self._run_sh_header(), extra_args=self.extra_args
        )
        run_sh = self.evidence_dir / "run.sh"
        run_sh.write_text(script)
        run_sh.chmod(0o755)

    def _run_sh_header(self) -> str:
        return (
            f"cvmlab reproducer for machine {self.spec.name!r}: the QEMU command the test ran\n"
            "(the QMP socket moves to $RUNDIR; the console is this terminal)."
        )

    def start(self, timeout: float = 60) -> None:
        """Launch QEMU and connect QMP (and read the SSH port). Does not wait for the guest.

        Raises SpecError/QemuError before launching when something is missing, and
        LaunchError (QEMU's message in one line, its stderr in `detail`) when QEMU
        exits while starting; nothing is left running after an error.
        """
        if self._proc is not None:
            raise QemuError("the machine was already started", "use a new Machine for a new run")
        self.preflight()
        self.evidence_dir.mkdir(parents=True, exist_ok=True)
        if self.human_qmp:
            # A short private directory: AF_UNIX paths must stay under 108 bytes, and
            # avocado's work directories are longer than that. mkdtemp makes it 0700.
            self.rundir = Path(tempfile.mkdtemp(prefix="cvmlab-", dir=_short_tempdir()))
        # Our QMP channel is a connected socket pair: QEMU inherits one end, we keep
        # the other, so there is no socket file to wait for and none to clean up.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        trace = str(self.evidence_dir / "trace.log") if self.spec.trace_events else None
        human = self.human_qmp_socket
        argv = self._argv(
            Plumbing(
                qmp_socket="",
                qmp_fd=theirs.fileno(),
                serial="stdio",
                trace_file=trace,
                extra_qmp_socket=str(human) if human is not None else None,
            )
        )
        argv += self.extra_args
        if self.incoming:
            argv += ["-incoming", "defer"]
        try:
            self._write_evidence(argv)
            self._serial_log = open(self.evidence_dir / "serial.log", "wb", buffering=0)  # noqa: SIM115
            self._stderr_file = open(self.evidence_dir / "qemu.stderr", "wb")  # noqa: SIM115
            self.qmp.subscribe("GUEST_PANICKED", self._on_guest_panicked)
            self.qmp.subscribe("SHUTDOWN", self._on_shutdown_event)
            launched = self._record("launch", argv=argv)
            self.timings["launch"] = launched
            self._proc = spawn(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr_file,
                pass_fds=[theirs.fileno()],
            )
        except BaseException:
            ours.close()
            self._release()
            raise
        finally:
            # QEMU has its copy (or never will): ours would keep the pair open past its exit.
            theirs.close()
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._record("spawned", pid=self._proc.pid)
        self._serial_thread = threading.Thread(
            target=self._pump_serial, name=f"cvmlab-serial-{self._proc.pid}", daemon=True
        )
        self._serial_thread.start()
        self._exit_thread = threading.Thread(
            target=self._watch_exit, name=f"cvmlab-exit-{self._proc.pid}", daemon=True
        )
        self._exit_thread.start()
        try:
            self.qmp.connect_socket(ours, deadline=launched + timeout, alive=self._alive)
            self.timings["qmp_up"] = self._record("qmp-up", seconds=round(now() - launched, 6))
            if self.spec.ssh_forward:
                self.ssh_port = self.qmp.ssh_forward_port()
                if self.ssh_port is None:
                    raise QmpError(
                        "QEMU did not report the SSH forward port (info usernet)",
                        "see qmp.jsonl for what it answered",
                    )
                self._record("ssh-port", port=self.ssh_port)
        except CvmlabError as error:
            self._fail_start(error)
        except BaseException:
            self.kill()
            raise

    def _alive(self) -> bool:
        return self._proc is not None and not self._exited.is_set() and self._proc.poll() is None

    def _fail_start(self, error: CvmlabError) -> None:
        """Turn a failed start into one clear error, leaving nothing running."""
        if isinstance(error, LaunchError):
            # QEMU closed its monitor while exiting: give the exit watcher a moment
            # to reap it, so the error carries QEMU's own reason.
            self._exited.wait(QUIT_TIMEOUT)
        if self._alive():
            self.kill()
            raise error
        self._exited.wait(SIGKILL_TIMEOUT)
        stderr = self.stderr_text()
        status = self.returncode
        self.kill()
        raise LaunchError(
            f"QEMU exited while starting (status {status}): {_first_error_line(stderr)}",
            "fix the machine spec; run.sh in the evidence directory is the exact command",
            detail=stderr.strip(),
        ) from None

    # --- threads: console pump and exit watcher --------------------------------------

    def _pump_serial(self) -> None:
        """Copy QEMU's stdout (the guest console) to serial.log and the console, by line."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        log = self._serial_log
        with proc.stdout:
            for raw in iter(proc.stdout.readline, b""):
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if log is not None:
                    with contextlib.suppress(OSError, ValueError):
                        log.write(text.encode("utf-8", "replace") + b"\n")
                try:
                    self.console.feed(text)
                except Exception:
                    # This thread must keep draining the pipe whatever happens: a
                    # QEMU blocked on a full console pipe stops the guest and
                    # ignores QMP `quit`.
                    _log.exception("console line handling failed; console kept draining")

    def _watch_exit(self) -> None:
        """Reap QEMU the moment it exits and tell every waiter."""
        proc = self._proc
        assert proc is not None
        status = proc.wait()
        exited = now()
        # Drain the console first, so a crash printed just before the exit is seen
        # as the crash it is, not as a bare exit.
        if self._serial_thread is not None:
            self._serial_thread.join(5)
        self.returncode = status
        self.timings["exited"] = exited
        self._record("exited", t=exited, status=status)
        self.console.end(f"QEMU exited with status {status}")
        self._exited.set()
        for shell in self._registered_shells():
            shell.interrupt(self._gone_error_or_exit)

    # --- crash handling ---------------------------------------------------------------

    def _on_crash(self, report: CrashReport) -> None:
        """First crash report wins; it interrupts every waiter on the guest."""
        with self._lock:
            first = self.crashed is None
            if first:
                self.crashed = report
        if not first:
            return
        self._record("crash", via=report.source, line=report.line)
        self.console.note_crash(report)
        for shell in self._registered_shells():
            shell.interrupt(self.crash_error)

    def _on_guest_panicked(self, event: QmpEvent) -> None:
        self._on_crash(
            CrashReport(
                source="qmp",
                t=event.t,
                line=f"QMP GUEST_PANICKED {json.dumps(event.data, sort_keys=True)}",
                context=self.console.tail(40),
                console=self.console,
            )
        )

    def _on_shutdown_event(self, event: QmpEvent) -> None:
        self._record("shutdown-event", t=event.t, **event.data)

    def crash_error(self) -> GuestCrashed:
        """GuestCrashed for the current crash, with the freshest console evidence."""
        report = self.crashed
        if report is None:
            return GuestCrashed("the guest crashed", "see serial.log")
        self.console.wait_settled(CRASH_SETTLE_TIMEOUT)
        return report.error()

    def _gone_error(self) -> BaseException | None:
        """Why the guest cannot be reached, or None while it can."""
        if self.crashed is not None:
            return self.crash_error()
        if self._exited.is_set():
            return GuestError(
                f"QEMU exited (status {self.returncode}) while the guest was in use",
                "see serial.log and qemu.stderr",
                detail=self.stderr_text().strip(),
            )
        return None

    def _gone_error_or_exit(self) -> BaseException:
        return self._gone_error() or GuestError("QEMU exited", "see qemu.stderr")

    # --- guest readiness and access ------------------------------------------------------

    def wait_ready(self, timeout: float = 120) -> float:
        """Wait for the image's readiness line on the console; returns its now() stamp.

        Raises GuestCrashed at once on a crash, LaunchError when QEMU exits first,
        GuestError at the timeout.
        """
        if self.ready_marker is None:
            raise SpecError(
                "this machine has no ready marker to wait for",
                "pass ready_marker= (the image manifest's ready_marker) to Machine",
            )
        if self._proc is None:
            raise QemuError("the machine has not been started", "call start() first")
        try:
            line = self.console.wait_for(self.ready_marker, timeout)
        except GuestCrashed:
            raise self.crash_error() from None
        except GuestError as error:
            if self.crashed is not None:
                raise self.crash_error() from None
            if self._exited.is_set():
                raise LaunchError(
                    f"QEMU exited (status {self.returncode}) before the guest was ready",
                    "see serial.log for how far the guest got and qemu.stderr for QEMU",
                    detail="\n".join([self.stderr_text().strip(), *self.console.tail(20)]),
                ) from None
            self._record_stuck_vcpus()
            raise error from None
        self.timings["ready"] = line.t
        self._record("ready", t=line.t, seconds=round(line.t - self.timings["launch"], 6))
        return line.t

    def _record_stuck_vcpus(self) -> None:
        """Evidence for a guest that never got ready: QEMU's run state and the vCPUs'
        registers (HMP `info registers`: QMP has no command for them) in the timeline.

        A silent console says nothing about where a guest hangs; RIP and CR0/CR3 do
        (nested guests in the lab, 2 of 9 boots in one run, hung or reset early).
        """
        try:
            status = self.qmp.execute("query-status", timeout=5)
            registers = self.qmp.human_monitor("info registers -a")
        except CvmlabError as error:
            self._record("stuck", error=str(error))
            return
        self._record("stuck", status=status, registers=registers)

    def mark_ready(self, how: str) -> float:
        """Record that the guest is ready without its console marker (restored from a
        snapshot: it printed the marker before it was saved); returns the now() stamp."""
        if self._proc is None:
            raise QemuError("the machine has not been started", "call start() first")
        self.ready_by = how
        t = now()
        self.timings["ready"] = t
        self._record("ready", t=t, by=how, seconds=round(t - self.timings["launch"], 6))
        return t

    def _registered_shells(self) -> list[GuestShell]:
        with self._lock:
            return list(self._shells)

    def ssh(
        self, user: str, key: Path, host_key: str | None = None, timeout: float = 60
    ) -> GuestShell:
        """A connected shell into the guest; a crash interrupts it; shutdown closes it."""
        if self.ssh_port is None:
            raise SpecError(
                "this machine has no SSH forward", "set ssh_forward on (the default) in the spec"
            )
        from orchestrator.guest.ssh import GuestShell  # paramiko: only when a shell is opened

        shell = GuestShell(
            self.ssh_port, user, Path(key), host_key=host_key, timeline=self.timeline,
            crash_error=self._gone_error,
        )  # fmt: skip
        with self._lock:
            self._shells.append(shell)
        # A crash that came before registration would otherwise be missed.
        gone = self._gone_error()
        if gone is not None:
            shell.interrupt(lambda: gone)
        try:
            shell.open(timeout)
        except BaseException:
            self._forget_shell(shell)
            raise
        return shell

    def _forget_shell(self, shell: GuestShell) -> None:
        shell.close()
        with self._lock:
            if shell in self._shells:
                self._shells.remove(shell)

    # --- stopping ------------------------------------------------------------------------

    def _wait_exit(self, timeout: float) -> bool:
        return self._exited.wait(max(0.0, timeout))

    def wait_exited(self, timeout: float) -> int | None:
        """Wait for QEMU to exit on its own (e.g. after a guest panic); its status or None."""
        if self._proc is None:
            raise QemuError("the machine has not been started", "call start() first")
        return self.returncode if self._wait_exit(timeout) else None

    def _guest_can_power_down(self) -> bool:
        """Powerdown needs a guest that booted far enough to run its ACPI handler."""
        if self.crashed is not None or not self.qmp.connected:
            return False
        if self.ready_by is not None:
            return True
        if self.ready_marker is None:
            return False
        return self.console.find(self.ready_marker) is not None

    def shutdown(self, timeout: float = 30) -> str:
        """Stop QEMU by the gentlest rung that works, reap it and release everything.

        Rungs: "powerdown" (ACPI; the guest powers off, up to `timeout` s; only for a
        guest that printed its ready line), "quit" (QMP), "sigterm", "sigkill".
        Returns the rung that ended QEMU, "exited" when it had already exited, or
        "not-started". Idempotent: a second call returns the first answer.
        """
        if self.shutdown_rung is not None:
            return self.shutdown_rung
        if self._proc is None:
            self._release()
            self.shutdown_rung = "not-started"
            return self.shutdown_rung
        started = now()
        self.timings["shutdown"] = started
        for shell in self._registered_shells():
            self._forget_shell(shell)
        rung = "exited" if self._exited.is_set() else None
        if rung is None and self._guest_can_power_down():
            mark = self.qmp.mark()
            with contextlib.suppress(QmpError):
                self.qmp.execute("system_powerdown", timeout=QUIT_TIMEOUT)
                self.qmp.record_note("shutdown-rung", rung="powerdown", mark=mark)
                if self._wait_exit(timeout):
                    rung = "powerdown"
        if rung is None and self.qmp.connected:
            with contextlib.suppress(QmpError):
                self.qmp.record_note("shutdown-rung", rung="quit")
                # QEMU may exit before its reply is read: that is success too.
                self.qmp.execute("quit", timeout=QUIT_TIMEOUT)
            if self._wait_exit(QUIT_TIMEOUT):
                rung = "quit"
        if rung is None:
            rung = self._signal_rungs()
        seconds = now() - started
        self.qmp.record_note("shutdown", rung=rung, seconds=round(seconds, 6))
        self._record("shutdown", rung=rung, seconds=round(seconds, 6), status=self.returncode)
        self.shutdown_rung = rung
        self._release()
        return rung

    def _signal_rungs(self) -> str:
        proc = self._proc
        assert proc is not None
        self.qmp.record_note("shutdown-rung", rung="sigterm")
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if self._wait_exit(SIGTERM_TIMEOUT):
            return "sigterm"
        self.qmp.record_note("shutdown-rung", rung="sigkill")
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        if not self._wait_exit(SIGKILL_TIMEOUT):
            raise QemuError(
                f"QEMU (pid {proc.pid}) did not exit after SIGKILL",
                "it is stuck in the kernel (D state); see /proc/<pid>/stack and the host log",
            )
        return "sigkill"

    def kill(self) -> None:
        """SIGKILL QEMU at once (no ladder), reap it and release everything."""
        proc = self._proc
        if proc is not None and not self._exited.is_set():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            self._wait_exit(SIGKILL_TIMEOUT)
            if self.shutdown_rung is None:
                self.shutdown_rung = "killed"
                self._record("killed", status=self.returncode)
        self._release()

    def _remove_rundir(self) -> None:
        if self.rundir is not None and self.rundir.exists():
            shutil.rmtree(self.rundir, ignore_errors=True)

    def _release(self) -> None:
        """Close every channel, file and thread this machine holds (after QEMU exited)."""
        if self._released:
            return
        if self._proc is not None and not self._exited.is_set():
            return  # still running: only shutdown()/kill() may release
        self._released = True
        for shell in self._registered_shells():
            self._forget_shell(shell)
        if self._exit_thread is not None:
            self._exit_thread.join(5)
        if self._serial_thread is not None:
            self._serial_thread.join(5)
        self.qmp.close()
        for handle in (self._serial_log, self._stderr_file):
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        self._remove_rundir()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.shutdown()
            return
        # An exception is on its way: stop the machine without masking it.
        try:
            self.shutdown()
        except Exception:
            self.kill()

