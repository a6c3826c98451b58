"""One lab run: boot the kernel under test under TCG, run one command inside, bring back
its exit status and output.

The outer QEMU runs `-accel tcg -cpu max` (TCG emulates AMD SVM with nested paging, so
kvm_amd loads inside), boots the kernel with the lab's initramfs, and exports over
virtio 9p: the host's root read-only (`hostroot`), a private run directory
(`cvmlabrun`: the command, its output, its status) and the writable paths (the
checkout, results, the cvmlab cache) at their own paths. The command's stdout and stderr
are files in the run directory; they are streamed to ours while the lab runs.

Failure is one `LabError` with the console lines: a kernel that panics (reported as soon
as its panic line is on the console, QEMU then exits by `panic=-1` + `-no-reboot`), a
lab that does not finish by its deadline (killed), a command not found inside, a kernel
without KVM. QEMU is started through `orchestrator.qemu.spawn`, so it dies with us even
when we are SIGKILLed, and everything inside it with it.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from orchestrator.errors import LabError
from orchestrator.guest.serial import crash_lines
from orchestrator.image.pvh import KernelEntry
from orchestrator.lab import entry_points, inside
from orchestrator.lab.initramfs import lab_initrd
from orchestrator.lab.kernels import LabKernel
from orchestrator.qemu.spawn import spawn

Progress = Callable[[str], None]

# cmdline: panic=-1 with -no-reboot ends QEMU at a panic; loglevel=4 keeps warnings and
# worse on the console (the emulated UART is slow under TCG); amd_pstate: as the image's.
# tsc=reliable: under a loaded TCG the clocksource watchdog can demote the TSC to HPET,
# whose every read is an emulated MMIO access; mitigations=off: the lab's kernel is
# throwaway and its speculation barriers cost emulated instructions on every entry.
# cryptomgr.notests and three initcalls that run crypto self-tests (jitter-entropy RNG,
# SP800-108 KDF, encrypted keys): as the guest image's (images/minimal/recipe.yaml), the
# kernel's crypto is not what the lab qualifies.
KERNEL_CMDLINE = (
    "console=ttyS0 panic=-1 loglevel=4 rdinit=/init tsc=reliable mitigations=off "
    "cryptomgr.notests "
    "initcall_blacklist=amd_pstate_init,jent_mod_init,crypto_kdf108_init,init_encrypted"
)
# Modules the runner loads inside (kvm_amd pulls in kvm, ccp, irqbypass).
LOAD_MODULES = ("kvm_amd",)
DEFAULT_MEMORY_MIB = 4096
DEFAULT_CPUS = 2
DEFAULT_TIMEOUT_S = 3600.0
# From QEMU's start to the command running: 8-25 s measured (loaded 2-core host). A
# kernel that has not got there by then is stuck (seen once: the sw-protected kernel on
# 2 vCPUs beside make test's host jobs went idle before init's first line, and the lab
# waited for its whole hour). A kernel with slow debug options needs --boot-timeout.
DEFAULT_BOOT_TIMEOUT_S = 300.0
# After a panic line, how long to collect console lines before stopping QEMU.
PANIC_GRACE_S = 3.0
# How often the command's output files are copied to ours while nothing else happens.
STREAM_INTERVAL_S = 0.2
RUN_PREFIX = "cvmlab-lab-"
#: Where init.sh mounts the run directory inside the lab.
RUN_DIR_INSIDE = "/run/cvmlab-lab"
ENTRY_POINTS_FILE = "entry_points.json"
# Environment variables that must not cross into the lab (paths that do not exist there).
_ENV_DROPPED = ("TMPDIR", "SSH_AUTH_SOCK", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")


@dataclass(frozen=True)
class LabConfig:
    """What to run, on which kernel, with what machine around it."""

    kernel: LabKernel
    argv: tuple[str, ...]
    cwd: Path
    writable: tuple[Path, ...]  # exported read-write at their own paths
    env: Mapping[str, str] = field(default_factory=dict)
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = DEFAULT_CPUS
    numa_nodes: int = 1
    settings: Mapping[str, str] = field(default_factory=dict)  # /proc/sys or /sys file -> value
    load_modules: tuple[str, ...] = LOAD_MODULES
    require_kvm: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S
    boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S
    qemu: tuple[str, ...] = ("qemu-system-x86_64",)
    #: How the kernel is entered (orchestrator/image/pvh.py); None: the bzImage as it is.
    entry: KernelEntry | None = None

    @property
    def boot_kernel(self) -> Path:
        """What `-kernel` gets: the PVH ELF unpacked from the kernel's bzImage, or it."""
        return self.entry.path if self.entry is not None else self.kernel.vmlinuz


