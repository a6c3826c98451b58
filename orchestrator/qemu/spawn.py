"""Start child processes that cannot outlive the Python process that started them.

QEMU must never run on after its test: a killed test runner must take its guests
with it. Linux offers `PR_SET_PDEATHSIG`: the child receives a signal when its
parent dies. Two details make it subtle, and this module handles both:

1. "Parent" is the *thread* that forked, not the process. When that thread exits,
   the kernel reparents the child (to a sibling thread) and delivers the signal
   right then. avocado runs each test in a worker thread, and scripts may start
   machines from short-lived threads, so we never fork from the caller's thread:
   every spawn is handed to one dedicated spawner thread that lives as long as the
   process (a daemon thread, never joined).

2. The parent can die between `fork()` and the child's `prctl()`. The child is then
   already reparented and no signal will ever come. The child closes this race by
   checking, *after* the prctl, that its parent is still the pid that spawned it,
   and exits otherwise.

How the child sets the flag: we exec `setpriv --pdeathsig KILL` (util-linux),
which calls prctl and execs `/bin/sh`, which compares `$PPID` with the spawner's
pid and then `exec`s the real program. The death signal survives both execs (it
is only cleared for set-user-ID programs), and the pid stays the same, so the pid
`Popen` returns is the final program's pid. We chose this over a Python
`preexec_fn` because a `preexec_fn` runs Python code in the child of a
multi-threaded process (our QMP loop, serial readers and paramiko threads), which
the subprocess documentation warns may deadlock; the exec chain runs no Python
between fork and exec and lets subprocess use its fast spawn path.

SIGKILL (not SIGTERM) is the signal: the parent is gone, nobody is left to drive a
graceful shutdown, and QEMU must not linger. Graceful paths (normal exit,
exceptions, timeouts) go through the launcher's shutdown ladder instead.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

from orchestrator.errors import HostError

SETPRIV = "setpriv"

# Runs after setpriv's prctl: $1 is the pid that spawned us. If our parent is
# no longer that pid, it died before the death signal was armed: do not start.
_PARENT_CHECK = 'expected=$1; shift; [ "$PPID" = "$expected" ] || exit 125; exec "$@"'

# The exit status the guard uses when the spawner died before the child armed
# its death signal (125: like `env`/`timeout`, "the wrapper itself failed").
GUARD_PARENT_GONE = 125

_FileArg = int | IO[Any] | None


def setpriv_path() -> str:
    """The setpriv binary, or a HostError saying how to get it."""
    path = shutil.which(SETPRIV)
    if path is None:
        raise HostError(
            "setpriv (util-linux) is not installed: cvmlab needs it so QEMU dies with its test",
            "install util-linux (Debian/Ubuntu/Fedora: package util-linux; older Debian: setpriv)",
        )
    return path


def guarded_argv(argv: Sequence[str], parent_pid: int) -> list[str]:
    """`argv` wrapped so the process gets SIGKILL when the spawning thread dies."""
    if not argv:
        raise ValueError("empty argv")
    return [
        setpriv_path(), "--pdeathsig", "KILL", "--",
        "/bin/sh", "-c", _PARENT_CHECK, "cvmlab-guard", str(parent_pid), *argv,
    ]  # fmt: skip


class _Spawner:
    """One long-lived thread that performs every fork, so the death signal's
    'parent thread' never exits before the process does."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._owner_pid = 0

    def _ensure_thread(self) -> None:
        with self._lock:
            # After os.fork() the child has no spawner thread: start a new one.
            if self._thread is None or self._owner_pid != os.getpid():
                self._requests = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._serve, name="cvmlab-spawner", daemon=True
                )
                self._owner_pid = os.getpid()
                self._thread.start()

    def _serve(self) -> None:
        requests = self._requests
        while True:
            work, future = requests.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as err:  # handed to the caller, who re-raises it
                future.set_exception(err)

    def run(self, work: Callable[[], Any]) -> Any:
        self._ensure_thread()
        future: Future[Any] = Future()
        self._requests.put((work, future))
        return future.result()


_SPAWNER = _Spawner()


def spawn(
    argv: Sequence[str],
    *,
    stdin: _FileArg = subprocess.DEVNULL,
    stdout: _FileArg = None,
    stderr: _FileArg = None,
    cwd: Path | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start `argv` so that it is SIGKILLed if this Python process dies.

    Returns the Popen of the process that becomes `argv[0]` (same pid). The
    process starts in its own process group, so a Ctrl-C at the terminal goes to
    the test runner, which then shuts the machine down in order.
    """
    wrapped = guarded_argv(argv, os.getpid())

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            wrapped,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            start_new_session=True,
        )

    proc: subprocess.Popen[bytes] = _SPAWNER.run(start)
    return proc
