"""A real QEMU with a connected QMP session, for tests that need QEMU but no guest.

`started_qemu(command, *args)` starts `command` (a path or an argv prefix) with `args`,
a QMP socket and a `-D` trace file in a short 0700 run dir, through
`orchestrator.qemu.spawn` (so it dies with the test process), connects a
`QmpSession`, and on exit quits QEMU, reaps it (SIGKILL after 10 s) and removes the
run dir. The machine itself (e.g. `-machine none`, or q35 with `-S`) is the caller's.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import QmpError
from orchestrator.qemu.qmp import QmpSession
from orchestrator.qemu.spawn import spawn
from orchestrator.timeline import now

QEMU = "qemu-system-x86_64"


@dataclass
class RunningQemu:
    proc: subprocess.Popen[bytes]
    qmp: QmpSession
    rundir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def trace_log(self) -> Path:
        return self.rundir / "trace.log"

    @property
    def stderr_log(self) -> Path:
        return self.rundir / "qemu.stderr"


@contextmanager
def started_qemu(command: str | Sequence[str] = QEMU, *args: str) -> Iterator[RunningQemu]:
    """QEMU running `args` with QMP connected; stopped, reaped and cleaned up afterwards."""
    prefix = [command] if isinstance(command, str) else list(command)
    rundir = Path(tempfile.mkdtemp(prefix="cvmlab-test-"))
    rundir.chmod(0o700)
    sock = rundir / "qmp.sock"
    argv = [
        *prefix, "-nodefaults", "-no-user-config", "-display", "none",
        "-chardev", f"socket,id=qmp,path={sock},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control", "-D", str(rundir / "trace.log"), *args,
    ]  # fmt: skip
    with open(rundir / "qemu.stderr", "wb") as stderr:
        proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    qmp = QmpSession()
    try:
        qmp.connect(sock, deadline=now() + 30, alive=lambda: proc.poll() is None)
        yield RunningQemu(proc, qmp, rundir)
    finally:
        try:
            if qmp.connected:
                with contextlib.suppress(QmpError):  # already gone: reaped below
                    qmp.execute("quit")
        finally:
            qmp.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            shutil.rmtree(rundir, ignore_errors=True)
