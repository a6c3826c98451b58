"""Error types.

Every error a user can cause or fix (a bad spec, a missing QEMU, an image
that no longer matches its hashes) is a `CvmlabError`: it carries what is
wrong and what to do, and the CLI prints it as one line without a traceback.
Anything else is a bug in cvmlab and keeps its traceback.
"""

from __future__ import annotations


class CvmlabError(Exception):
    """A problem the user can act on: `problem` says what is wrong, `fix` what to do."""

    def __init__(self, problem: str, fix: str = "", detail: str = "") -> None:
        self.problem = problem
        self.fix = fix
        # Extra evidence shown after the one-line message (e.g. QEMU's stderr).
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.problem}: {self.fix}" if self.fix else self.problem


class SpecError(CvmlabError):
    """A machine spec that is malformed or breaks one of QEMU's rules."""


class QemuError(CvmlabError):
    """QEMU is missing, too old, or lacks something the spec needs."""


class LaunchError(QemuError):
    """QEMU exited or never became reachable while starting."""


class QmpError(QemuError):
    """A QMP command failed or QMP could not be reached."""


class ImageError(CvmlabError):
    """A guest image could not be built, found, or verified."""


class GuestError(CvmlabError):
    """The guest did not behave: unreachable, a command timed out, bad output."""


class GuestCrashed(GuestError):
    """The guest panicked, oopsed or warned; `detail` holds the console lines."""


class HostError(CvmlabError):
    """The host lacks a capability or permission a step needs."""


class MemoryOpError(CvmlabError):
    """A memory operation (hole punch, balloon, virtio-mem, conversion) cannot be done as asked:
    a range outside guest RAM, unaligned, across a hole, or a backing that cannot do it."""


class LabError(CvmlabError):
    """The kernel-under-test lab cannot start or run: a kernel that is not there or lacks
    KVM, a QEMU without TCG SVM, a kernel that panics or hangs, a command not found inside."""
