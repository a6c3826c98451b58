"""The lab's runner: runs inside the kernel under test, chrooted into the host's root.

The lab's /init (busybox) mounts everything and starts this file with the host's own
`/usr/bin/python3 -I -S` (stdlib only: no venv is needed at this point). It reads
`lab.json` from the run directory (shared with the host over 9p), makes the kernel's
modules visible to `modprobe`, loads KVM, applies the set-up the caller asked for (huge
pages, sysctls), runs the command with the caller's cwd and environment, and writes
what happened back to the run directory: `status` (the exit status, last), `stdout`,
`stderr`, `inside.json` (facts of the kernel under test), `dmesg.txt`.

Keep it small and dependency-free: it is copied into each run directory, so the host's
version of this file is the one that runs.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_MARKER = "CVMLAB-LAB-RUNNING"


def _console(message: str) -> None:
    try:
        with open("/dev/console", "w") as console:
            console.write(f"cvmlab-lab: {message}\n")
    except OSError:
        pass


def _run(argv: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        return 127, str(error)
    return done.returncode, (done.stdout + done.stderr).strip()


def _modules_base(modules_dir: str | None, report: dict[str, object]) -> str | None:
    """The `modprobe -d` base of <base>/lib/modules/<release>, or None without modules.

    The host's root is read-only and need not have /lib/modules at all, so instead of
    mounting the kernel's modules there, modprobe is pointed at them (`-d`), ours and
    the command's alike (MODPROBE_OPTIONS, which kmod reads).
    """
    if not modules_dir:
        report["modules"] = "none (everything the lab needs is built in, or nothing is)"
        return None
    path = Path(modules_dir)
    base = path.parent.parent.parent
    if path.parent.name != "modules" or path.parent.parent.name != "lib":
        report["modules"] = f"{modules_dir} is not <base>/lib/modules/<release>"
        return None
    report["modules"] = modules_dir
    return str(base)


#: How long the runner waits for /init's background insmods (seconds under TCG: 1.1 s
#: for kvm_amd and its dependencies on 7.3).
EARLY_MODULES_DEADLINE_S = 120.0


def _wait_for_early_modules(report: dict[str, object]) -> None:
    """Wait until /init's background insmod subshell has ended (pidfd: not our child)."""
    pid = os.environ.pop("CVMLAB_EARLY_PID", "")
    if not pid.isdigit():
        return
    started = time.monotonic()
    try:
        fd = os.pidfd_open(int(pid))
    except OSError:
        return  # already gone
    try:
        ready, _, _ = select.select([fd], [], [], EARLY_MODULES_DEADLINE_S)
    finally:
        os.close(fd)
    report["early_modules_wait_s"] = round(time.monotonic() - started, 3)
    if not ready:
        report["early_modules"] = f"still loading after {EARLY_MODULES_DEADLINE_S:g} s"


def _load_modules(names: list[str], base: str | None, report: dict[str, object]) -> None:
    _wait_for_early_modules(report)
    loaded: dict[str, str] = {}
    for name in names:
        if os.path.isdir(f"/sys/module/{name}"):
            loaded[name] = "ok (initramfs)"  # /init loaded it
            continue
        status, output = _run(["modprobe", *(["-d", base] if base else []), name])
        loaded[name] = "ok" if status == 0 else (output or f"modprobe exit {status}")
    report["modprobe"] = loaded


def _write_sysfs(settings: dict[str, str], report: dict[str, object]) -> None:
    """Write /proc/sys and /sys files (huge pages, sysctls); record what was read back."""
    applied: dict[str, str] = {}
    for path, value in settings.items():
        try:
            Path(path).write_text(str(value))
            applied[path] = Path(path).read_text().strip()
        except OSError as error:
            applied[path] = f"error: {error}"
    report["settings"] = applied


def _kvm_facts(report: dict[str, object]) -> None:
    report["dev_kvm"] = os.path.exists("/dev/kvm")
    report["kvm_modules"] = sorted(
        name for name in os.listdir("/sys/module") if name == "kvm" or name.startswith("kvm_")
    )
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(
                (ln.split(":", 1)[1].split() for ln in cpuinfo if ln.startswith("flags")), []
            )
    except OSError:
        flags = []
    report["cpu_flags"] = sorted(set(flags) & {"svm", "npt", "vmx", "hypervisor"})


def main(rundir: Path) -> int:
    started = time.monotonic()
    # Our own tools (modprobe, mount, dmesg) live in sbin; init's PATH is busybox's /bin.
    os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    config = json.loads((rundir / "lab.json").read_text())
    report: dict[str, object] = {"kernel_release": os.uname().release}
    if config.get("hostname"):
        # The outer host's name: results group by machine, the kernel axis is separate.
        socket.sethostname(config["hostname"])
    base = _modules_base(config.get("modules_dir"), report)
    _load_modules(config.get("load_modules", []), base, report)
    env = dict(config["env"])
    if base:
        env["MODPROBE_OPTIONS"] = f"-d {base}"
    _write_sysfs(config.get("settings", {}), report)
    _kvm_facts(report)
    report["setup_s"] = round(time.monotonic() - started, 3)
    report["uptime_at_command_s"] = float(Path("/proc/uptime").read_text().split()[0])
    (rundir / "inside.json").write_text(json.dumps(report, indent=2))
    argv = config["argv"]
    status = 0
    with open(rundir / "stdout", "wb") as out, open(rundir / "stderr", "wb") as err:
        if config.get("require_kvm", True) and not report["dev_kvm"]:
            (rundir / "error").write_text(
                f"kernel {report['kernel_release']} has no /dev/kvm in the lab "
                f"(modprobe: {report.get('modprobe')}; kvm modules: {report['kvm_modules']})"
            )
            status = 125
        else:
            _console(READY_MARKER)
            try:
                status = subprocess.run(
                    argv,
                    cwd=config["cwd"],
                    env=env,
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    check=False,
                ).returncode
                status = status if status >= 0 else 128 - status  # killed by a signal
            except FileNotFoundError:
                (rundir / "error").write_text(f"command not found inside the lab: {argv[0]}")
                status = 127
            except PermissionError as error:
                (rundir / "error").write_text(f"cannot run {argv[0]} inside the lab: {error}")
                status = 126
    _, dmesg = _run(["dmesg"])
    (rundir / "dmesg.txt").write_text(dmesg + "\n")
    # The status file comes last: the host reads its presence as "the command finished".
    (rundir / "status.tmp").write_text(str(status))
    os.replace(rundir / "status.tmp", rundir / "status")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
