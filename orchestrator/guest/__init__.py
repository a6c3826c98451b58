"""Access to a running guest: its serial console and an SSH shell.

`SerialConsole` keeps every console line and notices kernel crashes as they are
printed; `GuestShell` runs commands and uploads files over SSH. Both are usually
obtained from a `orchestrator.qemu.launcher.Machine` (`machine.console`,
`machine.ssh(...)`), which wires a crash on the console to an interrupt of the shell.
"""

from orchestrator.guest.serial import ConsoleLine, CrashReport, SerialConsole
from orchestrator.guest.ssh import CommandResult, GuestShell

__all__ = ["CommandResult", "ConsoleLine", "CrashReport", "GuestShell", "SerialConsole"]
