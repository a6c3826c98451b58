"""The lab's initramfs: busybox, the lab's /init, and the modules its 9p mounts need.

Everything else (Python, QEMU, the venv, the kernel's other modules) comes from the host's
root over 9p, so the initramfs stays small (about 2.5 MB) and is built once per kernel:
it is cached under the cvmlab cache, keyed by the sha256 of everything in it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from orchestrator.errors import LabError
from orchestrator.image.builder import cache_root
from orchestrator.image.cpio import CpioArchive
from orchestrator.image.kernel import read_module, select_modules, uncompressed_path
from orchestrator.lab.kernels import LabKernel

INIT_SCRIPT = Path(__file__).with_name("init.sh")
BUSYBOX = Path("/bin/busybox")
# What the mounts need before the host's root is there (virtio-pci is built into Debian's
# kernels; a kernel with 9p built in needs none of these).
NINEP_MODULES = ("9pnet_virtio", "9p")


def _busybox() -> Path:
    if not BUSYBOX.is_file() or shutil.which("busybox") is None:
        raise LabError("the lab needs a static busybox at /bin/busybox", "run ci/setup-host.sh")
    return BUSYBOX


def _module_files(kernel: LabKernel) -> list[tuple[str, bytes]]:
    """(path under /lib/modules, ELF bytes) of the 9p modules in load order."""
    if kernel.modules_dir is None:
        return []
    selection = select_modules(kernel.modules_dir, [], list(NINEP_MODULES), [])
    if selection.absent:
        raise LabError(
            f"kernel {kernel.release} has no {', '.join(selection.absent)} (module or built in): "
            "the lab mounts the host's root over virtio 9p",
            "enable CONFIG_NET_9P, CONFIG_NET_9P_VIRTIO and CONFIG_9P_FS",
        )
    return [(uncompressed_path(p), read_module(kernel.modules_dir / p)) for p in selection.load]


def _early_module_files(
    kernel: LabKernel, names: tuple[str, ...], skip: set[str]
) -> list[tuple[str, bytes]]:
    """(path, ELF bytes) of `names` and their dependencies in load order, minus `skip`.

    Why in the initramfs: modprobe from the host's root reads each .ko.xz over 9p and
    decompresses it under TCG. kvm_amd with kvm, ccp and irqbypass took about 3.8 s of
    the lab's start that way (7.3: 9p mounted at 4.7 s, kvm_amd up at 8.5 s).
    """
    if kernel.modules_dir is None or not names:
        return []
    selection = select_modules(kernel.modules_dir, [], list(names), [])
    return [
        (uncompressed_path(p), read_module(kernel.modules_dir / p))
        for p in selection.load
        if uncompressed_path(p) not in skip
    ]


def lab_initrd(kernel: LabKernel, early: tuple[str, ...] = ()) -> Path:
    """The cached initramfs for `kernel` (built when absent), with the `early` modules.

    /init insmods the 9p modules (or fails: no root without them), then `early` (kvm_amd
    and its dependencies) where it can; the runner modprobes whatever is still missing and
    reports why it fails.
    """
    modules = _module_files(kernel)
    early_modules = _early_module_files(kernel, early, {name for name, _ in modules})
    busybox = _busybox().read_bytes()
    init = INIT_SCRIPT.read_bytes()
    digest = hashlib.sha256()
    named = [*modules, *((f"early:{name}", data) for name, data in early_modules)]
    for part in (busybox, init, *(f"{name}\0".encode() + data for name, data in named)):
        digest.update(hashlib.sha256(part).digest())
    directory = cache_root() / "lab"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"initrd-{digest.hexdigest()[:16]}.cpio"
    if path.exists():
        return path
    archive = CpioArchive()
    for name in ("bin", "dev", "proc", "sys", "etc", "lib/modules", "lab", "newroot"):
        archive.add_directory(name)
    archive.add_char_device("dev/console", 5, 1)
    archive.add_file("bin/busybox", busybox, 0o755)
    archive.add_file("init", init, 0o755)
    for name, data in (*modules, *early_modules):
        archive.add_file(f"lib/modules/{name}", data)
    archive.add_file("etc/lab-modules", "".join(f"{name}\n" for name, _ in modules).encode())
    archive.add_file(
        "etc/lab-early-modules", "".join(f"{name}\n" for name, _ in early_modules).encode()
    )
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    with scratch.open("wb") as stream:
        archive.write(stream)
    os.replace(scratch, path)
    return path
