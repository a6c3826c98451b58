"""What this host can run: the tiers of DESIGN.md section 1, each with its evidence.

`probe_host()` measures the host once (QEMU facts from `introspect_qemu`, which
are cached; KVM capabilities from `orchestrator.kvm.facts`; module parameters,
`/dev` nodes and cpuinfo; firmware on disk) and returns a `HostProbe` whose
tiers say yes with the evidence, or no with the reason. Scenarios CANCEL with
`HostProbe.require(...)`'s text when a tier they need is missing.

`root` re-roots every file the probe reads (`root/sys/module/kvm_intel/
parameters/tdx`, `root/proc/cpuinfo`, `root/dev/kvm`, firmware paths), so tests
describe a TDX or SNP host as a directory of plain files. KVM ioctls only run
against a real character device; a fake tree's `dev/kvm` is a plain file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import selectors
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.errors import CvmlabError, QemuError, SpecError
from orchestrator.host import coco_host, ovmf
from orchestrator.host.ovmf import FirmwareTable, read_firmware
from orchestrator.qemu.introspect import DEFAULT_BINARY, QemuFacts, introspect_qemu
from orchestrator.qemu.version import feature

if TYPE_CHECKING:
    from orchestrator.kvm.facts import KvmFacts
    from orchestrator.qemu.spec import Accel

log = logging.getLogger(__name__)

TIER_NAMES = ("tcg", "kvm", "gmem", "sw-protected", "snp", "tdx", "nested")
# Set by `cvmlab lab` for the command it runs inside the kernel under test.
LAB_ENV = {
    "origin": "CVMLAB_LAB_KERNEL_ORIGIN",
    "outer_host_kernel": "CVMLAB_LAB_HOST_KERNEL",
    "outer_qemu": "CVMLAB_LAB_OUTER_QEMU",
}
VENDOR_KVM_MODULES = ("kvm_intel", "kvm_amd")
ACCEL_CHECK_TIMEOUT_S = 15.0

# Known firmware locations, most specific first. Generic OVMF builds are only
# taken when their GUID table proves support (see `ovmf_guids`).
TDX_FIRMWARE_PATHS = (
    "/usr/share/ovmf/OVMF.inteltdx.fd",
    "/usr/share/edk2/ovmf/OVMF.inteltdx.fd",
    "/usr/share/qemu/OVMF.inteltdx.fd",
    "/usr/share/ovmf/OVMF.fd",
    "/usr/share/edk2/ovmf/OVMF.fd",
    "/usr/share/qemu/OVMF.fd",
)
SNP_FIRMWARE_PATHS = (
    "/usr/share/ovmf/OVMF.amdsev.fd",
    "/usr/share/edk2/ovmf/OVMF.amdsev.fd",
    "/usr/share/qemu/OVMF.amdsev.fd",
    "/usr/share/ovmf/OVMF.fd",
    "/usr/share/edk2/ovmf/OVMF.fd",
    "/usr/share/qemu/OVMF.fd",
)
# File names that only TDX / SNP-capable builds carry: trusted by name.
TDX_FIRMWARE_NAMES = ("OVMF.inteltdx.fd",)
SNP_FIRMWARE_NAMES = ("OVMF.amdsev.fd",)
# QEMU firmware descriptors (docs/interop/firmware.json), searched in this order.
FIRMWARE_DESCRIPTOR_DIRS = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")

# OVMF's GUIDed table at the end of the flash image (QEMU pc_sysfw_ovmf.c).
OVMF_TABLE_FOOTER_GUID = ovmf.TABLE_FOOTER_GUID
# TDVF metadata (QEMU hw/i386/tdvf.c): points at the sections QEMU loads for a TD.
TDX_METADATA_OFFSET_GUID = ovmf.TDX_METADATA_OFFSET_GUID
# SEV metadata (pages to pre-validate): what QEMU needs to launch an SNP guest.
OVMF_SEV_METADATA_GUID = ovmf.SEV_METADATA_GUID

FirmwareKind = Literal["tdx", "snp"]
# Where a lab names its firmware for every probe (scenarios included) without code.
FIRMWARE_ENV: dict[FirmwareKind, str] = {
    "tdx": "CVMLAB_TDX_FIRMWARE",
    "snp": "CVMLAB_SNP_FIRMWARE",
}
_FIRMWARE = {
    "tdx": ("intel-tdx", TDX_FIRMWARE_PATHS, TDX_FIRMWARE_NAMES, TDX_METADATA_OFFSET_GUID),
    "snp": ("amd-sev-snp", SNP_FIRMWARE_PATHS, SNP_FIRMWARE_NAMES, OVMF_SEV_METADATA_GUID),
}


@dataclass(frozen=True)
class Tier:
    """One tier: available or not, why, and the facts that decided it."""

    name: str
    available: bool
    reason: str  # why it is missing; when available, a one-line summary of the evidence
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HostInfo:
    kernel_release: str
    cpu_model: str
    nested: bool  # cpuinfo has the `hypervisor` flag: this host is itself a guest
    cpu_flags: tuple[str, ...]  # the virtualisation-related cpuinfo flags present
    module_params: dict[str, str]  # "kvm_intel.tdx" -> "Y", for every parameter read
    kvm_modules: tuple[str, ...]  # kvm* entries under /sys/module
    # Inside `cvmlab lab`: the kernel under test (this kernel), where it came from, and the
    # outer host's kernel and QEMU; None on a plain host.
    lab: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HostProbe:
    """Every tier of this host, with the facts behind them."""

    tiers: dict[str, Tier]
    qemu: QemuFacts | None
    kvm: KvmFacts | None
    host: HostInfo
    duration_s: float
    qemu_error: str | None = None  # why `qemu` is None

    def best_accel(self) -> Literal["kvm", "tcg"]:
        """`kvm` when that tier is available, else `tcg`."""
        return "kvm" if self.tiers["kvm"].available else "tcg"

    def require(self, tiers: Iterable[str]) -> str | None:
        """None when every tier is available; else the reason text for a CANCEL."""
        missing = []
        for name in tiers:
            tier = self.tiers.get(name)
            if tier is None:
                raise SpecError(f"unknown tier {name!r}", f"use one of: {', '.join(TIER_NAMES)}")
            if not tier.available:
                missing.append(f"tier {name} is not available on this host: {tier.reason}")
        return "; ".join(missing) or None

    def to_json(self) -> dict[str, Any]:
        qemu: dict[str, Any] | None = None
        if self.qemu is not None:
            # The full type list is long and lives in the facts cache; keep the summary.
            full = self.qemu.to_json()
            qemu = {k: full[k] for k in ("command", "binary", "version", "package")}
            qemu["accelerators"] = full["accelerators"]
            qemu["types_of_interest"] = sorted(self.qemu.properties)
            qemu["from_cache"] = self.qemu.from_cache
            qemu["probe_s"] = self.qemu.probe_s
        return {
            "tiers": {name: tier.to_json() for name, tier in self.tiers.items()},
            "best_accel": self.best_accel(),
            "host": self.host.to_json(),
            "qemu": qemu,
            "qemu_error": self.qemu_error,
            "kvm": dataclasses.asdict(self.kvm) if self.kvm is not None else None,
            "duration_s": self.duration_s,
        }


# --- reading the (possibly fake) host --------------------------------------------------


class _Host:
    """Files of the host under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.params: dict[str, str] = {}
        self._kernel_log: coco_host.KernelLog | None = None

    def kernel_log(self) -> coco_host.KernelLog:
        """The kernel log, read once per probe (the TDX and SNP tiers both search it)."""
        if self._kernel_log is None:
            self._kernel_log = coco_host.read_kernel_log(self.root)
        return self._kernel_log

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str) -> str | None:
        try:
            return self.path(absolute).read_text(errors="replace")
        except OSError:
            return None

    def module_loaded(self, module: str) -> bool:
        return self.path(f"/sys/module/{module}").is_dir()

    def param(self, module: str, name: str) -> str | None:
        value = self.read(f"/sys/module/{module}/parameters/{name}")
        if value is None:
            return None
        self.params[f"{module}.{name}"] = value.strip()
        return value.strip()

    def kvm_modules(self) -> tuple[str, ...]:
        try:
            names = os.listdir(self.path("/sys/module"))
        except OSError:
            return ()
        return tuple(sorted(n for n in names if n == "kvm" or n.startswith("kvm_")))


