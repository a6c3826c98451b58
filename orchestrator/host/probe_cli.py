"""`cvmlab probe`: print the host's tiers as a table or JSON.

`--lab-report DIR` also writes what a lab engineer sends when a first TDX/SNP run
fails (orchestrator/host/lab_report.py); `--replay DIR` probes such a recorded host.

A missing tier is information, not an error: exit 0. A QEMU binary that is
missing or does not start is a user error: `introspect_qemu` raises a
QemuError, which `cvmlab` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import Any

from orchestrator.errors import SpecError
from orchestrator.host.coco_host import RECORDED
from orchestrator.host.lab_report import replay_probe, write_lab_report
from orchestrator.host.probe import HostProbe, probe_host
from orchestrator.qemu.introspect import DEFAULT_BINARY, introspect_qemu


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `probe` on `cvmlab`'s subparsers; the handler returns the exit status."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "probe",
        help="show which tiers (tcg, kvm, gmem, sw-protected, snp, tdx) this host can run",
        description="Measure this host once and name every tier it supports, with the "
        "evidence, or the reason it is missing.",
    )
    parser.add_argument("--json", action="store_true", help="print the probe as JSON")
    parser.add_argument(
        "--check-accel",
        action="store_true",
        help="also boot the default image with -accel kvm and report whether it got ready",
    )
    parser.add_argument(
        "--qemu",
        metavar="BINARY",
        default=os.environ.get("CVMLAB_QEMU", DEFAULT_BINARY),
        help="QEMU to probe: a name on PATH, a path, or a command such as "
        "'LOADER --library-path DIR PREFIX/usr/bin/qemu-system-x86_64' "
        "(default: $CVMLAB_QEMU or %(default)s)",
    )
    parser.add_argument("--tdx-firmware", type=Path, metavar="PATH", help="TDVF image to use")
    parser.add_argument("--snp-firmware", type=Path, metavar="PATH", help="SNP OVMF image to use")
    parser.add_argument(
        "--lab-report",
        type=Path,
        metavar="DIR",
        help="also write a lab report (kernel, cmdline, module parameters, firmware tables, "
        "QEMU properties, KVM VM types, vendor-stack signs, TDX/SNP kernel lines) into DIR",
    )
    parser.add_argument(
        "--replay",
        type=Path,
        metavar="DIR",
        help="probe a recorded host (a --lab-report directory) instead of this one",
    )
    parser.set_defaults(handler=run)
    return parser


def _command(text: str) -> str | list[str]:
    words = shlex.split(text)
    return words[0] if len(words) == 1 else words


def format_table(probe: HostProbe) -> str:
    """The tiers as an aligned table, then the host and timing lines."""
    width = max(len(name) for name in probe.tiers)
    lines = [f"{'tier':<{width}}  ok   reason / evidence"]
    for tier in probe.tiers.values():
        lines.append(
            f"{tier.name:<{width}}  {'yes' if tier.available else 'no ':<3}  {tier.reason}"
        )
    host = probe.host
    where = "nested (cpuinfo hypervisor flag)" if host.nested else "bare metal"
    lines.append("")
    lines.append(f"host: Linux {host.kernel_release}, {host.cpu_model}, {where}")
    if host.lab is not None:
        lines.append(
            f"lab: kernel under test {host.lab['kernel_under_test']} ({host.lab['origin']}); "
            f"outer host Linux {host.lab['outer_host_kernel']}, {host.lab['outer_qemu']}"
        )
    lines.append(f"kvm modules: {', '.join(host.kvm_modules) or 'none'}")
    if host.module_params:
        params = ", ".join(f"{k}={v}" for k, v in host.module_params.items())
        lines.append(f"module parameters: {params}")
    lines.append(f"best accelerator: {probe.best_accel()}")
    cached = ""
    if probe.qemu is not None:
        cached = " (QEMU facts from cache)" if probe.qemu.from_cache else " (QEMU introspected)"
    lines.append(f"probe took {probe.duration_s * 1000:.0f} ms{cached}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.replay is not None:
        if not (args.replay / RECORDED).is_file():
            raise SpecError(
                f"{args.replay} is not a recorded host (no {RECORDED})",
                "give a directory written by `cvmlab probe --lab-report DIR`",
            )
        probe = replay_probe(args.replay)
    else:
        command = _command(args.qemu)
        # Raises QemuError for a missing or broken QEMU: a user error, exit 2 in `cvmlab`.
        introspect_qemu(command)
        probe = probe_host(
            command,
            check_accel=args.check_accel,
            tdx_firmware=args.tdx_firmware,
            snp_firmware=args.snp_firmware,
        )
    if args.json:
        print(json.dumps(probe.to_json(), indent=2, default=str))
    else:
        print(format_table(probe))
    if args.lab_report is not None and args.replay is None:
        report = write_lab_report(args.lab_report, probe)
        print(f"\nlab report: {report} (send the whole directory {args.lab_report})")
    return 0
