"""`cvmlab probe --lab-report DIR`: everything a lab engineer sends when a first TDX/SNP run fails.

The report is a directory that is also a recorded host: the files the probe reads, at
the paths it reads them (`proc/cmdline`, `proc/cpuinfo`, `proc/sys/kernel/osrelease`,
`sys/module/{kvm,kvm_intel,kvm_amd,ccp}/parameters/*`, `etc/modprobe.d/*` options for
those modules, the firmware images' last 64 KiB where their footer table lives, the kernel
log as `dmesg`), plus `recorded.json` (device nodes' ownership, the user who ran the
probe, KVM's and QEMU's facts, vendor-stack signs) and, for people, `report.md` and
`probe.json`. `replay_probe(DIR)` runs the same probe on it elsewhere, which is how a
developer reproduces a lab's verdict and how the lab rehearsal (tests/test_lab_rehearsal.py)
feeds recorded configurations to the probe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from orchestrator.host import coco_host
from orchestrator.host.ovmf import TAIL_BYTES
from orchestrator.host.probe import HostProbe, probe_host
from orchestrator.kvm.facts import KvmFacts
from orchestrator.qemu.introspect import QemuFacts

MODULES = ("kvm", "kvm_intel", "kvm_amd", "ccp")
PLAIN_FILES = ("/proc/cmdline", "/proc/cpuinfo", "/proc/sys/kernel/osrelease")
NODES = ("/dev/kvm", "/dev/sev", "/dev/tdx_guest", "/dev/sev-guest")
# Kernel lines worth a lab engineer's eye in report.md (the full log is in `dmesg`).
_INTERESTING = re.compile(r"virt/tdx|tdx|TDX|SEV|SNP|RMP|ccp|kvm_amd|kvm_intel|SEAM", re.I)


def _copy_text(src: Path, dst: Path) -> None:
    try:
        data = src.read_bytes()
    except OSError:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)


def _node(path: Path) -> dict[str, Any] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {
        "mode": oct(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "char": stat.S_ISCHR(st.st_mode),
    }


def _firmware_paths(probe: HostProbe) -> list[str]:
    found = []
    for name in ("tdx", "snp"):
        evidence = probe.tiers[name].evidence
        search = evidence.get("firmware_search", {})
        candidates = [evidence.get("firmware"), search.get("missing")]
        candidates += [r.split(":", 1)[0] for r in search.get("rejected", [])]
        found += [c for c in candidates if c]
    return sorted(set(found))


def write_lab_report(directory: Path, probe: HostProbe, root: Path = Path("/")) -> Path:
    """Write the report of `probe` (measured on `root`) into `directory`; return report.md."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for name in PLAIN_FILES:
        _copy_text(root / name.lstrip("/"), directory / name.lstrip("/"))
    for node in NODES:  # the probe checks existence; recorded.json holds mode and owner
        if (root / node.lstrip("/")).exists():
            (directory / "dev").mkdir(exist_ok=True)
            (directory / node.lstrip("/")).write_text("")
    for module in sorted({*MODULES, *probe.host.kvm_modules}):
        params = root / "sys/module" / module / "parameters"
        if (root / "sys/module" / module).is_dir():  # loaded, even without parameters
            (directory / "sys/module" / module).mkdir(parents=True, exist_ok=True)
        try:
            names = sorted(os.listdir(params))
        except OSError:
            continue
        for name in names:
            _copy_text(params / name, directory / "sys/module" / module / "parameters" / name)
    modprobe = root / "etc/modprobe.d"
    for conf in sorted(modprobe.glob("*.conf")) if modprobe.is_dir() else []:
        try:
            lines = conf.read_text(errors="replace").splitlines()
        except OSError:
            continue
        kept = [x for x in lines if x.split()[:1] == ["options"] and x.split()[1:2][0] in MODULES]
        if kept:
            target = directory / "etc/modprobe.d" / conf.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(kept) + "\n")
    for firmware in _firmware_paths(probe):
        source = root / firmware.lstrip("/")
        try:
            with source.open("rb") as image:
                size = image.seek(0, os.SEEK_END)
                image.seek(max(0, size - TAIL_BYTES))
                tail = image.read()
        except OSError:
            continue
        target = directory / firmware.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(tail)
    log = coco_host.read_kernel_log(root)
    (directory / coco_host.DMESG_FILE).write_text("\n".join(log.lines) + "\n")
    who = coco_host.Credentials.current()
    recorded = {
        "user": {"uid": who.uid, "gids": sorted(who.gids)},
        "nodes": {n: _node(root / n.lstrip("/")) for n in NODES if _node(root / n.lstrip("/"))},
        "kvm": probe.kvm.to_json() if probe.kvm is not None else None,
        "qemu": probe.qemu.to_json() if probe.qemu is not None else None,
        "kernel_log_source": log.source,
        "vendor_stack": {
            kind: coco_host.vendor_stack_signs(kind, root, probe.host.module_params)
            for kind in ("tdx", "snp")
        },
    }
    (directory / coco_host.RECORDED).write_text(json.dumps(recorded, indent=2) + "\n")
    (directory / "probe.json").write_text(json.dumps(probe.to_json(), indent=2, default=str))
    report = directory / "report.md"
    report.write_text(format_report(probe, log, recorded))
    return report