def _enabled(value: str | None) -> bool:
    return value is not None and value.strip() in ("Y", "y", "1")


def _cpuinfo(host: _Host) -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU."""
    model, flags = "unknown", set[str]()
    for line in (host.read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _kernel_release(host: _Host) -> str:
    release = host.read("/proc/sys/kernel/osrelease")
    if release is not None:
        return release.strip()
    return os.uname().release if host.root == Path("/") else "unknown"


# --- firmware ------------------------------------------------------------------------------


def ovmf_guids(path: Path) -> set[uuid.UUID] | None:
    """GUIDs in an OVMF image's footer table, or None when it has no such table.

    Layout (QEMU hw/i386/pc_sysfw_ovmf.c): the table ends 32 bytes before the end
    of the image with a footer entry (u16 total length, footer GUID); each entry
    before it ends with its own (u16 length, GUID), data in front. The parsing, and
    what the entries point at, is `orchestrator.host.ovmf`.
    """
    table = read_firmware(path)
    return None if table is None else table.guids


def _firmware_fit(kind: FirmwareKind, table: FirmwareTable | None) -> str | None:
    """Why this image cannot boot a `kind` guest with -bios, judged by what its table points
    at (a GUID alone proves nothing: every x86-64 OVMF carries both markers); None if fit."""
    if table is None:
        return "no OVMF footer table (not an OVMF/TDVF image, or truncated)"
    if kind == "tdx":
        if TDX_METADATA_OFFSET_GUID not in table.entries:
            return "no TDX metadata offset in its table (not a TDVF-capable build)"
        if not table.tdvf_ready:
            return "TDVF metadata unusable: " + ("; ".join(table.problems) or "no sections")
        return None
    if OVMF_SEV_METADATA_GUID not in table.entries:
        return "no SEV metadata offset in its table (an Ia32X64 or non-SEV build)"
    if not table.sev_snp_ready:
        return "SEV metadata unusable: " + ("; ".join(table.problems) or "no sections")
    return None


def _descriptor_candidates(host: _Host, feature_name: str) -> list[tuple[str, str, str]]:
    """(firmware path, descriptor file, mapping device) of descriptors with `feature_name`."""
    found = []
    for directory in FIRMWARE_DESCRIPTOR_DIRS:
        try:
            names = sorted(os.listdir(host.path(directory)))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".json"):
                continue
            descriptor = f"{directory}/{name}"
            try:
                data = json.loads(host.path(descriptor).read_text())
                features = set(data.get("features", ()))
                mapping = data.get("mapping", {})
                device = str(mapping.get("device", ""))
                filename = mapping.get("filename") or mapping.get("executable", {}).get("filename")
                targets = {t.get("architecture") for t in data.get("targets", ())}
            except (OSError, ValueError, AttributeError, TypeError):
                continue
            if feature_name in features and filename and (not targets or "x86_64" in targets):
                found.append((str(filename), descriptor, device))
    # -bios needs the whole image in one file: "memory" mappings first.
    return sorted(found, key=lambda item: item[2] != "memory")


def find_firmware(
    kind: FirmwareKind, root: Path = Path("/"), override: Path | None = None
) -> tuple[str | None, dict[str, Any]]:
    """(firmware path or None, evidence) for a TDX (TDVF) or SNP (OVMF) guest.

    Order: `override`; QEMU firmware descriptors declaring the feature; file names
    only TDX/SNP builds carry; generic OVMF.fd. Every candidate except an override is
    judged by what its footer table points at (`_firmware_fit`); the evidence carries
    the table (`firmware_table`), from which the SNP spec decides `kernel-hashes`.
    """
    feature_name, paths, trusted_names, _guid = _FIRMWARE[kind]
    host = _Host(root)
    evidence: dict[str, Any] = {"searched": []}

    def judge(path: str) -> str | None:
        table = read_firmware(host.path(path))
        problem = _firmware_fit(kind, table)
        evidence["firmware_table"] = None if table is None else table.describe()
        evidence["guid_table_has_support"] = problem is None
        return problem

    if override is not None:
        evidence["source"] = "override"
        if not host.path(str(override)).is_file():
            evidence["missing"] = str(override)
            return None, evidence
        problem = judge(str(override))
        if problem:  # the lab said so: use it, but say what the table shows
            evidence["table_problem"] = problem
        return str(override), evidence
    for path, descriptor, device in _descriptor_candidates(host, feature_name):
        evidence["searched"].append(descriptor)
        if host.path(path).is_file():
            evidence.update(source=f"descriptor {descriptor}", mapping_device=device)
            problem = judge(path)
            if problem:
                evidence["table_problem"] = problem
            return path, evidence
    for path in paths:
        evidence["searched"].append(path)
        if not host.path(path).is_file():
            continue
        problem = judge(path)
        if problem is None:
            named = Path(path).name in trusted_names
            evidence["source"] = "known file name" if named else "its OVMF table"
            return path, evidence
        evidence.setdefault("rejected", []).append(f"{path}: {problem}")
    evidence.pop("firmware_table", None)
    evidence.pop("guid_table_has_support", None)
    return None, evidence


# --- tiers ---------------------------------------------------------------------------------


def _tcg_tier(qemu: QemuFacts | None, qemu_error: str | None) -> Tier:
    if qemu is None:
        return Tier("tcg", False, qemu_error or "QEMU was not introspected", {})
    evidence = {
        "qemu": qemu.binary,
        "version": str(qemu.version),
        "accelerators": sorted(qemu.accelerators),
    }
    if "tcg" not in qemu.accelerators:
        return Tier("tcg", False, f"{qemu.describe()} was built without TCG", evidence)
    return Tier("tcg", True, f"{qemu.describe()} has TCG", evidence)


def _kvm_tier(
    host: _Host,
    qemu: QemuFacts | None,
    kvm: KvmFacts | None,
    flags: set[str],
    boot_check: dict[str, Any] | None,
) -> Tier:
    device = host.path("/dev/kvm")
    vendor = [m for m in VENDOR_KVM_MODULES if host.module_loaded(m)]
    others = [m for m in host.kvm_modules() if m != "kvm" and m not in VENDOR_KVM_MODULES]
    nested = "hypervisor" in flags
    evidence: dict[str, Any] = {
        "device": str(device),
        "device_exists": device.exists(),
        "vendor_modules": vendor,
        "other_kvm_modules": others,
        "cpu_virt_flags": sorted(flags & {"vmx", "svm"}),
        "nested": nested,
    }
    problems = []
    if not device.exists():
        problems.append("/dev/kvm does not exist (no KVM module loaded)")
    elif not os.access(device, os.R_OK | os.W_OK):
        problems.append("no permission to open /dev/kvm read-write: join group kvm")
    if not vendor:
        backing = f"provided by {', '.join(others)}" if others else "not from kvm_intel/kvm_amd"
        if device.exists():
            problems.append(
                f"/dev/kvm is present but {backing}, not kvm_intel or kvm_amd: not usable "
                "for stock guests (they hang or hit an emulation failure)"
            )
        else:
            problems.append("neither kvm_intel nor kvm_amd is loaded")
    is_char_device = device.exists() and stat.S_ISCHR(device.stat().st_mode)
    if kvm is not None and is_char_device:
        evidence["kvm_usable"] = kvm.usable
        if not kvm.usable:
            problems.append(kvm.reason)
    if qemu is not None and "kvm" not in qemu.accelerators:
        problems.append(f"{qemu.describe()} was built without KVM")
    if boot_check is not None:
        evidence["boot_check"] = boot_check
        if not boot_check.get("reached_marker"):
            problems.append(f"boot check with -accel kvm failed: {boot_check['result']}")
    if problems:
        return Tier("kvm", False, "; ".join(problems) + "; guests run under TCG", evidence)
    where = "nested, under a hypervisor" if nested else "bare metal"
    summary = f"/dev/kvm from {', '.join(vendor)} ({where})"
    if boot_check is not None:
        summary += f"; a guest booted with -accel kvm in {boot_check['seconds']:.1f} s"
    return Tier("kvm", True, summary, evidence)


def _kvm_facts(host: _Host) -> tuple[KvmFacts | None, str]:
    """KVM capabilities, or None with why they could not be read."""
    try:
        from orchestrator.kvm.facts import kvm_facts
    except ImportError as error:
        return None, f"orchestrator.kvm.facts is not available ({error})"
    try:
        return kvm_facts(device=str(host.path("/dev/kvm"))), ""
    except (OSError, CvmlabError) as error:
        return None, f"reading KVM capabilities failed: {error}"


def _kvm_fact_tier(name: str, kvm: KvmFacts | None, why_none: str) -> Tier:
    if kvm is None:
        return Tier(name, False, why_none, {})
    from orchestrator.kvm.facts import gmem_tier, sw_protected_tier

    decide = gmem_tier if name == "gmem" else sw_protected_tier
    available, text = decide(kvm)
    evidence = {"device": kvm.device, "vm_types": kvm.vm_types, "gmem_flags": kvm.gmem_flags}
    return Tier(name, available, text, evidence)


def _coco_qemu_problem(qemu: QemuFacts | None, kind: Literal["tdx", "snp"]) -> str | None:
    """Why this QEMU cannot launch a `kind` guest through upstream KVM, or None.

    Decided by capability: the QOM type, then upstream's properties on it (a vendor fork
    that has the type but not them is named as such, whatever its version)."""
    type_name = "tdx-guest" if kind == "tdx" else "sev-snp-guest"
    if qemu is None:
        return "no usable QEMU"
    if not qemu.has_type(type_name):
        since = feature(type_name).since
        return (
            f"{qemu.describe()} has no {type_name} object (upstream QEMU >= {since.short()} "
            f"has it, when built with {'TDX' if kind == 'tdx' else 'SEV'} support): install one, "
            "or name it with --qemu / CVMLAB_QEMU"
        )
    return coco_host.qemu_interface_problem(
        kind, type_name, True, qemu.property_names(type_name), str(qemu.version)
    )


def _vm_types(kvm: KvmFacts | None) -> tuple[int | None, str]:
    if kvm is None:
        return None, "KVM facts not read"
    return (kvm.vm_types, "") if kvm.usable else (None, kvm.reason)


def _snp_tier(
    host: _Host,
    qemu: QemuFacts | None,
    flags: set[str],
    firmware: Path | None,
    kvm: KvmFacts | None = None,
) -> Tier:
    sev_snp = host.param("kvm_amd", "sev_snp")
    sev_node, sev_user, sev_access = coco_host.device_access(host.root, "/dev/sev")
    fw_path, fw_evidence = find_firmware("snp", host.root, firmware)
    state = coco_host.snp_host_state(host.root, host.kernel_log())
    vm_types, kvm_reason = _vm_types(kvm)
    params = {"kvm_amd.sev_snp": sev_snp}
    evidence: dict[str, Any] = {
        "kvm_amd.sev_snp": sev_snp,
        "kvm_amd.sev": host.param("kvm_amd", "sev"),
        "kvm_amd.sev_es": host.param("kvm_amd", "sev_es"),
        "/dev/sev": sev_node is not None,
        "/dev/sev_access": sev_access or f"read-write for uid {sev_user.uid}",
        "cpu_flags": sorted(flags & {"sev", "sev_es", "sev_snp"}),
        "kvm_vm_types": None if vm_types is None else hex(vm_types),
        "snp_init": state.to_json(),
        "vendor_stack": coco_host.vendor_stack_signs("snp", host.root, params),
        "firmware": fw_path,
        "firmware_search": fw_evidence,
    }
    problems = []
    if not host.module_loaded("kvm_amd"):
        problems.append("kvm_amd is not loaded")
    elif not _enabled(sev_snp):
        fix = (
            coco_host.BIOS_SNP_FIX
            if "sev_snp" not in flags
            else "boot with kvm_amd.sev_snp=1 on a kernel >= 6.11"
        )
        problems.append(f"kvm_amd parameter sev_snp is {sev_snp or 'absent'}, not Y: {fix}")
    else:
        init = coco_host.snp_init_problem(state)
        if init:
            problems.append(init)
        vm_problem = coco_host.kvm_vm_type_problem("snp", vm_types, kvm_reason)
        if vm_problem:
            problems.append(vm_problem)
    if sev_node is None:
        problems.append("/dev/sev does not exist (no ccp/PSP driver): load ccp, check the BIOS")
    elif sev_access:
        problems.append(sev_access)
    qemu_problem = _coco_qemu_problem(qemu, "snp")
    if qemu_problem:
        problems.append(qemu_problem)
    if fw_path is None:
        problems.append(_firmware_problem("SNP-capable OVMF", fw_evidence, "snp"))
    if problems:
        return Tier("snp", False, "; ".join(problems), evidence)
    assert qemu is not None
    api = state.snp_api
    firmware_note = f", SNP firmware {api[0]}.{api[1]}" if api else ""
    return Tier(
        "snp",
        True,
        f"kvm_amd sev_snp=Y, KVM_X86_SNP_VM, /dev/sev rw{firmware_note}, {qemu.describe()} "
        f"with sev-snp-guest, firmware {fw_path}",
        evidence,
    )


def _tdx_tier(
    host: _Host,
    qemu: QemuFacts | None,
    flags: set[str],
    firmware: Path | None,
    kvm: KvmFacts | None = None,
) -> Tier:
    tdx = host.param("kvm_intel", "tdx")
    fw_path, fw_evidence = find_firmware("tdx", host.root, firmware)
    state = coco_host.tdx_host_state(host.root, host.kernel_log())
    vm_types, kvm_reason = _vm_types(kvm)
    evidence: dict[str, Any] = {
        "kvm_intel.tdx": tdx,
        "cpu_flags": sorted(flags & {"tdx_host_platform", "vmx"}),
        "kvm_vm_types": None if vm_types is None else hex(vm_types),
        "tdx_init": state.to_json(),
        "vendor_stack": coco_host.vendor_stack_signs("tdx", host.root, {"kvm_intel.tdx": tdx}),
        "firmware": fw_path,
        "firmware_search": fw_evidence,
    }
    problems = []
    if not host.module_loaded("kvm_intel"):
        problems.append("kvm_intel is not loaded")
    elif not _enabled(tdx):
        problems.append(coco_host.tdx_param_problem(tdx, state))
    else:
        vm_problem = coco_host.kvm_vm_type_problem("tdx", vm_types, kvm_reason)
        if vm_problem:
            problems.append(vm_problem)
    qemu_problem = _coco_qemu_problem(qemu, "tdx")
    if qemu_problem:
        problems.append(qemu_problem)
    if fw_path is None:
        problems.append(_firmware_problem("TDVF", fw_evidence, "tdx"))
    if problems:
        return Tier("tdx", False, "; ".join(problems), evidence)
    assert qemu is not None
    return Tier(
        "tdx",
        True,
        f"kvm_intel tdx=Y, KVM_X86_TDX_VM, {qemu.describe()} with tdx-guest, firmware {fw_path}",
        evidence,
    )


def _firmware_problem(what: str, evidence: dict[str, Any], kind: FirmwareKind) -> str:
    if "missing" in evidence:
        return f"{what} {evidence['missing']} (given) does not exist"
    rejected = evidence.get("rejected")
    extra = f" ({'; '.join(rejected)})" if rejected else ""
    return (
        f"no {what} found in the usual places{extra}; name it with "
        f"`cvmlab probe --{kind}-firmware PATH` or {FIRMWARE_ENV[kind]}=PATH"
    )


def _nested_tier(qemu: QemuFacts | None, qemu_error: str | None) -> Tier:
    """The kernel-under-test lab (`cvmlab lab`): TCG's `-cpu max` must offer SVM and NPT.

    The lab boots a kernel of the user's choice under TCG; kvm_amd loads there because
    TCG emulates AMD SVM with nested paging, so kvm and gmem inside are the chosen
    kernel's, whatever this host's kernel has.
    """
    if qemu is None:
        return Tier("nested", False, qemu_error or "QEMU was not introspected", {})
    evidence: dict[str, Any] = {
        "qemu": qemu.binary,
        "version": str(qemu.version),
        "tcg_max_cpu": dict(qemu.tcg_max_cpu),
        "kernel_under_test": "chosen per run: cvmlab lab --kernel SERIES, or --vmlinuz PATH",
    }
    if "tcg" not in qemu.accelerators:
        return Tier("nested", False, f"{qemu.describe()} was built without TCG", evidence)
    missing = [f for f in ("svm", "npt") if not qemu.tcg_max_cpu.get(f)]
    if missing:
        return Tier(
            "nested",
            False,
            f"{qemu.describe()}'s TCG `-cpu max` lacks {' and '.join(missing)}: kvm_amd "
            "cannot load in the lab; install QEMU >= 10.0 (ci/setup-host.sh)",
            evidence,
        )
    return Tier(
        "nested",
        True,
        f"{qemu.describe()} emulates SVM with nested paging under TCG: `cvmlab lab` gives "
        "real kvm and gmem on a kernel under test",
        evidence,
    )


def _lab_facts(release: str) -> dict[str, str] | None:
    """The lab's own facts when this probe runs inside `cvmlab lab`, else None."""
    if os.environ.get("CVMLAB_LAB") != "1":
        return None
    facts = {"kernel_under_test": release}
    facts.update({key: os.environ.get(name, "unknown") for key, name in LAB_ENV.items()})
    return facts