@dataclass
class LabResult:
    """How the run ended, with the facts measured inside and the timings."""

    status: int
    kernel: LabKernel
    inside: dict[str, Any]
    console: list[str]
    start_to_running_s: float | None  # QEMU start -> the command about to run
    wall_s: float
    qemu_argv: list[str]
    kernel_dmesg: str = ""
    entry: KernelEntry | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "kernel": self.kernel.to_json(),
            "kernel_entry": self.entry.to_json() if self.entry is not None else None,
            "inside": self.inside,
            "start_to_running_s": self.start_to_running_s,
            "wall_s": self.wall_s,
            "qemu_argv": self.qemu_argv,
        }


def share_list(writable: Sequence[Path]) -> list[Path]:
    """The writable paths to export: resolved, deduplicated, none inside another."""
    resolved = sorted({p.resolve() for p in writable}, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for path in resolved:
        if path == Path("/"):
            raise LabError("the host's root cannot be writable in the lab", "name a directory")
        if not path.is_dir():
            raise LabError(f"writable path {path} is not a directory", "create it first")
        if not any(path.is_relative_to(parent) for parent in kept):
            kept.append(path)
    return kept


def lab_argv(config: LabConfig, initrd: Path, rundir: Path) -> list[str]:
    """The outer QEMU's command line (pure: a function of its inputs)."""
    argv = [
        *config.qemu,
        "-name", f"cvmlab-lab-{config.kernel.release}",
        "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max",
        "-smp", str(config.cpus), "-m", f"{config.memory_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(config.boot_kernel), "-initrd", str(initrd),
        "-append", KERNEL_CMDLINE,
    ]  # fmt: skip
    if config.numa_nodes > 1:
        nodes = config.numa_nodes
        size = config.memory_mib // nodes
        if size * nodes != config.memory_mib:
            raise LabError(
                f"{config.memory_mib} MiB cannot be split evenly over {nodes} NUMA nodes",
                f"pass --memory as a multiple of {nodes} MiB",
            )
        for node in range(nodes):
            argv += ["-object", f"memory-backend-ram,id=lab-ram{node},size={size}M"]
            cpus = [c for c in range(config.cpus) if c % nodes == node]
            cpu_opt = (
                f",cpus={cpus[0]}-{cpus[-1]}"
                if cpus and len(cpus) == cpus[-1] - cpus[0] + 1
                else ""
            )
            argv += ["-numa", f"node,nodeid={node}{cpu_opt},memdev=lab-ram{node}"]
    shares = [("hostroot", Path("/"), True), ("cvmlabrun", rundir, False)]
    shares += [(f"rw{i}", path, False) for i, path in enumerate(share_list(config.writable))]
    for tag, path, readonly in shares:
        options = f"local,id={tag},path={path},security_model=none,multidevs=remap"
        argv += ["-fsdev", options + (",readonly=on" if readonly else "")]
        argv += ["-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
    return argv


def lab_environment(base: Mapping[str, str], kernel: LabKernel, qemu: str) -> dict[str, str]:
    """The command's environment inside: ours, minus host-only paths, plus the lab's facts."""
    env = {k: v for k, v in base.items() if k not in _ENV_DROPPED}
    env.update(
        CVMLAB_LAB="1",
        CVMLAB_LAB_KERNEL=kernel.release,
        CVMLAB_LAB_KERNEL_ORIGIN=kernel.origin,
        CVMLAB_LAB_HOST_KERNEL=os.uname().release,
        CVMLAB_LAB_OUTER_QEMU=qemu,
    )
    return env


def sweep_stale_rundirs(parent: Path) -> None:
    """Remove run directories of lab runs whose process is gone (a SIGKILLed cvmlab)."""
    for path in parent.glob(f"{RUN_PREFIX}*"):
        pid_text = path.name.removeprefix(RUN_PREFIX).split("-", 1)[0]
        if pid_text.isdigit() and not Path(f"/proc/{pid_text}").exists():
            shutil.rmtree(path, ignore_errors=True)


class _Streamer:
    """Copies what the command appended to a run-dir file into one of our streams."""

    def __init__(self, source: Path, sink: IO[bytes] | None) -> None:
        self.source = source
        self.sink = sink
        self.offset = 0

    def pump(self) -> None:
        if self.sink is None:
            return
        try:
            with self.source.open("rb") as stream:
                stream.seek(self.offset)
                chunk = stream.read()
        except FileNotFoundError:
            return
        if chunk:
            self.offset += len(chunk)
            self.sink.write(chunk)
            self.sink.flush()


def _write_run_dir(config: LabConfig, rundir: Path) -> None:
    shares = share_list(config.writable)
    (rundir / "mounts").write_text("".join(f"rw{i} {path}\n" for i, path in enumerate(shares)))
    shutil.copy(inside.__file__, rundir / "inside.py")
    # The lab's avocado finds its plugins in this table (orchestrator.lab.entry_points).
    (rundir / ENTRY_POINTS_FILE).write_text(entry_points.table_json())
    env = {**config.env, entry_points.TABLE_ENV: f"{RUN_DIR_INSIDE}/{ENTRY_POINTS_FILE}"}
    (rundir / "lab.json").write_text(
        json.dumps(
            {
                "argv": list(config.argv),
                "cwd": str(config.cwd),
                "env": env,
                "modules_dir": str(config.kernel.modules_dir)
                if config.kernel.modules_dir
                else None,
                "load_modules": list(config.load_modules) if config.kernel.modules_dir else [],
                "settings": dict(config.settings),
                "require_kvm": config.require_kvm,
                "hostname": socket.gethostname(),
            },
            indent=2,
        )
    )


def run_lab(
    config: LabConfig,
    *,
    stdout: IO[bytes] | None = None,
    stderr: IO[bytes] | None = None,
    console_log: Path | None = None,
    progress: Progress = lambda _m: None,
) -> LabResult:
    """Boot the lab, run the command, return how it ended (or raise LabError)."""
    if not config.argv:
        raise LabError("no command to run in the lab", "put it after --: cvmlab lab -- CMD")
    if not config.cwd.is_dir():
        raise LabError(f"working directory {config.cwd} does not exist", "run from an existing one")
    initrd = lab_initrd(config.kernel, config.load_modules)
    parent = Path(tempfile.gettempdir())
    sweep_stale_rundirs(parent)
    rundir = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=parent))
    try:
        _write_run_dir(config, rundir)
        argv = lab_argv(config, initrd, rundir)
        progress(
            f"booting {config.kernel.release} under TCG ({config.memory_mib} MiB, "
            f"{config.cpus} vCPUs)"
        )
        return _run(config, argv, rundir, stdout, stderr, console_log)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _run(
    config: LabConfig,
    argv: list[str],
    rundir: Path,
    stdout: IO[bytes] | None,
    stderr: IO[bytes] | None,
    console_log: Path | None,
) -> LabResult:
    started = time.monotonic()
    deadline = started + config.timeout_s
    boot_limit = min(config.boot_timeout_s, config.timeout_s)
    boot_deadline = started + boot_limit
    boot_stuck = False
    streams = [_Streamer(rundir / "stdout", stdout), _Streamer(rundir / "stderr", stderr)]
    console: list[str] = []
    partial = b""
    running_at: float | None = None
    panic_at: float | None = None
    # Unbuffered: the console file is read while the lab runs (tail -f, tests).
    log = console_log.open("ab", buffering=0) if console_log else None
    finished = False  # the console ended by itself: QEMU is exiting, give it a moment
    with tempfile.TemporaryFile() as qemu_stderr:
        proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=qemu_stderr)
        assert proc.stdout is not None
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    now = time.monotonic()
                    if panic_at is not None and now - panic_at > PANIC_GRACE_S:
                        break
                    if now > deadline:
                        break
                    if running_at is None and now > boot_deadline:
                        boot_stuck = True
                        break
                    events = selector.select(min(STREAM_INTERVAL_S, max(deadline - now, 0)))
                    for stream in streams:
                        stream.pump()
                    if not events:
                        continue
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        finished = True  # QEMU closed the console: it is exiting
                        break
                    if log is not None:
                        log.write(chunk)
                    *lines, partial = (partial + chunk).split(b"\n")
                    for raw in lines:
                        line = raw.decode(errors="replace").rstrip("\r")
                        console.append(line)
                        if running_at is None and inside.READY_MARKER in line:
                            running_at = time.monotonic() - started
                        if panic_at is None and crash_lines(
                            [line], (r"Kernel panic - not syncing",)
                        ):
                            panic_at = time.monotonic()
        finally:
            if log is not None:
                log.close()
            # A panic, the deadline or an exception (SIGTERM, ^C) stops QEMU at once.
            status = _stop(proc, grace=5.0 if finished else 0.0)
            for stream in streams:
                stream.pump()
            proc.stdout.close()
        qemu_stderr.seek(0)
        qemu_errors = qemu_stderr.read().decode(errors="replace").strip()
    wall = time.monotonic() - started
    tail = "\n".join(console[-40:])
    if panic_at is not None:
        first = next(i for i, ln in enumerate(console) if "Kernel panic" in ln)
        raise LabError(
            f"kernel {config.kernel.release} panicked in the lab: {console[first].strip()}",
            "see the console lines below (and the lab's console.log)",
            detail="\n".join(console[max(0, first - 30) : first + 30]),
        )
    status_file = rundir / "status"
    if boot_stuck:
        raise LabError(
            f"kernel {config.kernel.release} did not start the lab's command within "
            f"{boot_limit:g} s of QEMU's start (stopped)",
            "see the console's last lines below; a kernel that boots slowly (debug options)"
            " needs --boot-timeout",
            detail="\n".join(filter(None, [qemu_errors, tail])),
        )
    if not status_file.exists():
        if time.monotonic() > deadline:
            raise LabError(
                f"the lab did not finish within {config.timeout_s:g} s (stopped)",
                "raise --timeout, or see the console's last lines below",
                detail=tail,
            )
        why = f"QEMU exited with status {status}" if status is not None else "QEMU was stopped"
        raise LabError(
            f"the lab ended without the command's exit status ({why})",
            "see QEMU's stderr and the console's last lines below",
            detail="\n".join(filter(None, [qemu_errors, tail])),
        )
    error_file = rundir / "error"
    inside_facts = _read_json(rundir / "inside.json")
    if error_file.exists():
        raise LabError(
            error_file.read_text().strip(),
            "check the command (inside, the host's root is mounted read-only at /) "
            "or the kernel's KVM support",
            detail=json.dumps(inside_facts, indent=2),
        )
    dmesg_file = rundir / "dmesg.txt"
    return LabResult(
        status=int(status_file.read_text().strip() or 1),
        kernel=config.kernel,
        inside=inside_facts,
        console=console,
        start_to_running_s=running_at,
        wall_s=wall,
        qemu_argv=argv,
        kernel_dmesg=dmesg_file.read_text() if dmesg_file.exists() else "",
        entry=config.entry,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stop(proc: subprocess.Popen[bytes], grace: float) -> int | None:
    """QEMU's exit status once it is gone; one still running after `grace` s is killed (None)."""
    try:
        return proc.wait(timeout=grace) if grace > 0 else _kill(proc)
    except subprocess.TimeoutExpired:
        return _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None
