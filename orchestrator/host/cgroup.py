"""A cgroup v2 child with the memory controller, for charging tests (H6), always removed.

Made under the root of the cgroup2 hierarchy (the "no internal processes" rule
forbids controllers below a cgroup that holds processes), or under a private
cgroup2 mount when none is mounted (the lab). Processes enter it from a
forked child (`run_inside`), never the test process itself: a memcg OOM
kill must not hit the test. `close()` needs the charges gone (punch or close
what was allocated first), then removes the directory and any private mount.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from orchestrator.errors import HostError
from orchestrator.kvm.child import ChildOutcome, run_in_child


def cgroup2_root() -> Path | None:
    """Where cgroup2 is mounted, from /proc/self/mounts (None: not mounted)."""
    with open("/proc/self/mounts", encoding="ascii") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


def parse_flat_keyed(text: str) -> dict[str, int]:
    """`memory.stat`/`memory.events` ("key value" lines) as a dict."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            result[key] = int(value)
    return result


class MemoryCgroup:
    """`cvmlab-<pid>-<n>` under the cgroup2 root, memory controller enabled."""

    _count = 0

    def __init__(self) -> None:
        self._mounted: Path | None = None
        root = cgroup2_root()
        if root is None:
            self._mounted = Path(tempfile.mkdtemp(prefix="cvmlab-cgroup2-"))
            os.chmod(self._mounted, 0o700)
            done = subprocess.run(["mount", "-t", "cgroup2", "none", str(self._mounted)],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            if done.returncode:
                os.rmdir(self._mounted)
                raise HostError(f"cannot mount cgroup2: {done.stderr.strip()}",
                                "run as root on a kernel with cgroup v2")  # fmt: skip
            root = self._mounted
        controllers = (root / "cgroup.controllers").read_text().split()
        if "memory" not in controllers:
            self._unmount()
            raise HostError("the cgroup2 root has no memory controller", "boot with memcg")
        if "memory" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+memory")
        MemoryCgroup._count += 1
        self.path = root / f"cvmlab-{os.getpid()}-{MemoryCgroup._count}"
        self.path.mkdir(mode=0o700)

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def stat(self) -> dict[str, int]:
        return parse_flat_keyed(self.read("memory.stat"))

    def events(self) -> dict[str, int]:
        return parse_flat_keyed(self.read("memory.events"))

    def current(self) -> int:
        return int(self.read("memory.current"))

    def run_inside(self, action: Callable[[], object], timeout: float = 60.0) -> ChildOutcome:
        """Fork a child that joins this cgroup and runs `action` (its charges stay here)."""
        procs = str(self.path / "cgroup.procs")

        def join_and_run() -> None:
            with open(procs, "w", encoding="ascii") as handle:
                handle.write("0")
            action()

        return run_in_child(join_and_run, timeout=timeout)

    def _unmount(self) -> None:
        if self._mounted is not None:
            subprocess.run(["umount", str(self._mounted)], check=False)
            os.rmdir(self._mounted)
            self._mounted = None

    def close(self) -> None:
        """Remove the cgroup (empty by then: its children exited) and any private mount."""
        if self.path.exists():
            self.path.rmdir()
        self._unmount()

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