# --- the optional boot check ------------------------------------------------------------------


def _boot_check(qemu: QemuFacts, timeout: float, accel: Accel = "kvm") -> dict[str, Any]:
    """Boot the default image with `accel`; did it print its readiness marker in time?

    `accel` is "kvm" for the probe; tests pass "tcg" to see the check succeed here.
    """
    from orchestrator.qemu.argv import Plumbing, build_argv
    from orchestrator.qemu.spawn import spawn
    from orchestrator.qemu.spec import KernelBoot, MachineSpec

    try:
        from orchestrator.image import default_image

        image = default_image(progress=log.info)
    except (ImportError, CvmlabError) as error:
        return {
            "reached_marker": False,
            "result": f"the default image is not built or not usable ({error}); "
            "build it with `cvmlab image build`",
        }
    spec = MachineSpec(
        boot=KernelBoot(kernel=str(image.kernel), initrd=str(image.initrd), cmdline=image.cmdline),
        accel=accel,
        cpu="host" if accel == "kvm" else "max",
        ssh_forward=False,
        pvpanic=False,
        name="cvmlab-accel-check",
    )
    rundir = tempfile.mkdtemp(prefix="cvmlab-")
    os.chmod(rundir, 0o700)
    argv = [*qemu.command, *build_argv(spec, Plumbing(qmp_socket=f"{rundir}/qmp.sock"))[1:]]
    started = time.monotonic()
    try:
        with tempfile.TemporaryFile() as stderr:
            # spawn(): the guest dies with us even if the probe is killed mid-check.
            proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
            try:
                result = _wait_for_marker(proc, image.ready_marker, started + timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace").strip().splitlines()[-3:]
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 2)
    if tail and not result["reached_marker"]:
        result["stderr_tail"] = tail
    return result


