"""MachineSpec -> QEMU argv: a pure function, no I/O.

The same function writes the test's command line and the reproducer's
`run.sh`, so what a developer runs by hand is what the test ran. Objects are
written in QEMU's JSON form (`-object '{"qom-type": ...}'`): typed values,
no comma escaping of user paths, and the form `tdx-guest`'s
quote-generation-socket requires anyway.

Rules about which combinations QEMU accepts live in `orchestrator.qemu.rules`;
this module assumes a valid spec.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator.qemu.spec import (
    AnonBackend,
    Backend,
    DiskBoot,
    FileBackend,
    Firmware,
    KernelBoot,
    MachineSpec,
    MemfdBackend,
    SevGuest,
    SnpGuest,
    TdxGuest,
)
from orchestrator.units import format_size

# Fixed QOM ids, so QMP commands and tests can name the parts.
RAM_ID = "ram0"
CGS_ID = "cgs0"
VMEM_BACKEND_ID = "vmem0"
VMEM_DEVICE_ID = "vm0"
BALLOON_ID = "balloon0"
NETDEV_ID = "net0"
PVPANIC_ID = "pvpanic0"
QMP_CHARDEV_ID = "qmp0"
# A second QMP monitor for a person (qmp-shell) while cvmlab holds the first one.
HUMAN_QMP_CHARDEV_ID = "qmp1"
SERIAL_CHARDEV_ID = "serial0"

# Placeholder for the run directory in run.sh, replaced by a shell variable.
RUNDIR_PLACEHOLDER = "@RUNDIR@"


@dataclass(frozen=True)
class Plumbing:
    """Where a run's channels go: decided at launch, not part of the spec.

    `serial` is "stdio" (QEMU's stdout carries the console, read line by line
    by the serial watcher) or a file path. `extra_qmp_socket` adds a second QMP
    monitor there: QEMU serves one client per monitor socket, so a person can
    attach `qmp-shell` only to a monitor cvmlab does not hold (`cvmlab repro`).
    `qmp_fd`, when set, replaces `qmp_socket`: QEMU inherits that fd, one end of a
    connected socket pair whose other end the launcher holds, so nobody waits for
    a socket file to appear (the launcher's choice; run.sh keeps the path).
    """

    qmp_socket: str
    serial: Literal["stdio"] | str = "stdio"
    trace_file: str | None = None
    extra_qmp_socket: str | None = None
    qmp_fd: int | None = None


def _escape_opt(value: str) -> str:
    """QEMU's option syntax doubles commas inside a value."""
    return value.replace(",", ",,")


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _json_object(qom_type: str, qom_id: str, props: dict[str, Any]) -> str:
    body: dict[str, Any] = {"qom-type": qom_type, "id": qom_id}
    body.update({k: v for k, v in props.items() if v is not None})
    return json.dumps(body, separators=(",", ":"))


def backend_object(backend: Backend, qom_id: str, size: int) -> str:
    """The `-object` JSON for a memory backend of `size` bytes."""
    if isinstance(backend, AnonBackend):
        return _json_object("memory-backend-ram", qom_id, {"size": size, "share": backend.share})
    if isinstance(backend, MemfdBackend):
        props: dict[str, Any] = {"size": size, "share": backend.share, "seal": backend.seal}
        if backend.hugetlb:
            props["hugetlb"] = True
            props["hugetlbsize"] = backend.hugetlbsize
        return _json_object("memory-backend-memfd", qom_id, props)
    if isinstance(backend, FileBackend):
        return _json_object(
            "memory-backend-file",
            qom_id,
            {
                "size": size,
                "mem-path": backend.mem_path,
                "share": backend.share,
                "discard-data": backend.discard_data,
            },
        )
    raise TypeError(f"not a memory backend: {backend!r}")


def confidential_object(cgs: SnpGuest | TdxGuest | SevGuest) -> str:
    """The `-object` JSON for `sev-snp-guest`, `tdx-guest` or `sev-guest` (names as QAPI's)."""
    if isinstance(cgs, SevGuest):
        return _json_object(
            "sev-guest",
            CGS_ID,
            {
                "cbitpos": cgs.cbitpos,
                "reduced-phys-bits": cgs.reduced_phys_bits,
                "policy": cgs.policy,
                "legacy-vm-type": cgs.legacy_vm_type,
                "kernel-hashes": cgs.kernel_hashes or None,
            },
        )
    if isinstance(cgs, SnpGuest):
        return _json_object(
            "sev-snp-guest",
            CGS_ID,
            {
                "cbitpos": cgs.cbitpos,
                "reduced-phys-bits": cgs.reduced_phys_bits,
                "policy": cgs.policy,
                "kernel-hashes": cgs.kernel_hashes or None,
                "author-key-enabled": cgs.author_key_enabled,
                "vcek-disabled": cgs.vcek_disabled,
                "guest-visible-workarounds": cgs.guest_visible_workarounds,
                "id-block": cgs.id_block,
                "id-auth": cgs.id_auth,
                "host-data": cgs.host_data,
            },
        )
    qgs = cgs.quote_generation_socket
    qgs_json: dict[str, str] | None = None
    if qgs is not None:
        # QAPI SocketAddress: vsock cid/port are strings.
        if qgs.type == "vsock":
            qgs_json = {"type": "vsock", "cid": str(qgs.cid), "port": str(qgs.port)}
        else:
            qgs_json = {"type": "unix", "path": str(qgs.path)}
    return _json_object(
        "tdx-guest",
        CGS_ID,
        {
            "attributes": cgs.attributes,
            "sept-ve-disable": cgs.sept_ve_disable,
            "mrconfigid": cgs.mrconfigid,
            "mrowner": cgs.mrowner,
            "mrownerconfig": cgs.mrownerconfig,
            "quote-generation-socket": qgs_json,
        },
    )


def _machine_opts(spec: MachineSpec) -> str:
    opts = [spec.machine, f"memory-backend={RAM_ID}"]
    if spec.confidential is not None:
        opts.append(f"confidential-guest-support={CGS_ID}")
        if isinstance(spec.confidential, TdxGuest):
            opts.append("kernel-irqchip=split")
    return ",".join(opts)


def _memory_opts(spec: MachineSpec) -> str:
    size = format_size(spec.memory)
    if spec.virtio_mem is None:
        return size
    return f"{size},maxmem={format_size(spec.memory + spec.virtio_mem.size)}"


#: CPU features a TCG guest goes without: fast string operations. On hardware they
#: make `rep movsb`/`rep stosb` the fastest copy and clear, so the kernel picks them
#: for clear_page, copy_user and memcpy, and glibc for large copies. TCG emulates
#: those one iteration at a time: a guest touching 300 MiB of new memory (each page
#: cleared by the kernel) took 2.2-3.9 s with them and 0.8-1.9 s without (QEMU
#: 10.0.2, -cpu max, alternated runs). No guest-visible behaviour under test depends
#: on them; a spec naming either feature keeps its own choice.
TCG_CPU_FEATURES_OFF = ("erms", "fsrm")


def _cpu_opts(spec: MachineSpec) -> str:
    opts = [spec.cpu]
    if spec.accel == "tcg":
        # "erms=on", "+erms", "-erms": the feature's name without its sign or value.
        named = {re.split("=", f.lstrip("+-"), maxsplit=1)[0] for f in spec.cpu.split(",")[1:]}
        opts += [f"{feature}=off" for feature in TCG_CPU_FEATURES_OFF if feature not in named]
    if spec.tsc_frequency is not None:
        opts.append(f"tsc-frequency={spec.tsc_frequency}")
    return ",".join(opts)


def _firmware_args(fw: Firmware) -> list[str]:
    if fw.interface == "bios":
        return ["-bios", fw.path]
    args = ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_escape_opt(fw.path)}"]
    if fw.vars_path:
        args += ["-drive", f"if=pflash,format=raw,unit=1,file={_escape_opt(fw.vars_path)}"]
    return args


