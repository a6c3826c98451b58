"""The default guest's boot as every bench boots it: the image's kernel entered as
plain scenario guests enter it (through PVH where it can be, `image/pvh.py`)."""

from __future__ import annotations

from orchestrator.image import ImageManifest
from orchestrator.image.pvh import kernel_entry
from orchestrator.qemu.spec import KernelBoot


def image_boot(image: ImageManifest, extra_cmdline: str = "") -> KernelBoot:
    """`image`'s kernel, initrd and command line (plus `extra_cmdline`)."""
    cmdline = " ".join(x for x in (image.cmdline, extra_cmdline) if x)
    return KernelBoot(
        kernel=str(kernel_entry(image.kernel).path), initrd=str(image.initrd), cmdline=cmdline
    )