def _wait_for_marker(proc: subprocess.Popen[bytes], marker: str, deadline: float) -> dict[str, Any]:
    assert proc.stdout is not None
    wanted = marker.encode()
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {
                    "reached_marker": False,
                    "result": "no readiness marker before the deadline",
                }
            if not selector.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                status = proc.wait()
                return {"reached_marker": False, "result": f"QEMU exited with status {status}"}
            seen = (seen + chunk)[-(len(wanted) + 65536) :]
            if wanted in seen:
                return {"reached_marker": True, "result": "readiness marker seen"}


# --- entry point -----------------------------------------------------------------------------


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "")
    return Path(value) if value else None


def probe_host(
    qemu_binary: str | Sequence[str] = DEFAULT_BINARY,
    *,
    root: Path = Path("/"),
    check_accel: bool = False,
    tdx_firmware: Path | None = None,
    snp_firmware: Path | None = None,
    accel_check_timeout: float = ACCEL_CHECK_TIMEOUT_S,
    qemu_facts: QemuFacts | None = None,
    kvm_facts: KvmFacts | None = None,
) -> HostProbe:
    """Measure this host (or the fake tree at `root`) and name every tier it supports.

    A missing QEMU is not raised: it makes `tcg` (and every tier needing QEMU)
    unavailable, with `qemu_error` saying why. `check_accel` also boots the
    default image with -accel kvm (seconds; needs the image built). Firmware not
    given is taken from $CVMLAB_TDX_FIRMWARE / $CVMLAB_SNP_FIRMWARE, else searched.
    `qemu_facts`
    replaces introspecting `qemu_binary` (facts already at hand, or a QEMU only
    documented, such as a TDX-capable one in a fake-host test).
    """
    started = time.monotonic()
    host = _Host(root)
    tdx_firmware = tdx_firmware or _env_path(FIRMWARE_ENV["tdx"])
    snp_firmware = snp_firmware or _env_path(FIRMWARE_ENV["snp"])
    qemu: QemuFacts | None = None
    qemu_error: str | None = None
    if qemu_facts is not None:
        qemu = qemu_facts
    else:
        try:
            qemu = introspect_qemu(qemu_binary)
        except QemuError as error:
            qemu_error = str(error)
    model, flags = _cpuinfo(host)
    # `kvm_facts`: recorded facts of a lab host (the rehearsal), instead of /dev/kvm's.
    kvm, why_no_kvm = (kvm_facts, "") if kvm_facts is not None else _kvm_facts(host)
    boot_check = None
    if check_accel:
        if qemu is None or "kvm" not in qemu.accelerators:
            boot_check = {"reached_marker": False, "result": "no QEMU with KVM to boot with"}
        else:
            boot_check = _boot_check(qemu, accel_check_timeout)
            log.info("kvm boot check: %s", boot_check)
    tiers = {
        "tcg": _tcg_tier(qemu, qemu_error),
        "kvm": _kvm_tier(host, qemu, kvm, flags, boot_check),
        "gmem": _kvm_fact_tier("gmem", kvm, why_no_kvm),
        "sw-protected": _kvm_fact_tier("sw-protected", kvm, why_no_kvm),
        "snp": _snp_tier(host, qemu, flags, snp_firmware, kvm),
        "tdx": _tdx_tier(host, qemu, flags, tdx_firmware, kvm),
        "nested": _nested_tier(qemu, qemu_error),
    }
    # Nested virtualisation support of the vendor module, as evidence.
    for module in VENDOR_KVM_MODULES:
        host.param(module, "nested")
    info = HostInfo(
        kernel_release=_kernel_release(host),
        cpu_model=model,
        nested="hypervisor" in flags,
        cpu_flags=tuple(
            sorted(
                flags
                & {"vmx", "svm", "hypervisor", "sev", "sev_es", "sev_snp", "tdx_host_platform"}
            )
        ),
        module_params=dict(sorted(host.params.items())),
        kvm_modules=host.kvm_modules(),
        lab=_lab_facts(_kernel_release(host)),
    )
    return HostProbe(tiers, qemu, kvm, info, time.monotonic() - started, qemu_error)


