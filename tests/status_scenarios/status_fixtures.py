"""Scenarios that break on purpose, for tests/test_status_semantics.py (not a profile job).

Each one drives the real base classes (MachineScenario boots a real guest under QEMU)
into one case of the status rule:

- `PanicsItsGuest`: the guest panics (sysrq `c`) while the test waits on SSH: FAIL
  with a G3 verdict carrying the console lines, not an ERROR.
- `HostSplat`: a WARNING record appears in the host kernel log during the test: FAIL
  with H8 (judged in the finish phase), not an ERROR from tearDown. A host kernel
  cannot be made to WARN on purpose here, so the watch reads a file in /dev/kmsg's
  record format (Documentation/ABI/testing/dev-kmsg) that the test appends to: the
  parsing, signatures and judging are the real ones.
- `LostHostRecords`: the host log watch lost records (what EPIPE on /dev/kmsg
  means) and nothing else went wrong: never a PASS (WARN). Flooding the real ring
  buffer would make every other tenant of this shared host lose records too, so the
  watch's lost-records flag is set as its EPIPE branch sets it.
- `SplatThenSshBreaks`: a splat, then the harness breaks (an SSH command raises): FAIL
  with H8 (the invariant broke; the harness error is named after it).
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import GuestError
from orchestrator.host.kernel_log import HostLogWatch
from orchestrator.machine_scenario import MachineScenario

SPLAT = "4,9001,123456789,-;WARNING: CPU: 1 PID: 42 at mm/filemap.c:1234 folio_bug+0x1/0x2\n"


class _FakeKmsg(MachineScenario):
    """:avocado: disable"""

    def setUp(self) -> None:
        super().setUp()
        self.kmsg = Path(self.workdir) / "kmsg"
        self.kmsg.write_text("6,1,1,-;boot record before the baseline\n")
        self.host_log.close()
        self.host_log = HostLogWatch(str(self.kmsg))

    def splat(self) -> None:
        with self.kmsg.open("a") as stream:
            stream.write(SPLAT)


class PanicsItsGuest(MachineScenario):
    """
    :avocado: enable
    """

    def test_guest_panics(self) -> None:
        crash = "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger"
        self.guest.run(["sh", "-c", crash], timeout=60)


class HostSplat(_FakeKmsg):
    """
    :avocado: enable
    """

    def test_host_log_gets_a_splat(self) -> None:
        self.splat()
        self.guest.run(["true"])


class LostHostRecords(_FakeKmsg):
    """
    :avocado: enable
    """

    def test_records_lost(self) -> None:
        self.host_log._incomplete = True  # as HostLogWatch._drain does on EPIPE
        self.guest.run(["true"])


class SplatThenSshBreaks(_FakeKmsg):
    """
    :avocado: enable
    """

    def test_splat_then_harness_error(self) -> None:
        self.splat()
        raise GuestError("ssh: the guest did not answer (injected harness failure)")
