"""Complete a confidential machine spec from the host it will run on, before launch.

`spec_from_params` gives what the user asked for; `rules.validate` knows QEMU's
rules in general. What only this host can answer is decided here, once, by
`prepare_confidential(spec, probe)`:

- SEV-SNP and SEV: `cbitpos` and `reduced_phys_bits` come from QMP
  `query-sev-capabilities` of the target QEMU (started with `-machine none -accel
  kvm`; QEMU answers "KVM not enabled" under TCG and "SEV is not enabled in KVM"
  on a host without SEV, both measured on QEMU 10.0.2 and 11.1.3), else from CPUID
  leaf 0x8000001F read through /dev/cpu/0/cpuid. QEMU itself fills the answer from
  that same leaf (EBX[5:0]) and always reports reduced-phys-bits 1
  (target/i386/sev.c `sev_get_capabilities`: "When SEV feature is enabled, we
  loose one bit in guest physical addressing"), so the CPUID fallback does the
  same. A value given explicitly that differs from the host's is an error naming
  both: QEMU would fail later with "cbitpos check failed". A reduced_phys_bits given
  explicitly is kept: QEMU's answer of 1 is QEMU's constant, not a host fact.
- Firmware: a spec without one gets the TDVF / SNP-capable OVMF the probe found
  (`probe.find_firmware`: $CVMLAB_TDX_FIRMWARE / $CVMLAB_SNP_FIRMWARE, QEMU's
  firmware descriptors, the usual file names, OVMF GUID tables), loaded with
  -bios. None found is an error that lists where it looked and how to name one.
- TDX: a Linux guest needs SEPT_VE_DISABLE ("TD misconfiguration: SEPT_VE_DISABLE
  attribute must be set", arch/x86/coco/tdx/tdx.c); KVM caps a TD at the host's
  present CPUs (tdx_vm_init); phys-bits must equal the host's
  (tdx_check_features); a unix quote-generation socket must exist.
- SEV-SNP: a policy that forbids SMT (bit 16 clear) on a host with SMT active is
  refused by the SNP firmware at SNP_LAUNCH_START.
- SEV-SNP and SEV with -kernel: `kernel-hashes` follows the firmware's own table
  (`decide_kernel_hashes`, facts in orchestrator/host/ovmf.py): on for an AmdSev build
  (it refuses an unhashed -kernel with EFI_ACCESS_DENIED and the guest never reaches its
  kernel), off for a generic OVMF (QEMU exits: "guest firmware hashes table area is
  invalid"). A value given explicitly that contradicts the table is a SpecError.
- TDX quote generation: the quote-generation-socket must answer (a unix socket that
  accepts, a vsock port that accepts, as QEMU will connect): a stopped QGS is the host's
  missing capability (HostError, a CANCEL), not a guest failure.
- SEV/SEV-ES: kvm_amd's `sev`/`sev_es` must be on, and with `legacy-vm-type=off`
  KVM must offer KVM_X86_SEV_VM / KVM_X86_SEV_ES_VM (KVM_CAP_VM_TYPES bits 2/3,
  Linux >= 6.10); guest RAM is pinned, so RLIMIT_MEMLOCK must cover it unless root.

Errors: `SpecError` when the spec asks for something the host cannot give (a
mismatching cbitpos, a TD with more vCPUs than the host has), `HostError` when the
host lacks a capability (no SEV in CPUID, kvm_amd sev=N): scenarios CANCEL on the
latter, like on a missing tier.

Lab-only: every path that succeeds needs an SEV/SNP or TDX host. On the
development machines only the refusals run (QEMU's "SEV is not enabled in KVM",
CPUID 0x8000001F without SEV); the arithmetic is tested with pytest against the
facts above (tests/test_confidential.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import socket
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import HostError, QemuError, SpecError
from orchestrator.host.ovmf import FirmwareTable, read_firmware
from orchestrator.host.probe import FIRMWARE_ENV, FirmwareKind, HostProbe, find_firmware
from orchestrator.qemu.spawn import spawn
from orchestrator.qemu.spec import (
    Confidential,
    DiskBoot,
    Firmware,
    KernelBoot,
    MachineSpec,
    QuoteGenerationSocket,
    SevGuest,
    SnpGuest,
    TdxGuest,
)
from orchestrator.units import format_size

SEV_LEAF = 0x8000001F
PHYS_ADDR_LEAF = 0x80000008
EXT_MAX_LEAF = 0x80000000
CPUID_DEVICE = "/dev/cpu/0/cpuid"
# CPUID 0x8000001F EAX: bit 1 SEV, bit 3 SEV-ES, bit 4 SEV-SNP (AMD APM vol. 3, E.4.17).
CPUID_SEV = 1 << 1
CPUID_SEV_ES = 1 << 3
CPUID_SEV_SNP = 1 << 4
# QEMU's sev_get_capabilities() always answers 1 (see the module docstring).
QEMU_REDUCED_PHYS_BITS = 1
QUERY_TIMEOUT_S = 20.0

TDX_ATTR_SEPT_VE_DISABLE = 1 << 28
SNP_POLICY_SMT = 1 << 16
# KVM_CAP_VM_TYPES bits (arch/x86/include/uapi/asm/kvm.h).
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3

SEV_CAPABILITY_HINT = (
    "on an SEV host: load kvm_amd with sev=1 (and sev_snp=1 for SNP), check that /dev/sev "
    "exists, and read `query-sev-capabilities`; or give cbitpos= and reduced_phys_bits= "
    "from the lab's notes"
)


# --- the host's C-bit -----------------------------------------------------------------------


@dataclass(frozen=True)
class SevCapabilities:
    """The SEV facts of this host that a spec must agree with."""

    cbitpos: int
    reduced_phys_bits: int
    source: str  # where they were read, for messages
    sev: bool = True
    sev_es: bool | None = None  # None: not known (QMP does not say)
    sev_snp: bool | None = None
    host_phys_reduction: int | None = None  # CPUID EBX[11:6]: the host's own reduction

    @classmethod
    def from_qmp(cls, answer: Mapping[str, Any], source: str) -> SevCapabilities:
        """From `query-sev-capabilities`' return value (QAPI SevCapability)."""
        try:
            return cls(
                cbitpos=int(answer["cbitpos"]),
                reduced_phys_bits=int(answer["reduced-phys-bits"]),
                source=source,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise QemuError(
                f"query-sev-capabilities answered without a usable cbitpos/reduced-phys-bits "
                f"({error}): {dict(answer)!r}",
                "check the QEMU build; give cbitpos= and reduced_phys_bits= explicitly",
            ) from None

    @classmethod
    def from_cpuid(cls, eax: int, ebx: int, source: str) -> SevCapabilities:
        """From CPUID 0x8000001F (EAX feature bits, EBX C-bit and reduction); HostError
        when EAX says the CPU has no SEV at all."""
        if not eax & CPUID_SEV:
            raise HostError(
                f"CPUID {SEV_LEAF:#x} reports no SEV (EAX={eax:#x}, bit 1 clear; {source})",
                "run SEV and SEV-SNP guests on an AMD EPYC host with SEV enabled in its BIOS",
            )
        return cls(
            cbitpos=ebx & 0x3F,
            reduced_phys_bits=QEMU_REDUCED_PHYS_BITS,
            source=source,
            sev=True,
            sev_es=bool(eax & CPUID_SEV_ES),
            sev_snp=bool(eax & CPUID_SEV_SNP),
            host_phys_reduction=(ebx >> 6) & 0x3F,
        )


def read_cpuid(
    leaf: int, subleaf: int = 0, device: str = CPUID_DEVICE
) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of `leaf` on the CPU of `device` (the `cpuid` driver).

    arch/x86/kernel/cpuid.c: a 16-byte read at file offset `leaf | subleaf << 32`.
    """
    try:
        fd = os.open(device, os.O_RDONLY)
    except FileNotFoundError:
        raise HostError(
            f"{device} does not exist", "load the cpuid module (modprobe cpuid)"
        ) from None
    except PermissionError:
        raise HostError(f"no permission to read {device}", "run as root") from None
    try:
        data = os.pread(fd, 16, leaf | subleaf << 32)
    finally:
        os.close(fd)
    if len(data) != 16:
        raise HostError(f"{device} returned {len(data)} bytes for leaf {leaf:#x}", "")
    eax, ebx, ecx, edx = struct.unpack("<4I", data)
    return eax, ebx, ecx, edx


def cpuid_sev_capabilities(device: str = CPUID_DEVICE) -> SevCapabilities:
    """The host's SEV facts from CPUID 0x8000001F; HostError when the leaf or SEV is absent."""
    max_ext = read_cpuid(EXT_MAX_LEAF, device=device)[0]
    if max_ext < SEV_LEAF:
        raise HostError(
            f"this CPU has no CPUID leaf {SEV_LEAF:#x} (highest extended leaf {max_ext:#x}): "
            "it is not an AMD CPU with memory encryption",
            "run SEV and SEV-SNP guests on an AMD EPYC host",
        )
    eax, ebx, _ecx, _edx = read_cpuid(SEV_LEAF, device=device)
    return SevCapabilities.from_cpuid(eax, ebx, f"CPUID {SEV_LEAF:#x} via {device}")


def _qmp_lines(*commands: Mapping[str, Any]) -> bytes:
    return b"".join(json.dumps(c).encode() + b"\n" for c in commands)


def query_sev_capabilities(
    qemu_command: Sequence[str], timeout: float = QUERY_TIMEOUT_S
) -> SevCapabilities:
    """Ask the target QEMU (`-machine none -accel kvm`) for `query-sev-capabilities`.

    Raises HostError with QEMU's own reason when it refuses (no KVM, SEV not enabled
    in KVM, /dev/sev unusable), QemuError when QEMU does not start or answer.
    The QEMU is started through `spawn` (dies with us) and is gone on return.
    """
    argv = [
        *qemu_command,
        "-machine", "none", "-accel", "kvm", "-nodefaults", "-display", "none",
        "-no-user-config", "-qmp", "stdio",
    ]  # fmt: skip
    commands = _qmp_lines(
        {"execute": "qmp_capabilities"},
        {"execute": "query-sev-capabilities"},
        {"execute": "quit"},
    )
    try:
        proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as error:
        raise QemuError(
            f"cannot run {qemu_command[-1]}: {error}", "check the QEMU binary"
        ) from None
    try:
        out, err = proc.communicate(commands, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise QemuError(
            f"{qemu_command[-1]} did not answer query-sev-capabilities within {timeout:g} s",
            "see whether it starts by hand with -machine none -accel kvm",
        ) from None
    replies = []
    for line in out.decode(errors="replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "return" in message or "error" in message:
            replies.append(message)
    source = f"query-sev-capabilities of {qemu_command[-1]}"
    if len(replies) < 2:
        stderr = err.decode(errors="replace").strip()
        last_line = stderr.splitlines()[-1] if stderr else "no output"
        # QEMU exits at start when it cannot create a KVM VM at all ("Could not access
        # KVM kernel module", "failed to initialize kvm"): that is the host's reason.
        raise HostError(
            f"{qemu_command[-1]} -accel kvm did not answer query-sev-capabilities "
            f"(exit status {proc.returncode}): {last_line}",
            SEV_CAPABILITY_HINT,
            detail=stderr,
        )
    reply = replies[1]
    if "error" in reply:
        raise HostError(
            f"{source}: {reply['error'].get('desc', reply['error'])}", SEV_CAPABILITY_HINT
        )
    return SevCapabilities.from_qmp(reply["return"], source)


def host_sev_capabilities(
    qemu_command: Sequence[str] | None, cpuid_device: str = CPUID_DEVICE
) -> SevCapabilities:
    """QMP `query-sev-capabilities` of the target QEMU, else CPUID; HostError naming both."""
    reasons = []
    if qemu_command:
        try:
            return query_sev_capabilities(qemu_command)
        except (HostError, QemuError) as error:
            reasons.append(str(error.problem))
    try:
        return cpuid_sev_capabilities(cpuid_device)
    except HostError as error:
        reasons.append(str(error.problem))
    raise HostError(
        "cannot read this host's SEV C-bit position: " + "; ".join(reasons), SEV_CAPABILITY_HINT
    )


AmdGuest = SnpGuest | SevGuest


def complete_sev_fields(cgs: AmdGuest, caps: SevCapabilities) -> AmdGuest:
    """`cgs` with cbitpos/reduced_phys_bits filled from the host; SpecError on a wrong cbitpos.

    cbitpos is a host fact: QEMU checks it against CPUID ("cbitpos check failed, host
    '%d' requested '%d'"). reduced-phys-bits is not: `query-sev-capabilities` always
    answers 1 (target/i386/sev.c sev_get_capabilities), QEMU accepts any 1..63 (rules.py
    checks the range), so a value given is kept and only a missing one is filled.
    """
    kind = "SEV-SNP" if isinstance(cgs, SnpGuest) else "SEV"
    if cgs.cbitpos is not None and cgs.cbitpos != caps.cbitpos:
        raise SpecError(
            f"{kind}: cbitpos={cgs.cbitpos} but this host's C-bit is {caps.cbitpos} "
            f"({caps.source})",
            f"drop cbitpos (cvmlab reads it from the host) or give cbitpos={caps.cbitpos}",
        )
    rpb = cgs.reduced_phys_bits if cgs.reduced_phys_bits is not None else caps.reduced_phys_bits
    return dataclasses.replace(cgs, cbitpos=caps.cbitpos, reduced_phys_bits=rpb)


def decide_kernel_hashes(
    cgs: AmdGuest, boot: KernelBoot | DiskBoot, table: FirmwareTable | None, firmware: str
) -> AmdGuest:
    """`cgs` with `kernel_hashes` decided by the firmware's table for a -kernel boot.

    edk2 OvmfPkg/AmdSev (BlobVerifierLibSevHashes/BlobVerifierSevHashes.c VerifyBlob): no
    hashes table -> EFI_ACCESS_DENIED, QemuKernelLoaderFsDxe drops the blobs, the guest
    never reaches its kernel. QEMU target/i386/sev.c sev_add_kernel_loader_hashes: with
    kernel-hashes=on the table area must have base != 0 and size >= 176, else QEMU exits
    ("guest firmware hashes table area is invalid"). Without -kernel nothing is hashed.
    """
    if not isinstance(boot, KernelBoot):
        return cgs
    kind = "SEV-SNP" if isinstance(cgs, SnpGuest) else "SEV"
    if table is None:
        if cgs.kernel_hashes is not None:
            return cgs
        raise SpecError(
            f"{kind} -kernel boot: firmware {firmware} has no readable OVMF table, so whether "
            "it needs kernel-hashes cannot be told",
            "give kernel_hashes=on (AmdSev builds) or kernel_hashes=off (generic OVMF)",
        )
    measured = table.measured_direct_boot
    area = table.hashes_area or (0, 0)
    where = f"base={area[0]:#x} size={area[1]:#x}"
    if cgs.kernel_hashes is None:
        return dataclasses.replace(cgs, kernel_hashes=measured)
    if cgs.kernel_hashes and not measured:
        raise SpecError(
            f"{kind}: kernel_hashes=on but firmware {firmware} reserves no SEV hashes table "
            f"({where}): QEMU exits with 'guest firmware hashes table area is invalid'",
            "drop kernel_hashes (cvmlab decides it from the firmware), or use an AmdSev build "
            "(OVMF.amdsev.fd) for measured direct boot",
        )
    if not cgs.kernel_hashes and measured:
        raise SpecError(
            f"{kind}: kernel_hashes=off but firmware {firmware} is an AmdSev build (SEV hashes "
            f"table at {where}): it refuses an unhashed -kernel (EFI_ACCESS_DENIED) and the "
            "guest never reaches its kernel",
            "drop kernel_hashes (cvmlab turns it on for this firmware), or use a generic OVMF",
        )
    return cgs


# --- firmware -------------------------------------------------------------------------------


def _boot_firmware(spec: MachineSpec) -> Firmware | None:
    return spec.boot.firmware


def _with_firmware(spec: MachineSpec, firmware: Firmware) -> MachineSpec:
    boot = spec.boot
    if isinstance(boot, (KernelBoot, DiskBoot)):
        return dataclasses.replace(spec, boot=dataclasses.replace(boot, firmware=firmware))
    raise TypeError(f"unknown boot {boot!r}")


def _firmware_kind(cgs: Confidential) -> FirmwareKind:
    """The probe's firmware search for this guest: TDVF, or an SEV-capable OVMF."""
    return "tdx" if isinstance(cgs, TdxGuest) else "snp"


def resolve_firmware(
    spec: MachineSpec, probe: HostProbe | None = None, root: Path = Path("/")
) -> MachineSpec:
    """`spec` with the confidential guest's firmware filled in (-bios), or a SpecError.

    A firmware the spec names must exist. Otherwise the one the probe found for the
    tier is used (the probe honours $CVMLAB_*_FIRMWARE), else `find_firmware` searches.
    """
    cgs = spec.confidential
    if cgs is None:
        return spec
    kind = _firmware_kind(cgs)
    what = "TDVF" if kind == "tdx" else "SEV-capable OVMF"
    given = _boot_firmware(spec)
    if given is not None:
        if not (root / given.path.lstrip("/")).is_file():
            raise SpecError(
                f"{what} firmware {given.path} (given with firmware=) does not exist",
                "correct the path, or drop firmware= to use the one `cvmlab probe` finds",
            )
        return spec
    evidence: dict[str, Any] = {}
    path: str | None = None
    if probe is not None and kind in probe.tiers:
        evidence = dict(probe.tiers[kind].evidence.get("firmware_search", {}))
        path = probe.tiers[kind].evidence.get("firmware")
    if path is None:
        env = os.environ.get(FIRMWARE_ENV[kind])
        path, evidence = find_firmware(kind, root, Path(env) if env else None)
    if path is None:
        searched = ", ".join(evidence.get("searched", [])) or "nowhere"
        missing = evidence.get("missing")
        rejected = "; ".join(evidence.get("rejected", []))
        problem = (
            f"{what} {missing} (from {FIRMWARE_ENV[kind]}) does not exist"
            if missing
            else f"no {what} found (looked in: {searched}"
            + (f"; rejected: {rejected}" if rejected else "")
            + ")"
        )
        raise SpecError(
            f"{cgs.kind.upper()} guest without firmware: {problem}",
            f"give firmware=PATH, or set {FIRMWARE_ENV[kind]}=PATH for every run "
            f"(`cvmlab probe --{kind}-firmware PATH` shows what the probe makes of it); "
            "docs/labs.md says where labs get it",
        )
    if evidence.get("mapping_device") == "flash":
        raise SpecError(
            f"{what} {path} is a split pflash image (its QEMU firmware descriptor says "
            "mapping device 'flash'), but confidential guests load firmware with -bios",
            "give firmware=PATH to a single-file build (e.g. OVMF.inteltdx.fd, OVMF.amdsev.fd)",
        )
    return _with_firmware(spec, Firmware(path=path, interface="bios"))


# --- host facts the checks compare against ----------------------------------------------------


@dataclass(frozen=True)
class HostCpu:
    """CPU facts of the host that decide whether a confidential spec can launch."""

    present_cpus: int
    smt_active: bool | None  # None: the kernel does not say
    phys_bits: int | None  # CPUID 0x80000008 EAX[7:0]; None when unreadable

    @classmethod
    def read(cls, root: Path = Path("/"), cpuid_device: str = CPUID_DEVICE) -> HostCpu:
        def text(path: str) -> str | None:
            try:
                return (root / path.lstrip("/")).read_text().strip()
            except OSError:
                return None

        present = parse_cpu_list(text("/sys/devices/system/cpu/present") or "") or (
            os.cpu_count() or 1
        )
        smt = text("/sys/devices/system/cpu/smt/active")
        phys: int | None = None
        try:
            if read_cpuid(EXT_MAX_LEAF, device=cpuid_device)[0] >= PHYS_ADDR_LEAF:
                phys = read_cpuid(PHYS_ADDR_LEAF, device=cpuid_device)[0] & 0xFF
        except HostError:
            phys = None
        return cls(present, None if smt is None else smt == "1", phys)


def parse_cpu_list(text: str) -> int:
    """How many CPUs a kernel CPU list names: "0-63" -> 64, "0,2-3" -> 3, "" -> 0."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def _cpu_option(cpu: str, name: str) -> str | None:
    """The value of `name=` in a -cpu string ("host,phys-bits=46" -> "46")."""
    for item in cpu.split(",")[1:]:
        key, _, value = item.partition("=")
        if key == name:
            return value
    return None


def tdx_problems(
    spec: MachineSpec,
    tdx: TdxGuest,
    host: HostCpu,
    root: Path = Path("/"),
    linux_guest: bool = True,
) -> list[str]:
    """What keeps this TD from starting (or its Linux guest from booting) on `host`."""
    problems = []
    attributes = tdx.attributes
    if linux_guest:
        if tdx.sept_ve_disable is False:
            problems.append(
                "sept_ve_disable=off: a Linux TD panics at boot ('TD misconfiguration: "
                "SEPT_VE_DISABLE attribute must be set')"
            )
        elif (
            tdx.sept_ve_disable is None
            and attributes is not None
            and not (attributes & TDX_ATTR_SEPT_VE_DISABLE)
        ):
            problems.append(
                f"tdx_attributes={attributes:#x} clears bit 28 (SEPT_VE_DISABLE): a Linux TD "
                "panics at boot ('TD misconfiguration: SEPT_VE_DISABLE attribute must be set')"
            )
    if spec.smp > host.present_cpus:
        problems.append(
            f"smp={spec.smp} exceeds the host's {host.present_cpus} present CPUs (KVM caps a "
            "TD's vCPUs at num_present_cpus(), tdx_vm_init)"
        )
    phys = _cpu_option(spec.cpu, "phys-bits")
    if phys is not None and host.phys_bits is not None and int(phys) != host.phys_bits:
        problems.append(
            f"cpu phys-bits={phys} but the host has {host.phys_bits}: a TD always sees the "
            "host's value and QEMU refuses any other"
        )
    return problems


QGS_CONNECT_TIMEOUT_S = 3.0
QGS_FIX = (
    "start the lab's quote generation service (e.g. `systemctl start qgsd`; docs/labs.md, "
    "'Attestation services'), or drop qgs_path / qgs_vsock_port"
)


def quote_service_problem(
    qgs: QuoteGenerationSocket | None,
    root: Path = Path("/"),
    timeout: float = QGS_CONNECT_TIMEOUT_S,
) -> str | None:
    """Why the TD's quote-generation service would not answer, or None.

    QEMU connects to it for every GetQuote (target/i386/kvm/tdx.c); without an answer the
    guest's quote fails and G1's attestation check would FAIL for a host reason. So connect
    now, as QEMU will: a unix socket that refuses (a stale file of a stopped service) or a
    vsock port that refuses is the host's missing capability. A recorded host (root other
    than "/") is judged by the socket file only.
    """
    if qgs is None:
        return None
    address: str | tuple[int, int]
    if qgs.type == "unix" and qgs.path:
        path = root / qgs.path.lstrip("/")
        if not path.exists():
            return f"quote-generation-socket {qgs.path} does not exist"
        if root != Path("/"):
            return None
        family, address, what = int(socket.AF_UNIX), str(path), f"unix socket {qgs.path}"
    elif qgs.type == "vsock" and qgs.port is not None and root == Path("/"):
        family = int(getattr(socket, "AF_VSOCK", -1))
        address, what = (qgs.cid or 2, qgs.port), f"vsock cid {qgs.cid} port {qgs.port}"
    else:
        return None
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, ValueError) as error:
        return (
            f"cannot open a socket for {what} ({error}), and neither could QEMU "
            "(for vsock: modprobe vsock_loopback)"
        )
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as error:
            return f"nothing answers at {what} ({error.strerror or error})"
    return None


def snp_problems(snp: SnpGuest, host: HostCpu) -> list[str]:
    """What the SNP firmware would refuse at SNP_LAUNCH_START on `host`."""
    if host.smt_active and not snp.policy & SNP_POLICY_SMT:
        return [
            f"policy={snp.policy:#x} forbids SMT (bit 16 clear) but this host has SMT active "
            "(/sys/devices/system/cpu/smt/active = 1): the SNP firmware fails "
            "SNP_LAUNCH_START with POLICY_FAILURE"
        ]
    return []


def sev_host_problems(
    sev: SevGuest, probe: HostProbe | None, memory: int, memlock: int | None = None
) -> list[str]:
    """What this host lacks for a legacy SEV/SEV-ES guest (HostError material)."""
    problems = []
    params = probe.host.module_params if probe is not None else {}
    want = "kvm_amd.sev_es" if sev.es else "kvm_amd.sev"
    if params.get(want, "").strip() not in ("Y", "y", "1"):
        problems.append(f"{want} is {params.get(want) or 'absent'}, not Y")
    if sev.legacy_vm_type == "off" and probe is not None and probe.kvm is not None:
        vm_type = KVM_X86_SEV_ES_VM if sev.es else KVM_X86_SEV_VM
        if not probe.kvm.vm_types & (1 << vm_type):
            problems.append(
                f"KVM_CAP_VM_TYPES={probe.kvm.vm_types:#x} lacks "
                f"{'KVM_X86_SEV_ES_VM' if sev.es else 'KVM_X86_SEV_VM'} (bit {vm_type}), "
                "which legacy_vm_type=off needs (Linux >= 6.10)"
            )
    if memlock is None and os.geteuid() != 0:
        memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    if memlock is not None and memlock != resource.RLIM_INFINITY and memlock < memory:
        problems.append(
            f"RLIMIT_MEMLOCK is {format_size(memlock)}, below the guest's "
            f"{format_size(memory)}: SEV pins all guest RAM (KVM_MEMORY_ENCRYPT_REG_REGION; "
            "'SEV: ... locked pages exceed the lock limit')"
        )
    return problems


# --- the hook ---------------------------------------------------------------------------------


def required_tiers(spec: MachineSpec) -> tuple[str, ...]:
    """The probe tiers `spec` needs: its confidential guest's tier first (the CANCEL reason
    then starts with what matters), then its accelerator.

    Legacy SEV has no tier of its own: it needs KVM, and `prepare_confidential`
    checks the SEV host facts (HostError, a CANCEL).
    """
    cgs = spec.confidential
    if cgs is None or isinstance(cgs, SevGuest):
        return (spec.accel,)
    return (cgs.kind, spec.accel)


def prepare_confidential(
    spec: MachineSpec,
    probe: HostProbe | None,
    sev_capabilities: SevCapabilities | None = None,
    *,
    root: Path = Path("/"),
    host: HostCpu | None = None,
    linux_guest: bool = True,
) -> MachineSpec:
    """The completed spec for a confidential guest (a plain spec comes back unchanged).

    Fills firmware (-bios) and, for SEV-SNP/SEV, cbitpos and reduced_phys_bits
    (`sev_capabilities`, else read from `probe.qemu`'s QMP or CPUID), then checks what
    only this host can decide. Raises SpecError for a spec this host cannot run and
    HostError for a capability the host lacks (see the module docstring). Run it after
    the tier check and before `rules.validate`.
    """
    cgs = spec.confidential
    if cgs is None:
        return spec
    spec = resolve_firmware(spec, probe, root)
    problems: list[str] = []
    if isinstance(cgs, SevGuest):
        host_problems = sev_host_problems(cgs, probe, spec.memory)
        if host_problems:
            raise HostError(
                f"this host cannot run {'an SEV-ES' if cgs.es else 'an SEV'} guest: "
                + "; ".join(host_problems),
                "boot with kvm_amd.sev=1 (sev_es=1), or use legacy_vm_type=on on older kernels",
            )
    if isinstance(cgs, (SnpGuest, SevGuest)):
        if sev_capabilities is None:
            command = probe.qemu.command if probe is not None and probe.qemu is not None else None
            try:
                sev_capabilities = host_sev_capabilities(command)
            except HostError:
                if cgs.cbitpos is None or cgs.reduced_phys_bits is None:
                    raise
                # Both given and nothing to check them against: QEMU will judge cbitpos.
        if sev_capabilities is not None:
            if isinstance(cgs, SnpGuest) and sev_capabilities.sev_snp is False:
                raise HostError(
                    f"this CPU has no SEV-SNP ({sev_capabilities.source}: EAX bit 4 clear)",
                    "run SEV-SNP guests on AMD EPYC 7003 (Milan) or newer with SNP enabled",
                )
            cgs = complete_sev_fields(cgs, sev_capabilities)
            spec = dataclasses.replace(spec, confidential=cgs)
    if isinstance(cgs, (SnpGuest, SevGuest)):
        firmware = _boot_firmware(spec)
        assert firmware is not None  # resolve_firmware filled it
        table = read_firmware(root / firmware.path.lstrip("/"))
        cgs = decide_kernel_hashes(cgs, spec.boot, table, firmware.path)
        spec = dataclasses.replace(spec, confidential=cgs)
    host = host or HostCpu.read(root)
    if isinstance(cgs, TdxGuest):
        qgs_problem = quote_service_problem(cgs.quote_generation_socket, root)
        if qgs_problem:
            raise HostError(f"this TD's quote generation cannot work: {qgs_problem}", QGS_FIX)
        problems += tdx_problems(spec, cgs, host, root, linux_guest)
    elif isinstance(cgs, SnpGuest):
        problems += snp_problems(cgs, host)
    if problems:
        raise SpecError(
            f"this {cgs.kind.upper()} spec cannot run on this host: " + "; ".join(problems),
            "change the machine parameters named above",
        )
    return spec


__all__ = [
    "HostCpu",
    "SevCapabilities",
    "complete_sev_fields",
    "cpuid_sev_capabilities",
    "decide_kernel_hashes",
    "host_sev_capabilities",
    "parse_cpu_list",
    "prepare_confidential",
    "query_sev_capabilities",
    "quote_service_problem",
    "read_cpuid",
    "required_tiers",
    "resolve_firmware",
    "sev_host_problems",
    "snp_problems",
    "tdx_problems",
]