# --- one probe for every test of a job -----------------------------------------------


@dataclass(frozen=True)
class SharedProbe:
    """A probe and who measured it when: the process itself, or a parent it forked from."""

    probe: HostProbe
    measured_at: float  # time.time()
    measured_by: int  # pid

    @functools.cached_property
    def json_text(self) -> str:
        """probe.json's text: the probe and its provenance (made once, like the probe)."""
        record = {**self.probe.to_json(), "measured_at": self.measured_at,
                  "measured_by_pid": self.measured_by}  # fmt: skip
        return json.dumps(record, indent=2, default=str)


_SHARED: dict[tuple[str, ...], SharedProbe] = {}


def shared_probe(qemu_binary: str | Sequence[str] = DEFAULT_BINARY) -> SharedProbe:
    """`probe_host(qemu_binary)`, measured once per process and inherited by its forks.

    Why: every scenario test probes the host in its set-up. The cvmlab-fork spawner's
    server measures it before it forks any test (orchestrator.lab.fork_warm), so the
    tests of a job share one measurement, as they share one host: in the lab, 0.4 s of
    Python under TCG per test. A test in its own process measures it itself.
    """
    key = (qemu_binary,) if isinstance(qemu_binary, str) else tuple(qemu_binary)
    found = _SHARED.get(key)
    if found is None:
        found = SharedProbe(probe_host(qemu_binary), time.time(), os.getpid())
        _SHARED[key] = found
    return found
