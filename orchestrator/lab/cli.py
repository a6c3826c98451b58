"""`cvmlab lab`: run a command inside a kernel under test, with real KVM and guest_memfd.

    cvmlab lab --kernel 7.3 -- avocado run scenarios/gmem_uapi.py
    cvmlab lab --vmlinuz ~/linux/arch/x86/boot/bzImage \
        --modules-dir /tmp/mods/lib/modules/7.4.0 -- CMD
    cvmlab lab kernel build [--tree DIR]     (a kernel with CONFIG_KVM_SW_PROTECTED_VM)
    cvmlab lab selftests build --series 7.3  (the kernel's own KVM selftests, from its source)

The command's exit status is ours; its stdout and stderr are streamed to ours. The lab's
own evidence (console, the kernel's dmesg, what was measured inside, the QEMU command)
goes to `results/lab/<time>-<release>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from orchestrator.errors import LabError
from orchestrator.image.builder import cache_root
from orchestrator.image.pvh import kernel_entry
from orchestrator.lab.bytecode import compile_checkout
from orchestrator.lab.kernels import LabKernel, check_kvm_modules, debian_kernel, local_kernel
from orchestrator.lab.machine import (
    DEFAULT_BOOT_TIMEOUT_S,
    DEFAULT_CPUS,
    DEFAULT_MEMORY_MIB,
    DEFAULT_TIMEOUT_S,
    LabConfig,
    LabResult,
    lab_environment,
    run_lab,
)
from orchestrator.qemu.introspect import DEFAULT_BINARY, introspect_qemu

DEFAULT_KERNEL = "7.3"
SW_PROTECTED = "sw-protected"
CHECKOUT = Path(__file__).resolve().parents[2]
HUGEPAGES_2M = "/proc/sys/vm/nr_hugepages"


def _progress(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def parse_memory(text: str) -> int:
    """'4G', '4096M' or '4096' (MiB) -> MiB."""
    match = re.fullmatch(r"(\d+)([MmGg]?)", text.strip())
    if not match:
        raise LabError(f"--memory {text!r} is not a size", "use e.g. 4G or 4096M")
    value = int(match.group(1))
    return value * 1024 if match.group(2).lower() == "g" else value


def resolve_kernel(args: argparse.Namespace) -> LabKernel:
    """The kernel the options name: --vmlinuz (own build), sw-protected, or a Debian one."""
    if args.vmlinuz is not None:
        return local_kernel(args.vmlinuz, args.modules_dir)
    if args.modules_dir is not None:
        raise LabError("--modules-dir needs --vmlinuz", "pass both for your own kernel build")
    if args.kernel == SW_PROTECTED:
        from orchestrator.lab.kernel_build import ensure_sw_protected_kernel

        return local_kernel(ensure_sw_protected_kernel(_progress), None)
    return debian_kernel(args.kernel, refresh=args.refresh, progress=_progress)


def _settings(args: argparse.Namespace) -> dict[str, str]:
    settings: dict[str, str] = {}
    if args.hugepages:
        settings[HUGEPAGES_2M] = str(args.hugepages)
    for item in args.sysctl:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z0-9_.]+", key):
            raise LabError(
                f"--sysctl {item!r} is not KEY=VALUE", "e.g. --sysctl vm.overcommit_memory=1"
            )
        settings["/proc/sys/" + key.replace(".", "/")] = value
    return settings


def evidence_dir(base: Path, kernel: LabKernel) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / "lab" / f"{stamp}-{kernel.release}"
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    return path


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM unwinds like ^C, so QEMU is stopped and the run directory removed.
    raise SystemExit(128 + signum)


def _write_evidence(where: Path, result: LabResult, qemu: str) -> None:
    facts = result.to_json()
    facts["host_kernel"] = os.uname().release
    facts["outer_qemu"] = qemu
    (where / "lab.json").write_text(json.dumps(facts, indent=2))
    (where / "kernel-dmesg.txt").write_text(result.kernel_dmesg)


def run_command(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise LabError("no command given", "put it after --: cvmlab lab --kernel 7.3 -- CMD ARGS")
    for option, value in (("--timeout", args.timeout), ("--boot-timeout", args.boot_timeout)):
        if not value > 0:
            raise LabError(f"{option} {value:g} is not a positive number of seconds", "e.g. 600")
    signal.signal(signal.SIGTERM, _terminate)
    qemu = introspect_qemu(args.qemu)
    missing = [f for f in ("svm", "npt") if not qemu.tcg_max_cpu.get(f)]
    if "tcg" not in qemu.accelerators or missing:
        raise LabError(
            f"{qemu.describe()} cannot run the lab: its TCG `-cpu max` lacks "
            f"{' and '.join(missing) or 'TCG itself'}, so kvm_amd cannot load inside",
            "install QEMU >= 10.0 (ci/setup-host.sh), or name one with --qemu",
        )
    kernel = resolve_kernel(args)
    check_kvm_modules(kernel)
    compile_checkout(CHECKOUT)
    writable = [CHECKOUT, Path.cwd(), cache_root(), *args.rw]
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    writable.append(results)
    where = evidence_dir(results, kernel)
    config = LabConfig(
        kernel=kernel,
        argv=tuple(command),
        cwd=Path.cwd(),
        writable=tuple(writable),
        env=lab_environment(os.environ, kernel, qemu.describe()),
        memory_mib=parse_memory(args.memory),
        cpus=args.cpus,
        numa_nodes=args.numa,
        settings=_settings(args),
        timeout_s=args.timeout,
        boot_timeout_s=args.boot_timeout,
        qemu=qemu.command,
        entry=kernel_entry(kernel.vmlinuz),
    )
    result = run_lab(
        config,
        stdout=sys.stdout.buffer,
        stderr=sys.stderr.buffer,
        console_log=where / "console.log",
        progress=_progress if not args.quiet else (lambda _m: None),
    )
    _write_evidence(where, result, qemu.describe())
    if not args.quiet:
        running = result.start_to_running_s
        _progress(
            f"{kernel.release}: exit status {result.status} after {result.wall_s:.1f} s "
            f"(command started {running:.1f} s after QEMU)"
            if running is not None
            else f"{kernel.release}: exit status {result.status} after {result.wall_s:.1f} s"
        )
        _progress(f"evidence in {where}")
    return result.status


def _kernel_command(args: argparse.Namespace) -> int:
    from orchestrator.lab.kernel_build import kernel_build_main

    return kernel_build_main(list(args.command[1:]))


def _selftests_command(args: argparse.Namespace) -> int:
    from orchestrator.lab.selftests import selftests_main

    return selftests_main(list(args.command[1:]))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command[:1] == ["kernel"]:
        return _kernel_command(args)
    if args.command[:1] == ["selftests"]:
        return _selftests_command(args)
    return run_command(args)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "lab",
        help="run a command inside a kernel under test (real KVM and guest_memfd)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--kernel",
        default=DEFAULT_KERNEL,
        help="Debian kernel series, version or release (6.12, 7.3, 7.3.4+deb13-amd64), or "
        f"'{SW_PROTECTED}' (built by `cvmlab lab kernel build`); default {DEFAULT_KERNEL}",
    )
    parser.add_argument("--vmlinuz", type=Path, help="your own kernel's bzImage")
    parser.add_argument("--modules-dir", type=Path, help="its lib/modules/<release> directory")
    parser.add_argument("--memory", default=f"{DEFAULT_MEMORY_MIB // 1024}G", help="lab RAM (4G)")
    parser.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="lab vCPUs (2)")
    parser.add_argument("--numa", type=int, default=1, help="NUMA nodes in the lab (1)")
    parser.add_argument("--hugepages", type=int, default=0, help="2 MiB huge pages to reserve")
    parser.add_argument(
        "--sysctl", action="append", default=[], metavar="KEY=VALUE", help="set inside the lab"
    )
    parser.add_argument(
        "--rw", action="append", type=Path, default=[], metavar="DIR",
        help="another host directory to make writable inside (the checkout, the current "
        "directory, results and the cvmlab cache always are)",
    )  # fmt: skip
    parser.add_argument(
        "--results", type=Path, default=Path(os.environ.get("CVMLAB_RESULTS", "results")),
        help="where the lab's evidence goes (results/lab/<time>-<release>/)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds (3600)")
    parser.add_argument(
        "--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT_S,
        help="seconds from QEMU's start to the command running (300)",
    )  # fmt: skip
    parser.add_argument("--qemu", default=DEFAULT_BINARY, help="the outer QEMU")
    parser.add_argument("--refresh", action="store_true", help="re-read the Debian archive")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER,
        help="-- CMD ARGS, or: kernel build | selftests build|show",
    )  # fmt: skip
    parser.set_defaults(handler=_dispatch)