def _boot_args(spec: MachineSpec) -> list[str]:
    boot = spec.boot
    args: list[str] = []
    if boot.firmware is not None:
        args += _firmware_args(boot.firmware)
    if isinstance(boot, KernelBoot):
        args += ["-kernel", boot.kernel]
        if boot.initrd:
            args += ["-initrd", boot.initrd]
        if boot.cmdline:
            args += ["-append", boot.cmdline]
    elif isinstance(boot, DiskBoot):
        args += [
            "-drive",
            f"if=virtio,format={boot.disk_format},snapshot={_onoff(boot.snapshot)},"
            f"file={_escape_opt(boot.disk)}",
        ]
    return args


def qmp_monitor_args(chardev_id: str, socket_path: str, fd: int | None = None) -> list[str]:
    """A QMP monitor listening on a unix socket (QEMU does not wait for a client), or,
    with `fd`, on an inherited socket that is already connected to its client."""
    if fd is not None:
        chardev = f"socket,id={chardev_id},fd={fd}"
    else:
        chardev = f"socket,id={chardev_id},path={_escape_opt(socket_path)},server=on,wait=off"
    return ["-chardev", chardev, "-mon", f"chardev={chardev_id},mode=control"]


def _serial_args(serial: str) -> list[str]:
    if serial == "stdio":
        chardev = f"stdio,id={SERIAL_CHARDEV_ID},signal=off"
    else:
        chardev = f"file,id={SERIAL_CHARDEV_ID},path={_escape_opt(serial)}"
    return ["-chardev", chardev, "-serial", f"chardev:{SERIAL_CHARDEV_ID}"]


