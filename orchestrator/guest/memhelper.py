"""Driving the guest memory helper `cvmlab-mem` (images/minimal/guest-helper) and reading its JSON.

The helper holds a buffer of known content in guest RAM and reports the guest
physical address (GPA) of each of its pages, so the host can act on exactly
those pages and the guest can then say which pages changed (invariants G2/H3).
The same binary runs on the host (plain Linux userspace), which is how its unit
tests run; `local_runner` and `ssh_runner` make this wrapper work in both places.

The pattern is mirrored here (`pattern_page`) so host-side code can compute what
any page of a buffer must contain.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.errors import GuestError

HELPER_PATH = "/usr/bin/cvmlab-mem"
DEFAULT_STATE = "/run/cvmlab-mem"
_MASK64 = (1 << 64) - 1


def pattern_word(seed: int, page: int, word: int) -> int:
    """The helper's 64-bit word `word` of page `page` (splitmix64 of seed ^ page<<20 ^ word)."""
    z = ((seed ^ (page << 20) ^ word) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def pattern_page(seed: int, page: int, page_size: int = 4096) -> bytes:
    """The exact bytes page `page` of a buffer held with `seed` contains (little endian)."""
    words = page_size // 8
    return struct.pack(f"<{words}Q", *(pattern_word(seed, page, i) for i in range(words)))


@dataclass(frozen=True)
class CommandOutput:
    """What running one helper command returned."""

    exit_status: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], timeout: float) -> CommandOutput: ...


