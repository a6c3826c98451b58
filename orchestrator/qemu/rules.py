"""QEMU's rules on machine specs, checked before QEMU is started.

QEMU refuses many combinations only at start (or, worse, the guest fails
later with an unhelpful message). `validate` states each rule up front: one
small check function per rule, in a table with the rule's id and source, so
the error names the rule, what is wrong and what to do.

Two kinds of failure:
- `SpecError`: the spec breaks a rule of QEMU/KVM/the guest (sources:
  research/interfaces.md sections 1-3 and 8, and QEMU's own messages).
- `QemuError`: the target QEMU (from `introspect_qemu`) lacks an object,
  property, accelerator or machine type the generated command line uses;
  the message names that QEMU's version and the version that has it.

Pure: no I/O. Property names are taken from the argv builder's own output,
so what is checked is exactly what would be run.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from orchestrator.errors import QemuError, SpecError
from orchestrator.qemu.argv import Plumbing, build_argv
from orchestrator.qemu.introspect import QemuFacts
from orchestrator.qemu.spec import (
    Backend,
    Firmware,
    MachineSpec,
    MemfdBackend,
    SevGuest,
    SnpGuest,
    TdxGuest,
    VirtioMem,
)
from orchestrator.qemu.version import (
    PROPERTY_FEATURES,
    TYPE_FEATURES,
    feature,
)
from orchestrator.units import MiB, format_size

MHz = 1_000_000
GHz = 1_000 * MHz

# Measured with the default image (Debian 6.12 cloud kernel, 11 MB bzImage + 7 MB
# initramfs) under TCG: 80 MiB boots; 76 MiB and less triple-fault while the kernel
# decompresses, before any console output, and with -no-reboot QEMU then exits with
# status 0, which looks like a clean poweroff. 128 MiB leaves room for kernel growth.
MIN_MEMORY = 128 * MiB
# x86-64 default huge page size (Hugepagesize in /proc/meminfo) and THP size:
# QEMU's defaults when hugetlbsize or virtio-mem's block-size are not given.
DEFAULT_HUGEPAGE = 2 * MiB
VIRTIO_MEM_DEFAULT_BLOCK = 2 * MiB
# QEMU: "'block-size' property has to be at least 0x100000" (measured on 10.0.2).
VIRTIO_MEM_MIN_BLOCK = 1 * MiB

TDX_ATTR_SEPT_VE_DISABLE = 1 << 28
TDX_ATTR_PKS = 1 << 30
TDX_ATTR_PERFMON = 1 << 63
TDX_ATTRS_ALLOWED = TDX_ATTR_SEPT_VE_DISABLE | TDX_ATTR_PKS | TDX_ATTR_PERFMON
TDX_CPU_MODELS = ("host", "max")
TDX_TSC_MIN = 100 * MHz
TDX_TSC_MAX = 10 * GHz
TDX_TSC_STEP = 25 * MHz
TDX_DIGEST_BYTES = 48  # SHA-384

SNP_POLICY_RESERVED_ONE = 1 << 17
# SEV-SNP firmware ABI "Guest Policy": 7:0 ABI minor, 15:8 ABI major, 16 SMT, 17 reserved
# (must be one), 18 MIGRATE_MA, 19 DEBUG, 20 SINGLE_SOCKET; the ABI defines newer bits 21-25
# (CXL_ALLOW, MEM_AES_256_XTS, RAPL_DIS, CIPHERTEXT_HIDING, PAGE_SWAP_DISABLE), but KVM's
# SNP_POLICY_MASK_VALID (arch/x86/kvm/svm/sev.c) ends at bit 20 and snp_launch_start()
# returns EINVAL for anything outside it, MIGRATE_MA (18) included.
SNP_POLICY_MIGRATE_MA = 1 << 18
SNP_POLICY_DEFINED = (1 << 21) - 1  # bits KVM's valid mask spans (MIGRATE_MA then removed)
# sev-guest's policy property is a uint32 (QAPI SevGuestProperties); bit 2 selects SEV-ES.
SEV_POLICY_ES = 1 << 2
SNP_BASE64_BYTES = {
    "id-block": 96,
    "id-auth": 4096,
    "host-data": 32,
    "guest-visible-workarounds": 16,
}


@dataclass(frozen=True)
class Problem:
    """What a check found wrong, and what to do about it."""

    problem: str
    fix: str


Check = Callable[[MachineSpec, QemuFacts | None], Problem | None]


@dataclass(frozen=True)
class Rule:
    """One rule: `id` appears in every message it produces."""

    id: str
    summary: str
    source: str
    check: Check


@dataclass(frozen=True)
class Violation:
    rule: Rule
    problem: Problem

    def message(self) -> str:
        return f"rule {self.rule.id}: {self.problem.problem}: {self.problem.fix}"


# --- helpers --------------------------------------------------------------------------


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _backends(spec: MachineSpec) -> Iterator[tuple[str, Backend, int]]:
    """(what, backend, size) for guest RAM and the virtio-mem memdev."""
    yield "guest memory", spec.backend, spec.memory
    if spec.virtio_mem is not None:
        yield "virtio-mem memory", spec.virtio_mem.backend, spec.virtio_mem.size


def _firmware(spec: MachineSpec) -> Firmware | None:
    return spec.boot.firmware


def _cpu_model(spec: MachineSpec) -> str:
    return spec.cpu.split(",", 1)[0]


def _machine_options(spec: MachineSpec) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in spec.machine.split(",")[1:]:
        key, _, value = item.partition("=")
        options[key.replace("_", "-")] = value
    return options


def _base64_length(value: str) -> int | None:
    """Decoded length of strict base64, or None when it is not base64."""
    try:
        return len(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        return None


def _bad_base64(fields: dict[str, tuple[str | None, int]]) -> list[str]:
    bad = []
    for name, (value, wanted) in fields.items():
        if value is None:
            continue
        length = _base64_length(value)
        if length is None:
            bad.append(f"{name} is not base64")
        elif length != wanted:
            bad.append(f"{name} decodes to {length} bytes, not {wanted}")
    return bad


def _virtio_mem_block(vmem: VirtioMem) -> int:
    if vmem.block_size is not None:
        return vmem.block_size
    backend = vmem.backend
    if isinstance(backend, MemfdBackend) and backend.hugetlb:
        return backend.hugetlbsize or DEFAULT_HUGEPAGE
    return VIRTIO_MEM_DEFAULT_BLOCK


# --- machine-wide rules ------------------------------------------------------------------


def check_smp(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    if spec.smp >= 1:
        return None
    return Problem(f"smp={spec.smp}: a guest needs at least one vCPU", "set smp to 1 or more")


def check_memory_min(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    if spec.memory >= MIN_MEMORY:
        return None
    return Problem(
        f"memory={format_size(spec.memory)} is below {format_size(MIN_MEMORY)}: the guest "
        "kernel decompresses itself and unpacks its initramfs into RAM; the default image "
        "triple-faults below 80M before printing anything, and QEMU (-no-reboot) then exits "
        "with status 0 as if the guest had powered off (a bare number is bytes: memory=512 "
        "is 512 bytes)",
        f"give memory={format_size(MIN_MEMORY)} or more with a unit, e.g. 512M (the default)",
    )


def check_hugetlbsize_needs_hugetlb(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    for what, backend, _size in _backends(spec):
        if isinstance(backend, MemfdBackend) and backend.hugetlbsize and not backend.hugetlb:
            return Problem(
                f"{what}: hugetlbsize={format_size(backend.hugetlbsize)} without hugetlb=on "
                "(QEMU ignores the size of pages it does not use)",
                "set hugetlb=on, or drop hugetlbsize",
            )
    return None


def check_hugetlb_alignment(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    for what, backend, size in _backends(spec):
        if not (isinstance(backend, MemfdBackend) and backend.hugetlb):
            continue
        page = backend.hugetlbsize or DEFAULT_HUGEPAGE
        if not _is_power_of_two(page):
            return Problem(
                f"{what}: hugetlbsize={page} is not a power of two",
                "use a huge page size of the host (2M or 1G on x86)",
            )
        if size % page:
            return Problem(
                f"{what}: size {format_size(size)} is not a multiple of the huge page size "
                f"{format_size(page)} (the memfd cannot be sized to it)",
                f"round the size to a multiple of {format_size(page)}",
            )
    return None


def check_virtio_mem_block_size(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    vmem = spec.virtio_mem
    if vmem is None or vmem.block_size is None:
        return None
    block = vmem.block_size
    if not _is_power_of_two(block) or block < VIRTIO_MEM_MIN_BLOCK:
        return Problem(
            f"virtio-mem block-size={block} is not a power of two >= "
            f"{format_size(VIRTIO_MEM_MIN_BLOCK)} (QEMU: \"'block-size' property has to be "
            'at least 0x100000" / "has to be a power of two")',
            "use a power of two of at least 1M, e.g. 2M (the default on x86)",
        )
    backend = vmem.backend
    if isinstance(backend, MemfdBackend) and backend.hugetlb:
        page = backend.hugetlbsize or DEFAULT_HUGEPAGE
        if block < page:
            return Problem(
                f"virtio-mem block-size={format_size(block)} is smaller than its backend's "
                f"huge page size {format_size(page)}",
                f"use block-size={format_size(page)} or larger",
            )
    return None


def check_virtio_mem_sizes(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    vmem = spec.virtio_mem
    if vmem is None:
        return None
    block = _virtio_mem_block(vmem)
    if not _is_power_of_two(block):
        return None  # reported by virtio-mem-block-size
    origin = "block-size" if vmem.block_size is not None else "default block size"
    for name, value in (("size", vmem.size), ("requested-size", vmem.requested_size)):
        if value % block:
            return Problem(
                f"virtio-mem {name}={format_size(value)} is not a multiple of the {origin} "
                f"{format_size(block)} (QEMU: \"has to be multiples of 'block-size'\")",
                f"round {name} to a multiple of {format_size(block)}",
            )
    return None


def check_virtio_mem_requested(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    vmem = spec.virtio_mem
    if vmem is None or vmem.requested_size <= vmem.size:
        return None
    return Problem(
        f"virtio-mem requested-size={format_size(vmem.requested_size)} exceeds its size "
        f"{format_size(vmem.size)}: the device cannot plug more than its memdev holds",
        "raise virtio_mem_size or lower virtio_mem_requested",
    )


def check_virtio_mem_confidential(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    if spec.virtio_mem is None or spec.confidential is None:
        return None
    refusal = feature("virtio-mem-coco-refusal")
    if qemu is not None and qemu.version < refusal.since:
        return None  # 9.1-10.0: QEMU starts it; what it does is what a test may explore
    which = qemu.describe() if qemu is not None else "QEMU (version unknown, assumed current)"
    return Problem(
        f"virtio-mem with a {_kind(spec)} guest: {which} refuses it from "
        f'{refusal.since.short()} on ("Failed to set RamDiscardManager": guest_memfd RAM '
        "already has a RamDiscardManager, and a region holds only one)",
        "drop virtio_mem_size for confidential guests (use the balloon), or run a "
        "non-confidential guest",
    )


# --- TDX (interfaces.md section 1) ---------------------------------------------------------


def _kind(spec: MachineSpec) -> str:
    """How messages name the confidential guest type."""
    cgs = spec.confidential
    assert cgs is not None
    if isinstance(cgs, SevGuest):
        return "SEV-ES" if cgs.es else "SEV"
    return "TDX" if cgs.kind == "tdx" else "SEV-SNP"


def _tdx(spec: MachineSpec) -> TdxGuest | None:
    return spec.confidential if isinstance(spec.confidential, TdxGuest) else None


def _snp(spec: MachineSpec) -> SnpGuest | None:
    return spec.confidential if isinstance(spec.confidential, SnpGuest) else None


def _sev(spec: MachineSpec) -> SevGuest | None:
    return spec.confidential if isinstance(spec.confidential, SevGuest) else None


def _amd(spec: MachineSpec) -> SnpGuest | SevGuest | None:
    """The SEV-family object (SNP or legacy SEV/SEV-ES): both have cbitpos/reduced-phys-bits."""
    cgs = spec.confidential
    return cgs if isinstance(cgs, (SnpGuest, SevGuest)) else None


def check_confidential_accel(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    if spec.confidential is None or spec.accel == "kvm":
        return None
    kind = _kind(spec)
    return Problem(
        f"a {kind} guest with accel={spec.accel}: only KVM can create {kind} VMs",
        f"set accel=kvm (on a host whose probe offers the {spec.confidential.kind} tier)",
    )


def check_tdx_cpu_model(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    if _tdx(spec) is None or _cpu_model(spec) in TDX_CPU_MODELS:
        return None
    return Problem(
        f'TDX with the named CPU model {_cpu_model(spec)!r} (QEMU: "Named cpu model is not '
        'supported for TDX yet!")',
        "use cpu=host (or max)",
    )


def check_confidential_pflash(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    firmware = _firmware(spec)
    if spec.confidential is None or firmware is None or firmware.interface != "pflash":
        return None
    sev = _sev(spec)
    # KVM refuses read-only memslots once a VM has protected state: KVM_X86_SEV_ES_VM,
    # SNP and TDX (svm_vm_init, kvm_arch_has_readonly_mem). Plain SEV, and SEV-ES on a
    # legacy default-type VM, keep them.
    if sev is not None and (not sev.es or sev.legacy_vm_type == "on"):
        return None
    kind = _kind(spec)
    return Problem(
        f'{kind} with pflash firmware: {kind} VMs have no read-only memslots (QEMU: "pflash '
        'with kvm requires KVM readonly memory support")',
        "load the firmware with firmware_interface=bios",
    )


def check_confidential_firmware(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    if spec.confidential is None or _firmware(spec) is not None:
        return None
    if isinstance(spec.confidential, TdxGuest):
        return Problem(
            "TDX without firmware: QEMU's default SeaBIOS has no TDX metadata, a TD boots only "
            "from TDVF",
            "give firmware=PATH to a TDVF build (e.g. /usr/share/ovmf/OVMF.inteltdx.fd; "
            "`cvmlab probe` names the one it found)",
        )
    if isinstance(spec.confidential, SevGuest):
        return Problem(
            f"{_kind(spec)} without firmware: SeaBIOS does not set the C-bit in its page "
            "tables, so the guest cannot start encrypted",
            "give firmware=PATH to an OVMF built with SEV support (e.g. "
            "/usr/share/ovmf/OVMF.amdsev.fd or the distribution's OVMF.fd)",
        )
    return Problem(
        "SEV-SNP without firmware: QEMU's default SeaBIOS cannot run as an SNP guest",
        "give firmware=PATH to an SNP-capable OVMF (e.g. /usr/share/ovmf/OVMF.amdsev.fd; "
        "`cvmlab probe` names the one it found)",
    )


def check_tdx_tsc_frequency(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    tsc = spec.tsc_frequency
    if _tdx(spec) is None or tsc is None:
        return None
    if TDX_TSC_MIN <= tsc <= TDX_TSC_MAX and tsc % TDX_TSC_STEP == 0:
        return None
    return Problem(
        f"TDX tsc-frequency={tsc} Hz: TDX needs 100 MHz..10 GHz in steps of 25 MHz",
        f"use a multiple of 25 MHz, e.g. "
        f"{min(TDX_TSC_MAX, max(TDX_TSC_MIN, tsc - tsc % TDX_TSC_STEP))}, "
        "or leave tsc_frequency unset",
    )


def check_tdx_attributes(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    tdx = _tdx(spec)
    if tdx is None or tdx.attributes is None:
        return None
    extra = tdx.attributes & ~TDX_ATTRS_ALLOWED
    if tdx.attributes >= 0 and extra == 0:
        return None
    return Problem(
        f"TDX attributes={tdx.attributes:#x} set bits {extra:#x} outside SEPT_VE_DISABLE(28) | "
        'PKS(30) | PERFMON(63) (QEMU: "Some QEMU unsupported TD attribute bits being '
        'requested"; DEBUG, bit 0, is not accepted either)',
        f"keep only bits {TDX_ATTRS_ALLOWED:#x}; PKS and PERFMON come from -cpu +pks / pmu=on",
    )


def check_tdx_sept_ve_conflict(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    tdx = _tdx(spec)
    if tdx is None or tdx.attributes is None or tdx.sept_ve_disable is None:
        return None
    in_attributes = bool(tdx.attributes & TDX_ATTR_SEPT_VE_DISABLE)
    if in_attributes == tdx.sept_ve_disable:
        return None
    return Problem(
        f"TDX attributes={tdx.attributes:#x} (bit 28 {'set' if in_attributes else 'clear'}) "
        f"disagree with sept-ve-disable={'on' if tdx.sept_ve_disable else 'off'}: both write "
        "bit 28, and which wins depends on the order QEMU sets them",
        "give one of the two",
    )


def check_tdx_digests(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    tdx = _tdx(spec)
    if tdx is None:
        return None
    bad = _bad_base64(
        {
            "mrconfigid": (tdx.mrconfigid, TDX_DIGEST_BYTES),
            "mrowner": (tdx.mrowner, TDX_DIGEST_BYTES),
            "mrownerconfig": (tdx.mrownerconfig, TDX_DIGEST_BYTES),
        }
    )
    if not bad:
        return None
    return Problem(
        f'TDX {"; ".join(bad)} (QEMU: "sha384 digest was N bytes, expected 48 bytes")',
        "give base64 of exactly 48 bytes (a SHA-384 digest), e.g. `sha384sum | xxd -r -p | "
        "base64 -w0`",
    )


def check_tdx_quote_socket(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    tdx = _tdx(spec)
    qgs = tdx.quote_generation_socket if tdx is not None else None
    if qgs is None:
        return None
    if qgs.type == "vsock":
        if qgs.cid is None or qgs.port is None or qgs.path is not None:
            return Problem(
                f"TDX quote-generation-socket of type vsock needs cid and port and no path "
                f"(got cid={qgs.cid}, port={qgs.port}, path={qgs.path!r})",
                "give qgs_vsock_port (and qgs_vsock_cid, default 2 = the host), or qgs_path",
            )
        if not (0 <= qgs.cid < 2**32 and 0 <= qgs.port < 2**32):
            return Problem(
                f"TDX quote-generation-socket vsock cid={qgs.cid} port={qgs.port} out of range",
                "use 32-bit unsigned values (cid 2 is the host)",
            )
        return None
    if qgs.type == "unix":
        if not qgs.path or qgs.cid is not None or qgs.port is not None:
            return Problem(
                "TDX quote-generation-socket of type unix needs a path and no cid/port",
                "give qgs_path=/var/run/tdx-qgs/qgs.socket (or where the lab's QGS listens)",
            )
        return None
    return Problem(f"TDX quote-generation-socket type {qgs.type!r} is unknown", "use vsock or unix")


def check_tdx_machine_options(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    if _tdx(spec) is None:
        return None
    options = _machine_options(spec)
    refused = []
    if options.get("smm") == "on":
        refused.append('smm=on ("TDX VM doesn\'t support SMM")')
    if options.get("pic") == "on":
        refused.append("pic=on (TDX has no PIC)")
    irqchip = options.get("kernel-irqchip")
    if irqchip not in (None, "split"):
        refused.append(f'kernel-irqchip={irqchip} ("TDX VM requires kernel_irqchip to be split")')
    if not refused:
        return None
    return Problem(
        f"TDX with machine options {', '.join(refused)}",
        "drop them from machine=; cvmlab adds kernel-irqchip=split itself",
    )


# --- SEV-SNP (interfaces.md section 2) -----------------------------------------------------


def check_snp_reduced_phys_bits(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    amd = _amd(spec)
    if amd is None:
        return None
    rpb = amd.reduced_phys_bits
    if rpb is not None and 1 <= rpb <= 63:
        return None
    return Problem(
        f"{_kind(spec)} reduced-phys-bits={rpb}: it is required and must be 1..63",
        "give reduced_phys_bits from `query-sev-capabilities` on the lab host (normally 1)",
    )


def check_snp_cbitpos(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    amd = _amd(spec)
    if amd is None:
        return None
    if amd.cbitpos is not None and 1 <= amd.cbitpos <= 63:
        return None
    return Problem(
        f"{_kind(spec)} cbitpos={amd.cbitpos}: it must be given and equal the host's C-bit "
        '(CPUID 0x8000001F EBX[5:0], else QEMU: "cbitpos check failed")',
        "give cbitpos from `query-sev-capabilities` on the lab host (51 on Milan/Genoa, "
        "47 on older parts)",
    )


def check_snp_policy(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    snp = _snp(spec)
    if snp is None or snp.policy & SNP_POLICY_RESERVED_ONE:
        return None
    return Problem(
        f"SEV-SNP policy={snp.policy:#x} has reserved bit 17 clear; the SNP firmware "
        "requires it to be 1 and fails SNP_LAUNCH_START otherwise",
        f"set bit 17, e.g. policy={snp.policy | SNP_POLICY_RESERVED_ONE:#x} "
        "(QEMU's default is 0x30000)",
    )


def check_snp_policy_bits(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    snp = _snp(spec)
    if snp is None:
        return None
    undefined = snp.policy & ~SNP_POLICY_DEFINED
    migrate = snp.policy & SNP_POLICY_MIGRATE_MA
    if snp.policy < 0 or not (undefined or migrate):
        return None
    what = []
    if undefined:
        what.append(
            f"bits {undefined:#x} beyond bit 20, outside KVM's SNP_POLICY_MASK_VALID "
            "(the ABI's newer bits 21-25 included)"
        )
    if migrate:
        what.append("bit 18 (MIGRATE_MA), which KVM never accepts (not in its valid mask)")
    return Problem(
        f"SEV-SNP policy={snp.policy:#x} sets {' and '.join(what)}: KVM's "
        "KVM_SEV_SNP_LAUNCH_START returns EINVAL (arch/x86/kvm/svm/sev.c snp_launch_start)",
        f"clear them, e.g. policy={snp.policy & SNP_POLICY_DEFINED & ~SNP_POLICY_MIGRATE_MA:#x}",
    )


def check_sev_policy(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    sev = _sev(spec)
    if sev is None or 0 <= sev.policy < 2**32:
        return None
    return Problem(
        f"SEV policy={sev.policy:#x} does not fit sev-guest's uint32 policy property",
        "give a 32-bit policy: 0x1 (NODBG) for SEV, 0x5 (NODBG|ES) for SEV-ES",
    )


def check_snp_blobs(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    snp = _snp(spec)
    if snp is None:
        return None
    bad = _bad_base64(
        {
            "id-block": (snp.id_block, SNP_BASE64_BYTES["id-block"]),
            "id-auth": (snp.id_auth, SNP_BASE64_BYTES["id-auth"]),
            "host-data": (snp.host_data, SNP_BASE64_BYTES["host-data"]),
            "guest-visible-workarounds": (
                snp.guest_visible_workarounds,
                SNP_BASE64_BYTES["guest-visible-workarounds"],
            ),
        }
    )
    if not bad:
        return None
    return Problem(
        f"SEV-SNP {'; '.join(bad)}",
        "give base64 of exactly: id-block 96 bytes, id-auth 4096, host-data 32, "
        "guest-visible-workarounds 16",
    )


# --- what the target QEMU has -----------------------------------------------------------


def _device_properties(value: str) -> tuple[str, set[str]]:
    """`virtio-mem-pci,id=vm0,memdev=vmem0` -> ("virtio-mem-pci", {"memdev"})."""
    items = value.replace(",,", "\0").split(",")
    props = {item.partition("=")[0] for item in items[1:]}
    return items[0], props - {"id"}


def required_qom(spec: MachineSpec) -> dict[str, set[str]]:
    """QOM type -> property names that `build_argv(spec)` uses on -object and -device."""
    argv = build_argv(spec, Plumbing(qmp_socket="/nonexistent/qmp.sock"))
    needed: dict[str, set[str]] = {}
    for option, value in itertools.pairwise(argv):
        if option == "-object":
            body = json.loads(value)
            type_name = str(body.pop("qom-type"))
            body.pop("id", None)
            needed.setdefault(type_name, set()).update(body)
        elif option == "-device":
            type_name, props = _device_properties(value)
            needed.setdefault(type_name, set()).update(props)
    return needed


def _upgrade_hint(qemu: QemuFacts, feature_name: str | None, what: str) -> tuple[str, str]:
    """(why it is missing, what to do) for a type or property this QEMU lacks."""
    if feature_name is not None:
        since = feature(feature_name).since
        if qemu.version < since:
            return (
                f"{what} needs QEMU >= {since.short()}",
                f"use a QEMU >= {since.short()} with --qemu or qemu= (for tdx-guest, "
                "ENVIRONMENT.md shows QEMU 11.1 from trixie-backports in a private prefix)",
            )
    return (
        f"this QEMU has version >= the one that introduced {what}, so it was built without it",
        "use a QEMU built with it (a distribution build with TDX/SEV support)",
    )


def check_qemu_accel(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    if qemu is None or spec.accel in qemu.accelerators:
        return None
    return Problem(
        f"{qemu.describe()} was built without the {spec.accel} accelerator "
        f"(it has: {', '.join(sorted(qemu.accelerators))})",
        "use another accel, or a QEMU built with it",
    )


def check_qemu_machine(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    machine = spec.machine.split(",", 1)[0]
    if qemu is None or machine in qemu.machines:
        return None
    return Problem(
        f"{qemu.describe()} has no machine type {machine!r}",
        "use machine=q35 (or one `qemu-system-x86_64 -machine help` lists)",
    )


def check_qemu_objects(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    if qemu is None:
        return None
    for type_name in sorted(required_qom(spec)):
        if not qemu.has_type(type_name):
            why, fix = _upgrade_hint(qemu, TYPE_FEATURES.get(type_name), type_name)
            return Problem(f"{qemu.describe()} has no {type_name} object; {why}", fix)
    return None


def check_qemu_properties(spec: MachineSpec, qemu: QemuFacts | None) -> Problem | None:
    if qemu is None:
        return None
    for type_name, props in sorted(required_qom(spec).items()):
        if type_name not in qemu.properties:
            continue  # not introspected (or absent: qemu-object reports that)
        for prop in sorted(props):
            if not qemu.has_property(type_name, prop):
                what = f"{type_name}'s {prop} property"
                why, fix = _upgrade_hint(qemu, PROPERTY_FEATURES.get((type_name, prop)), what)
                return Problem(f"{qemu.describe()} has no {what}; {why}", fix)
    return None


# --- the table ---------------------------------------------------------------------------

SPEC_RULES: tuple[Rule, ...] = (
    Rule("smp-min", "at least one vCPU", "QEMU -smp", check_smp),
    Rule("memory-min", "memory >= 128 MiB", "measured: default image needs >= 80 MiB",
         check_memory_min),
    Rule("hugetlbsize-needs-hugetlb", "hugetlbsize only with hugetlb=on",
         "QAPI MemoryBackendMemfdProperties", check_hugetlbsize_needs_hugetlb),
    Rule("hugetlb-alignment", "backend size a multiple of the huge page size",
         "memfd_create(MFD_HUGETLB) + ftruncate", check_hugetlb_alignment),
    Rule("virtio-mem-block-size", "block size a power of two >= 1 MiB and >= backend page",
         "hw/virtio/virtio-mem.c (measured on 10.0.2)", check_virtio_mem_block_size),
    Rule("virtio-mem-alignment", "size and requested-size multiples of the block size",
         "hw/virtio/virtio-mem.c (measured on 10.0.2)", check_virtio_mem_sizes),
    Rule("virtio-mem-requested", "requested-size <= size", "virtio-mem semantics",
         check_virtio_mem_requested),
    Rule("virtio-mem-confidential", "no virtio-mem with TDX/SNP on QEMU >= 10.1",
         "interfaces.md sections 3, 8.3", check_virtio_mem_confidential),
    Rule("confidential-accel", "TDX and SNP need accel=kvm", "interfaces.md sections 1-2",
         check_confidential_accel),
    Rule("confidential-pflash", "TDX and SNP load firmware with -bios, not pflash",
         "interfaces.md sections 1-2, 8.6", check_confidential_pflash),
    Rule("confidential-firmware", "TDX needs TDVF, SNP an SNP-capable OVMF",
         "interfaces.md sections 1-2", check_confidential_firmware),
    Rule("tdx-cpu-model", "TDX only with cpu=host or max", "target/i386/kvm/tdx.c",
         check_tdx_cpu_model),
    Rule("tdx-tsc-frequency", "TDX TSC 100 MHz..10 GHz, multiple of 25 MHz",
         "target/i386/kvm/tdx.c", check_tdx_tsc_frequency),
    Rule("tdx-attributes", "TDX attributes within SEPT_VE_DISABLE|PKS|PERFMON",
         "target/i386/kvm/tdx.c", check_tdx_attributes),
    Rule("tdx-sept-ve-conflict", "attributes bit 28 agrees with sept-ve-disable",
         "tdx-guest property setters", check_tdx_sept_ve_conflict),
    Rule("tdx-digest", "mrconfigid/mrowner/mrownerconfig: base64 of 48 bytes",
         "target/i386/kvm/tdx.c", check_tdx_digests),
    Rule("tdx-quote-socket", "quote-generation-socket complete (vsock cid+port, or unix path)",
         "QAPI SocketAddress; interfaces.md section 1", check_tdx_quote_socket),
    Rule("tdx-machine-options", "no smm=on, pic=on, or non-split irqchip with TDX",
         "tdx_kvm_init()", check_tdx_machine_options),
    Rule("snp-reduced-phys-bits", "reduced-phys-bits given, 1..63 (SNP and SEV)",
         "target/i386/sev.c", check_snp_reduced_phys_bits),
    Rule("snp-cbitpos", "cbitpos given (SNP and SEV)", "target/i386/sev.c", check_snp_cbitpos),
    Rule("snp-policy", "SNP policy bit 17 (reserved, must be one) set",
         "SEV-SNP firmware ABI, guest policy", check_snp_policy),
    Rule("snp-policy-bits", "SNP policy: no MIGRATE_MA, nothing beyond bit 20",
         "SEV-SNP firmware ABI; arch/x86/kvm/svm/sev.c SNP_POLICY_MASK_VALID",
         check_snp_policy_bits),
    Rule("sev-policy", "SEV policy fits 32 bits", "QAPI SevGuestProperties", check_sev_policy),
    Rule("snp-blob-size", "id-block 96, id-auth 4096, host-data 32, workarounds 16 bytes",
         "target/i386/sev.c", check_snp_blobs),
)  # fmt: skip

QEMU_RULES: tuple[Rule, ...] = (
    Rule("qemu-accel", "the accelerator is built in", "introspection", check_qemu_accel),
    Rule("qemu-machine", "the machine type exists", "introspection", check_qemu_machine),
    Rule("qemu-object", "every -object/-device type exists", "introspection",
         check_qemu_objects),
    Rule("qemu-property", "every property used exists", "introspection",
         check_qemu_properties),
)  # fmt: skip

RULES: tuple[Rule, ...] = SPEC_RULES + QEMU_RULES


def violations(
    spec: MachineSpec, qemu: QemuFacts | None = None, rules: tuple[Rule, ...] = RULES
) -> list[Violation]:
    """Every rule `spec` breaks, in table order (spec rules before QEMU's)."""
    found = []
    for rule in rules:
        problem = rule.check(spec, qemu)
        if problem is not None:
            found.append(Violation(rule, problem))
    return found


def validate(spec: MachineSpec, qemu: QemuFacts | None = None) -> None:
    """Raise for the first broken rule: SpecError for the spec, QemuError for this QEMU.

    Spec rules come first (fix the spec before changing QEMU). The error's
    `detail` lists every other broken rule too, so one run shows them all.
    """
    spec_found = violations(spec, qemu, SPEC_RULES)
    found = spec_found or violations(spec, qemu, QEMU_RULES)
    if not found:
        return
    first, rest = found[0], found[1:]
    error_type = SpecError if spec_found else QemuError
    detail = "\n".join(f"also: {v.message()}" for v in rest)
    raise error_type(f"rule {first.rule.id}: {first.problem.problem}", first.problem.fix, detail)
