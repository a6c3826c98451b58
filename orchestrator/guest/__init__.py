"""Access to a running guest: its serial console and an SSH shell.

`SerialConsole` keeps every console line and notices kernel crashes as they are
printed; `GuestShell` runs commands and uploads files over SSH. Both are usually
obtained from a `orchestrator.qemu.launcher.Machine` (`machine.console`,
`machine.ssh(...)`), which wires a crash on the console to an interrupt of the shell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.guest.serial import ConsoleLine, CrashReport, SerialConsole

if TYPE_CHECKING:
    from orchestrator.guest.ssh import CommandResult, GuestShell

__all__ = ["CommandResult", "ConsoleLine", "CrashReport", "GuestShell", "SerialConsole"]


def __getattr__(name: str) -> Any:
    # The SSH names on first use: paramiko costs seconds to import under TCG, and the
    # guest_memfd scenarios, which import this package, never open a shell.
    if name in ("CommandResult", "GuestShell"):
        from orchestrator.guest import ssh

        return getattr(ssh, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