def local_runner(argv: Sequence[str], timeout: float) -> CommandOutput:
    """Run the helper on this host (tests, and the host side of a bench)."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    return CommandOutput(done.returncode, done.stdout, done.stderr)


class _Shell(Protocol):
    """The part of `orchestrator.guest.ssh.GuestShell` this module needs."""

    def run(self, cmd: str | Sequence[str], timeout: float = ..., check: bool = ...) -> Any: ...


def ssh_runner(shell: _Shell) -> Runner:
    """Run the helper in the guest over SSH (the command is recorded on the shell's timeline)."""

    def run(argv: Sequence[str], timeout: float) -> CommandOutput:
        result = shell.run(list(argv), timeout=timeout, check=False)
        return CommandOutput(int(result.exit_status), str(result.stdout), str(result.stderr))

    return run


@dataclass(frozen=True)
class HoldReport:
    """The answer to `hold`: where the buffer is, page by page."""

    pid: int
    pages: int
    page_size: int
    addr: int
    seed: int
    locked: bool
    fill_ms: float
    state: str
    gpas: tuple[int | None, ...]  # GPA of each page at hold time; None = not present

    def page_gpa(self, page: int) -> int:
        gpa = self.gpas[page]
        if gpa is None:
            raise GuestError(
                f"page {page} of the helper's buffer is not present", "hold with lock=True"
            )
        return gpa

    def gpa_ranges(self, pages: Iterable[int]) -> list[tuple[int, int]]:
        """(gpa, length) runs covering `pages`, merging pages whose GPAs are adjacent."""
        runs: list[tuple[int, int]] = []
        for gpa in sorted(self.page_gpa(p) for p in pages):
            if runs and runs[-1][0] + runs[-1][1] == gpa:
                runs[-1] = (runs[-1][0], runs[-1][1] + self.page_size)
            else:
                runs.append((gpa, self.page_size))
        return runs


@dataclass(frozen=True)
class FillReport:
    """The answer to `fill`: memory used once and freed."""

    mib: int
    pages: int
    fill_ms: float


@dataclass(frozen=True)
class BadPage:
    page: int
    gpa: int | None
    kind: str  # "zero" | "corrupt" | "not_zero" (expected zero, still holds data)
    offset: int  # first bad byte within the page


@dataclass(frozen=True)
class VerifyReport:
    """The answer to `verify`."""

    pages: int
    bad_pages: int
    first_bad_offset: int | None
    zero_page_count: int
    zero_pages: tuple[int, ...]  # capped at --max-list
    expected_zero_pages: int
    expected_zero_ok: int
    bad: tuple[BadPage, ...]  # capped at --max-list
    bad_truncated: bool
    verify_ms: float

    @property
    def clean(self) -> bool:
        return self.bad_pages == 0


@dataclass(frozen=True)
class GpaReport:
    """The answer to `gpas`: GPAs now, and which pages moved since hold."""

    pages: int
    moved: int
    moved_pages: tuple[int, ...]
    not_present: int
    gpas: tuple[int | None, ...]


class MemHelper:
    """One helper state directory (one held buffer) in the guest or on this host."""

    def __init__(
        self,
        run: Runner,
        state: str = DEFAULT_STATE,
        binary: str = HELPER_PATH,
        timeout: float = 120.0,
    ) -> None:
        self._run = run
        self.state = state
        self.binary = binary
        self.timeout = timeout

    def _call(self, command: str, *args: str, stateful: bool = True) -> dict[str, Any]:
        state = ["--state", self.state] if stateful else []
        argv = [self.binary, command, *state, *args,
                "--timeout", str(int(self.timeout))]  # fmt: skip
        # The outer deadline leaves the helper time to report its own timeout.
        out = self._run(argv, self.timeout + 30)
        try:
            reply = json.loads(out.stdout)
        except json.JSONDecodeError:
            raise GuestError(
                f"cvmlab-mem {command} printed no JSON (exit status {out.exit_status})",
                "is the helper installed in the image (/usr/bin/cvmlab-mem)?",
                detail=(out.stdout + out.stderr)[-2000:],
            ) from None
        if not isinstance(reply, dict):
            raise GuestError(f"cvmlab-mem {command} printed {type(reply).__name__}, not an object")
        if "error" in reply or out.exit_status != 0:
            raise HelperError(command, out.exit_status, reply)
        return reply

    def keep_locked_pages_in_place(self) -> None:
        """Stop compaction from migrating mlocked pages (vm.compact_unevictable_allowed=0).

        mlock keeps pages in RAM, not at one physical address: with the default (1), a
        forced compaction moved 8 of 16384 locked 4 KiB pages of a 64 MiB buffer in our
        6.12 TCG guest (462 of 16384 unlocked). A test that acts on the GPAs `hold`
        reported needs them to stay put; this is a guest-wide setting, fine for a test
        guest.
        """
        argv = ["sysctl", "-w", "vm.compact_unevictable_allowed=0"]
        out = self._run(argv, self.timeout)
        if out.exit_status != 0:
            raise GuestError(
                "cannot forbid compaction of mlocked pages in the guest",
                "the guest needs /proc/sys/vm/compact_unevictable_allowed (CONFIG_COMPACTION)",
                detail=(out.stdout + out.stderr)[-2000:],
            )

    def hold(self, mib: int, seed: int, lock: bool = True) -> HoldReport:
        """Allocate, fill and hold `mib` MiB; returns once the buffer is ready."""
        args = ["--mib", str(mib), "--seed", str(seed)] + (["--lock"] if lock else [])
        r = self._call("hold", *args)
        return HoldReport(
            pid=int(r["pid"]),
            pages=int(r["pages"]),
            page_size=int(r["page_size"]),
            addr=int(str(r["addr"]), 16),
            seed=int(r["seed"]),
            locked=bool(r["locked"]),
            fill_ms=float(r["fill_ms"]),
            state=str(r["state"]),
            gpas=tuple(None if g is None else int(g) for g in r["gpas"]),
        )

    def verify(
        self, expect_zero: Sequence[tuple[int, int]] = (), max_list: int = 64
    ) -> VerifyReport:
        """Check the buffer; pages in the `expect_zero` (gpa, length) ranges must read zero."""
        args = ["--max-list", str(max_list)]
        if expect_zero:
            ranges = ",".join(f"{gpa:#x}:{length:#x}" for gpa, length in expect_zero)
            args += ["--expect-zero-gpa-ranges", ranges]
        r = self._call("verify", *args)
        return VerifyReport(
            pages=int(r["pages"]),
            bad_pages=int(r["bad_pages"]),
            first_bad_offset=None if r["first_bad_offset"] is None else int(r["first_bad_offset"]),
            zero_page_count=int(r["zero_page_count"]),
            zero_pages=tuple(int(p) for p in r["zero_pages"]),
            expected_zero_pages=int(r["expected_zero_pages"]),
            expected_zero_ok=int(r["expected_zero_ok"]),
            bad=tuple(
                BadPage(
                    page=int(b["page"]),
                    gpa=None if b["gpa"] is None else int(b["gpa"]),
                    kind=str(b["kind"]),
                    offset=int(b["offset"]),
                )
                for b in r["bad"]
            ),
            bad_truncated=bool(r["bad_truncated"]),
            verify_ms=float(r["verify_ms"]),
        )

    def gpas(self) -> GpaReport:
        """The buffer's GPAs now (pages can move: see `keep_locked_pages_in_place`)."""
        r = self._call("gpas")
        return GpaReport(
            pages=int(r["pages"]),
            moved=int(r["moved"]),
            moved_pages=tuple(int(p) for p in r["moved_pages"]),
            not_present=int(r["not_present"]),
            gpas=tuple(None if g is None else int(g) for g in r["gpas"]),
        )

    def release(self) -> float:
        """Free the buffer; returns once the holder has exited (milliseconds it took)."""
        return float(self._call("release")["wait_ms"])

    def fill(self, mib: int) -> FillReport:
        """Use `mib` MiB once and free them, in one command and without a holder: the
        guest (and so its host) backs that much memory, which a balloon or an unplug
        must then give back. Not for judging content: no pattern is kept."""
        r = self._call("fill", "--mib", str(mib), stateful=False)
        return FillReport(
            mib=int(r["mib"]), pages=int(r["pages"]), fill_ms=float(r["fill_ms"])
        )


class HelperError(GuestError):
    """The helper answered with an error: `errno_name` (e.g. "EBUSY") and its message."""

    def __init__(self, command: str, exit_status: int, reply: dict[str, Any]) -> None:
        self.command = command
        self.exit_status = exit_status
        self.errno_name = str(reply.get("error", "?"))
        self.message = str(reply.get("message", reply))
        fix = (
            "the helper was called with bad arguments (a cvmlab bug)"
            if exit_status == 2
            else "see the message; the holder's state is in its --state directory"
        )
        super().__init__(f"cvmlab-mem {command} failed: {self.errno_name}: {self.message}", fix)