def _device_args(spec: MachineSpec) -> list[str]:
    args: list[str] = []
    if spec.ssh_forward:
        # Host port 0: QEMU picks a free port, read back over QMP, so parallel
        # tests never collide. romfile= skips the iPXE ROM a direct boot never uses.
        args += [
            "-netdev", f"user,id={NETDEV_ID},hostfwd=tcp:127.0.0.1:0-:22",
            "-device", f"virtio-net-pci,netdev={NETDEV_ID},romfile=",
        ]  # fmt: skip
    if spec.balloon is not None:
        args += [
            "-device",
            f"virtio-balloon-pci,id={BALLOON_ID},"
            f"free-page-reporting={_onoff(spec.balloon.free_page_reporting)},"
            f"deflate-on-oom={_onoff(spec.balloon.deflate_on_oom)}",
        ]
    if spec.virtio_mem is not None:
        vmem = spec.virtio_mem
        device = (
            f"virtio-mem-pci,id={VMEM_DEVICE_ID},memdev={VMEM_BACKEND_ID},"
            f"requested-size={format_size(vmem.requested_size)}"
        )
        if vmem.block_size is not None:
            device += f",block-size={format_size(vmem.block_size)}"
        args += [
            "-object", backend_object(vmem.backend, VMEM_BACKEND_ID, vmem.size),
            "-device", device,
        ]  # fmt: skip
    if spec.pvpanic:
        args += ["-device", f"pvpanic-pci,id={PVPANIC_ID}"]
    return args


def build_argv(
    spec: MachineSpec, plumbing: Plumbing, binary: str | Sequence[str] = "qemu-system-x86_64"
) -> list[str]:
    """The complete QEMU argv for `spec`, with run-time channels from `plumbing`.

    `binary` is a path, or an argv prefix for a QEMU that must run through
    its own dynamic loader (a private prefix: `ld.so --library-path ... qemu`).
    """
    prefix = [binary] if isinstance(binary, str) else list(binary)
    argv = [
        *prefix,
        "-name", f"{spec.name},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none",
        # A guest reboot (and, with panic=-1, a guest panic) ends QEMU.
        "-no-reboot",
        "-machine", _machine_opts(spec),
        "-accel", spec.accel,
        "-cpu", _cpu_opts(spec),
        "-smp", str(spec.smp),
        "-m", _memory_opts(spec),
        "-object", backend_object(spec.backend, RAM_ID, spec.memory),
    ]  # fmt: skip
    if spec.confidential is not None:
        argv += ["-object", confidential_object(spec.confidential)]
    argv += _boot_args(spec)
    argv += qmp_monitor_args(QMP_CHARDEV_ID, plumbing.qmp_socket, plumbing.qmp_fd)
    if plumbing.extra_qmp_socket:
        argv += qmp_monitor_args(HUMAN_QMP_CHARDEV_ID, plumbing.extra_qmp_socket)
    argv += _serial_args(plumbing.serial)
    argv += _device_args(spec)
    for event in spec.trace_events:
        argv += ["-trace", f"enable={event}"]
    if plumbing.trace_file:
        argv += ["-D", plumbing.trace_file]
    return argv


def _shell_quote(arg: str) -> str:
    quoted = "'" + arg.replace("'", "'\\''") + "'"
    return quoted.replace(RUNDIR_PLACEHOLDER, "'\"$RUNDIR\"'")


def _pairs(argv: list[str]) -> list[list[str]]:
    """Group an option with its value, one group per run.sh line."""
    groups: list[list[str]] = []
    for arg in argv:
        if (
            groups
            and groups[-1][0].startswith("-")
            and len(groups[-1]) == 1
            and not arg.startswith("-")
        ):
            groups[-1].append(arg)
        else:
            groups.append([arg])
    return groups


def render_run_sh(
    spec: MachineSpec,
    binary: str | Sequence[str] = "qemu-system-x86_64",
    header: str = "",
    extra_args: Sequence[str] = (),
) -> str:
    """A shell script that runs `spec` by hand: console on the terminal, QMP in $RUNDIR.

    Attach with `qmp-shell "$RUNDIR/qmp.sock"` while it runs. `extra_args` are the
    launcher's own additions (e.g. the warm start's vmgenid device).
    """
    plumbing = Plumbing(qmp_socket=f"{RUNDIR_PLACEHOLDER}/qmp.sock", serial="stdio")
    argv = [*build_argv(spec, plumbing, binary), *extra_args]
    lines = ["#!/bin/sh"]
    if header:
        lines += [f"# {line}" for line in header.splitlines()]
    lines += [
        "# The guest console is this terminal; QMP listens on $RUNDIR/qmp.sock.",
        'RUNDIR="${RUNDIR:-$(mktemp -d /tmp/cvmlab-run-XXXXXX)}"',
        'chmod 0700 "$RUNDIR"',
        'echo "QMP: $RUNDIR/qmp.sock" >&2',
        "exec "
        + " \\\n    ".join(" ".join(_shell_quote(a) for a in group) for group in _pairs(argv)),
        "",
    ]
    return "\n".join(lines)
