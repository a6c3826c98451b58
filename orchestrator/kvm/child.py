"""Run a risky memory access in a forked child and report how the child ended.

A host read of inaccessible guest_memfd memory is answered with SIGBUS, which
would kill the test process itself; a child takes the hit instead. The parent
waits on a pidfd with a deadline (no sleep loop), kills the child if the
deadline passes, and always reaps it, so no child outlives the call.
"""

from __future__ import annotations

import faulthandler
import os
import resource
import select
import signal
from collections.abc import Callable
from dataclasses import dataclass

# Exit status a child uses when `action` raised a Python exception.
CHILD_RAISED = 70


@dataclass(frozen=True)
class ChildOutcome:
    """How a child ended: by `exit_code`, or killed by `signal_number`."""

    pid: int
    exit_code: int | None
    signal_number: int | None
    timed_out: bool

    @property
    def killed_by(self) -> str:
        """The signal's name ("SIGBUS"), or "" when the child exited."""
        if self.signal_number is None:
            return ""
        return signal.Signals(self.signal_number).name

    def describe(self) -> str:
        if self.timed_out:
            return f"child {self.pid} did not finish before the deadline and was killed"
        if self.signal_number is not None:
            return f"child {self.pid} was killed by {self.killed_by}"
        if self.exit_code == CHILD_RAISED:
            return f"child {self.pid} raised a Python exception (exit {CHILD_RAISED})"
        return f"child {self.pid} exited with status {self.exit_code}"


def _child_main(action: Callable[[], object]) -> None:
    status = 0
    try:
        # A SIGBUS is expected here: no core file, no faulthandler traceback.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        faulthandler.disable()
        action()
    except BaseException:  # any failure: the exit status is all the parent needs
        status = CHILD_RAISED
    finally:
        os._exit(status)


def run_in_child(action: Callable[[], object], timeout: float = 10.0) -> ChildOutcome:
    """Fork, run `action` in the child, and return how the child ended.

    The child exits 0 if `action` returns, `CHILD_RAISED` if it raises, or dies
    of a signal. After `timeout` seconds the parent kills it with SIGKILL.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child only
        _child_main(action)
    timed_out = False
    try:
        pidfd = os.pidfd_open(pid)
        try:
            readable, _, _ = select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if not readable:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ChildOutcome(pid, None, os.WTERMSIG(status), timed_out)
    return ChildOutcome(pid, os.WEXITSTATUS(status), None, timed_out)