def format_report(probe: HostProbe, log: coco_host.KernelLog, recorded: dict[str, Any]) -> str:
    """The human part: verdicts with their fixes, then the facts they rest on."""
    host = probe.host
    lines = [
        "# cvmlab lab report",
        "",
        f"- host kernel: Linux {host.kernel_release} ({host.cpu_model})",
        f"- kvm modules: {', '.join(host.kvm_modules) or 'none'}",
        f"- module parameters: {', '.join(f'{k}={v}' for k, v in host.module_params.items())}",
    ]
    if probe.qemu is not None:
        props = {t: sorted(probe.qemu.property_names(t)) for t in ("tdx-guest", "sev-snp-guest")}
        lines.append(f"- QEMU: {probe.qemu.describe()} {probe.qemu.package}".rstrip())
        for type_name, names in props.items():
            lines.append(f"  - {type_name}: {', '.join(names) if names else 'absent'}")
    else:
        lines.append(f"- QEMU: none ({probe.qemu_error})")
    if probe.kvm is not None:
        lines.append(f"- KVM_CAP_VM_TYPES: {probe.kvm.vm_types:#x} ({probe.kvm.reason or 'ok'})")
    for kind, signs in recorded["vendor_stack"].items():
        if signs:
            lines.append(f"- vendor stack ({kind}): {'; '.join(signs)}")
    lines += ["", "## Tiers", ""]
    for tier in probe.tiers.values():
        lines.append(f"- **{tier.name}**: {'yes' if tier.available else 'no'} - {tier.reason}")
    lines += ["", "## Firmware", ""]
    for kind in ("tdx", "snp"):
        search = probe.tiers[kind].evidence.get("firmware_search", {})
        lines.append(f"- {kind}: {probe.tiers[kind].evidence.get('firmware')}")
        table = search.get("firmware_table")
        if table:
            lines.append(f"  - table: {json.dumps(table)}")
        for rejected in search.get("rejected", []):
            lines.append(f"  - rejected: {rejected}")
    lines += ["", f"## Kernel log (TDX/SNP lines, from {log.source})", "", "```"]
    lines += [x for x in log.lines if _INTERESTING.search(x)][-200:] or ["(none)"]
    lines += ["```", ""]
    return "\n".join(lines)


def replay_probe(directory: Path) -> HostProbe:
    """The probe run on a recorded host (a lab report directory, or a rehearsal fixture)."""
    recorded = coco_host.recorded(directory)
    qemu = QemuFacts.from_json(recorded["qemu"]) if recorded.get("qemu") else None
    kvm = KvmFacts.from_json(recorded["kvm"]) if recorded.get("kvm") else None
    # No QEMU recorded: name one that cannot exist, so this machine's QEMU is not probed.
    missing = str(directory / "recorded-host-had-no-qemu")
    return probe_host(missing, root=directory, qemu_facts=qemu, kvm_facts=kvm)


def copy_report(src: Path, dst: Path) -> Path:
    """A writable copy of a recorded host (fixtures stay pristine)."""
    shutil.copytree(src, dst)
    return dst


__all__ = ["copy_report", "format_report", "replay_probe", "write_lab_report"]
