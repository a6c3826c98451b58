"""A host-wide exclusive lock for tests that measure host-wide counters.

/proc/meminfo is one set of counters for the whole machine. Two tests that
allocate and measure at the same time (avocado runs tests in parallel
processes) would see each other's memory and fail for no fault of the
kernel. Tests that measure or move those counters take this lock for their
whole run; the kernel drops a `flock` when its holder dies, so a killed test
never leaves the lock held. Noise from unrelated processes remains and is
handled with tolerances and `settle.py`.

The lock file is left in place on purpose: removing a flock file races with
the next locker opening it.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from types import TracebackType

from orchestrator.errors import HostError

LOCK_DIRS = ("/run/lock", tempfile.gettempdir())


def lock_path(name: str) -> str:
    """Where the lock file of `name` lives: /run/lock when writable, else the temp dir."""
    for directory in LOCK_DIRS:
        if os.path.isdir(directory) and os.access(directory, os.W_OK):
            return os.path.join(directory, f"cvmlab-{name}.lock")
    raise HostError("no writable lock directory", f"make one of {', '.join(LOCK_DIRS)} writable")


class HostLock:
    """`with HostLock("meminfo", timeout=120):` waits for and holds the named lock."""

    def __init__(self, name: str, timeout: float = 120.0, interval: float = 0.05) -> None:
        self.name = name
        self.path = lock_path(name)
        self.timeout = timeout
        self.interval = interval
        self._fd: int | None = None
        self.waited = 0.0

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        start = time.monotonic()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() - start >= self.timeout:
                        raise HostError(
                            f"host lock {self.path} still held after {self.timeout:.0f} s",
                            "another cvmlab test measuring host memory is running or hung; "
                            "wait for it or find its pid with `fuser " + self.path + "`",
                        ) from None
                    time.sleep(self.interval)  # polling the lock with a deadline
        except BaseException:
            os.close(fd)
            raise
        self.waited = time.monotonic() - start
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only fd drops the flock

    def __enter__(self) -> HostLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
