"""What a machine is: the typed spec that every launch starts from.

A `MachineSpec` says what the guest should be (accelerator, CPU, memory and
its backend, boot method, devices, confidential object) and nothing about
where its sockets live: run-time plumbing is passed separately to the argv
builder, so the same spec yields the test's command line and the
reproducer's `run.sh`.

`spec_from_params` turns flat key/value parameters (avocado params, variant
YAML, JSON from a reproducer bundle) into a spec, refusing unknown keys and
values with one clear error each. QEMU's rules on combinations live in
`orchestrator.qemu.rules`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.errors import SpecError
from orchestrator.qemu.keys import BACKEND_KEYS, MACHINE_KEYS, SCENARIO_KEYS
from orchestrator.units import parse_size

Accel = Literal["tcg", "kvm"]
ACCELS: tuple[Accel, ...] = ("tcg", "kvm")


# --- memory backends (QAPI MemoryBackendProperties and subtypes) -----------


@dataclass(frozen=True)
class AnonBackend:
    """`memory-backend-ram`: anonymous memory; `share=on` makes it shmem."""

    share: bool = False
    kind: Literal["anon"] = "anon"


@dataclass(frozen=True)
class MemfdBackend:
    """`memory-backend-memfd`. QEMU's own default is share=on, seal=on."""

    share: bool = True
    hugetlb: bool = False
    hugetlbsize: int | None = None  # bytes; only with hugetlb
    seal: bool = True
    kind: Literal["memfd"] = "memfd"


@dataclass(frozen=True)
class FileBackend:
    """`memory-backend-file` on `mem_path` (a file, or a directory QEMU makes a file in)."""

    mem_path: str
    share: bool = True
    discard_data: bool = False
    kind: Literal["file"] = "file"


Backend = AnonBackend | MemfdBackend | FileBackend
BACKEND_KINDS = ("anon", "memfd", "file")


# --- boot --------------------------------------------------------------------


@dataclass(frozen=True)
class Firmware:
    """Firmware image. TDX and SNP need `bios` (no read-only memslots for pflash)."""

    path: str
    interface: Literal["bios", "pflash"] = "bios"
    vars_path: str | None = None  # pflash only: a writable copy of the variable store


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot: `-kernel`, `-initrd`, `-append`."""

    kernel: str
    initrd: str | None = None
    cmdline: str = ""
    firmware: Firmware | None = None


@dataclass(frozen=True)
class DiskBoot:
    """Boot from a disk image through firmware (lab cloud images)."""

    disk: str
    disk_format: Literal["qcow2", "raw"] = "qcow2"
    firmware: Firmware | None = None
    snapshot: bool = True  # never write to the lab's image


Boot = KernelBoot | DiskBoot


# --- devices -----------------------------------------------------------------


@dataclass(frozen=True)
class Balloon:
    """virtio-balloon-pci. Free page reporting discards freed guest pages on the host."""

    free_page_reporting: bool = False
    deflate_on_oom: bool = False


@dataclass(frozen=True)
class VirtioMem:
    """virtio-mem-pci with its own memory backend (`memdev`) of `size` bytes."""

    size: int
    requested_size: int = 0
    block_size: int | None = None  # bytes; QEMU picks (>= THP size) when None
    backend: Backend = field(default_factory=AnonBackend)


# --- confidential guests -------------------------------------------------------


@dataclass(frozen=True)
class SnpGuest:
    """`sev-snp-guest` (QEMU >= 9.1). Property names as QEMU spells them.

    `cbitpos` must equal the host's CPUID 0x8000001F EBX[5:0] and
    `reduced_phys_bits` is mandatory; both come from `query-sev-capabilities`
    on the lab host. Base64 fields are passed through verbatim.
    """

    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    policy: int = 0x30000
    # None: decided from the firmware's table at launch (confidential.decide_kernel_hashes).
    kernel_hashes: bool | None = None
    author_key_enabled: bool | None = None
    vcek_disabled: bool | None = None
    guest_visible_workarounds: str | None = None  # base64, 16 bytes
    id_block: str | None = None  # base64, 96 bytes
    id_auth: str | None = None  # base64, 4096 bytes
    host_data: str | None = None  # base64, 32 bytes
    kind: Literal["snp"] = "snp"


@dataclass(frozen=True)
class QuoteGenerationSocket:
    """Where a TD's GetQuote requests go: a vsock (cid, port) or a unix path."""

    type: Literal["vsock", "unix"]
    cid: int | None = None
    port: int | None = None
    path: str | None = None


@dataclass(frozen=True)
class TdxGuest:
    """`tdx-guest` (QEMU >= 10.1). mr* fields are base64 of 48 bytes (SHA-384)."""

    attributes: int | None = None
    sept_ve_disable: bool | None = None
    mrconfigid: str | None = None
    mrowner: str | None = None
    mrownerconfig: str | None = None
    quote_generation_socket: QuoteGenerationSocket | None = None
    kind: Literal["tdx"] = "tdx"


@dataclass(frozen=True)
class SevGuest:
    """`sev-guest`: legacy SEV, or SEV-ES when policy bit 2 (0x4) is set.

    `legacy_vm_type` is QEMU's OnOffAuto property (9.1+). cvmlab defaults to "off":
    with "auto" QEMU still creates a default-type VM with KVM_SEV_INIT/KVM_SEV_ES_INIT,
    so only "off" exercises KVM_X86_SEV_VM / KVM_X86_SEV_ES_VM + KVM_SEV_INIT2
    (research/interfaces.md section 2 and pitfall 8.4). SEV and SEV-ES do not use
    guest_memfd: QEMU pins guest RAM and disables discards.
    """

    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    policy: int = 0x1
    legacy_vm_type: Literal["on", "off", "auto"] = "off"
    kernel_hashes: bool | None = None  # None: decided from the firmware's table
    kind: Literal["sev"] = "sev"

    @property
    def es(self) -> bool:
        """SEV-ES: policy bit 2 (SEV_POLICY_ES) encrypts the register state too."""
        return bool(self.policy & 0x4)


Confidential = SnpGuest | TdxGuest | SevGuest


# --- the machine ----------------------------------------------------------------


@dataclass(frozen=True)
class MachineSpec:
    """Everything that decides the guest's QEMU command line, and nothing else."""

    boot: Boot
    memory: int = 512 * 1024 * 1024
    accel: Accel = "tcg"
    cpu: str = "max"
    smp: int = 1
    machine: str = "q35"
    backend: Backend = field(default_factory=AnonBackend)
    ssh_forward: bool = True  # user-net, host 127.0.0.1:0 -> guest :22
    balloon: Balloon | None = None
    virtio_mem: VirtioMem | None = None
    pvpanic: bool = True
    confidential: Confidential | None = None
    tsc_frequency: int | None = None  # Hz; TDX needs a multiple of 25 MHz
    trace_events: tuple[str, ...] = ()
    name: str = "cvmlab-guest"


# --- flat parameters -> spec -------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SpecError(f"parameter {key}={value!r} is not a boolean", "use on/off, true/false or 1/0")


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise SpecError(f"parameter {key}={value!r} is not a number", "give an integer")
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        raise SpecError(
            f"parameter {key}={value!r} is not a number", "give an integer (0x.. for hex)"
        ) from None


class _Params:
    """Reads parameters once each, so leftovers can be reported as unknown."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._params = {k: v for k, v in params.items() if v is not None}
        self._used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self._params

    def raw(self, key: str, default: Any = None) -> Any:
        self._used.add(key)
        return self._params.get(key, default)

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.raw(key)
        return default if value is None else str(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        return default if value is None else _as_bool(value, key)

    def opt_flag(self, key: str) -> bool | None:
        value = self.raw(key)
        return None if value is None else _as_bool(value, key)

    def integer(self, key: str, default: int | None = None) -> int | None:
        value = self.raw(key)
        return default if value is None else _as_int(value, key)

    def size(self, key: str, default: int | None = None) -> int | None:
        value = self.raw(key)
        return default if value is None else parse_size(value, key)

    def unused(self) -> list[str]:
        return sorted(set(self._params) - self._used)


def _backend(p: _Params, prefix: str) -> Backend:
    kind = p.text(f"{prefix}backend", "anon")
    if kind == "anon":
        return AnonBackend(share=p.flag(f"{prefix}share", False))
    if kind == "memfd":
        hugetlbsize = p.size(f"{prefix}hugetlbsize")
        return MemfdBackend(
            share=p.flag(f"{prefix}share", True),
            hugetlb=p.flag(f"{prefix}hugetlb", hugetlbsize is not None),
            hugetlbsize=hugetlbsize,
            seal=p.flag(f"{prefix}seal", True),
        )
    if kind == "file":
        mem_path = p.text(f"{prefix}mem_path")
        if not mem_path:
            raise SpecError(
                f"{prefix}backend=file needs {prefix}mem_path",
                "give a file or directory for the guest's memory (e.g. /dev/shm)",
            )
        return FileBackend(
            mem_path=mem_path,
            share=p.flag(f"{prefix}share", True),
            discard_data=p.flag(f"{prefix}discard_data", False),
        )
    raise SpecError(f"unknown memory backend {kind!r}", f"use one of: {', '.join(BACKEND_KINDS)}")


def _firmware(p: _Params) -> Firmware | None:
    path = p.text("firmware")
    if path is None:
        return None
    interface = p.text("firmware_interface", "bios")
    if interface not in ("bios", "pflash"):
        raise SpecError(f"firmware_interface={interface!r} is unknown", "use bios or pflash")
    return Firmware(path=path, interface=interface, vars_path=p.text("firmware_vars"))  # type: ignore[arg-type]


def _confidential(p: _Params) -> Confidential | None:
    kind = p.text("confidential", "none")
    if kind in ("none", ""):
        return None
    if kind == "snp":
        return SnpGuest(
            cbitpos=p.integer("cbitpos"),
            reduced_phys_bits=p.integer("reduced_phys_bits"),
            policy=p.integer("snp_policy", 0x30000) or 0,
            kernel_hashes=p.opt_flag("kernel_hashes"),
            author_key_enabled=p.opt_flag("author_key_enabled"),
            vcek_disabled=p.opt_flag("vcek_disabled"),
            guest_visible_workarounds=p.text("guest_visible_workarounds"),
            id_block=p.text("id_block"),
            id_auth=p.text("id_auth"),
            host_data=p.text("host_data"),
        )
    if kind == "tdx":
        qgs: QuoteGenerationSocket | None = None
        if p.has("qgs_path"):
            qgs = QuoteGenerationSocket(type="unix", path=p.text("qgs_path"))
        elif p.has("qgs_vsock_port"):
            qgs = QuoteGenerationSocket(
                type="vsock", cid=p.integer("qgs_vsock_cid", 2), port=p.integer("qgs_vsock_port")
            )
        return TdxGuest(
            attributes=p.integer("tdx_attributes"),
            sept_ve_disable=p.opt_flag("sept_ve_disable"),
            mrconfigid=p.text("mrconfigid"),
            mrowner=p.text("mrowner"),
            mrownerconfig=p.text("mrownerconfig"),
            quote_generation_socket=qgs,
        )
    if kind == "sev":
        legacy = p.text("legacy_vm_type", "off")
        if legacy not in ("on", "off", "auto"):
            raise SpecError(f"legacy_vm_type={legacy!r} is unknown", "use on, off or auto")
        return SevGuest(
            cbitpos=p.integer("cbitpos"),
            reduced_phys_bits=p.integer("reduced_phys_bits"),
            policy=p.integer("sev_policy", 0x1) or 0,
            legacy_vm_type=legacy,  # type: ignore[arg-type]
            kernel_hashes=p.opt_flag("kernel_hashes"),
        )
    raise SpecError(f"unknown confidential guest type {kind!r}", "use none, snp, tdx or sev")


_SNP_KEYS = {
    "cbitpos", "reduced_phys_bits", "snp_policy", "kernel_hashes", "author_key_enabled",
    "vcek_disabled", "guest_visible_workarounds", "id_block", "id_auth", "host_data",
}  # fmt: skip
_SEV_KEYS = {"sev_policy", "legacy_vm_type"}
# Keys both SEV-SNP and legacy SEV read.
_SEV_COMMON_KEYS = {"cbitpos", "reduced_phys_bits", "kernel_hashes"}
_TDX_KEYS = {
    "tdx_attributes", "sept_ve_disable", "mrconfigid", "mrowner", "mrownerconfig", "qgs_path",
    "qgs_vsock_cid", "qgs_vsock_port",
}  # fmt: skip


def _needs(key: str) -> str:
    """What makes a known-but-unread parameter take effect."""
    if key.startswith("virtio_mem_"):
        return "virtio_mem_size (and, for backend keys, a matching virtio_mem_backend)"
    if key in ("free_page_reporting", "deflate_on_oom"):
        return "balloon=on"
    if key in _SEV_COMMON_KEYS:
        return "confidential=snp or confidential=sev"
    if key in _SNP_KEYS:
        return "confidential=snp"
    if key in _SEV_KEYS:
        return "confidential=sev"
    if key in _TDX_KEYS:
        return "confidential=tdx"
    if key in ("firmware_interface", "firmware_vars"):
        return "firmware=PATH"
    if key in ("initrd",):
        return "kernel=PATH"
    if key == "disk_format":
        return "disk=PATH"
    if key in ("hugetlb", "hugetlbsize", "seal"):
        return "backend=memfd"
    if key in ("mem_path", "discard_data"):
        return "backend=file"
    return "another parameter"


def virtio_mem_follows_ram(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with the RAM's backend keys copied to the virtio-mem device's, unless
    the device names a backend of its own (`virtio_mem_backend`)."""
    result = dict(params)
    if "virtio_mem_backend" not in result:
        for key in BACKEND_KEYS:
            if key in result:
                result[f"virtio_mem_{key}"] = result[key]
    return result


def spec_from_params(params: Mapping[str, Any], boot: Boot | None = None) -> MachineSpec:
    """Build a spec from flat parameters; unknown keys are an error, not ignored.

    `boot` supplies the kernel/initrd of an image when the parameters name none.
    Keys: accel, cpu, smp, memory, machine, backend, share, hugetlb,
    hugetlbsize, seal, mem_path, discard_data, kernel, initrd, cmdline, disk,
    disk_format, firmware, firmware_interface, firmware_vars, ssh_forward,
    balloon, free_page_reporting, deflate_on_oom, virtio_mem_size,
    virtio_mem_requested, virtio_mem_block_size, virtio_mem_backend (and the
    backend keys prefixed virtio_mem_), pvpanic, confidential, cbitpos,
    reduced_phys_bits, snp_policy, kernel_hashes, author_key_enabled,
    vcek_disabled, guest_visible_workarounds, id_block, id_auth, host_data,
    tdx_attributes, sept_ve_disable, mrconfigid, mrowner, mrownerconfig,
    qgs_path, qgs_vsock_cid, qgs_vsock_port, sev_policy, legacy_vm_type,
    tsc_frequency, trace_events, name.
    """
    p = _Params(params)
    for key in SCENARIO_KEYS:
        p.raw(key)

    accel = p.text("accel", "tcg")
    if accel not in ACCELS:
        raise SpecError(f"unknown accelerator {accel!r}", "use tcg or kvm")

    firmware = _firmware(p)
    kernel = p.text("kernel")
    disk = p.text("disk")
    chosen_boot: Boot
    if kernel and disk:
        raise SpecError("both kernel and disk are given", "boot from one: kernel= or disk=")
    if kernel:
        chosen_boot = KernelBoot(
            kernel=kernel,
            initrd=p.text("initrd"),
            cmdline=p.text("cmdline", "") or "",
            firmware=firmware,
        )
    elif disk:
        fmt = p.text("disk_format", "qcow2")
        if fmt not in ("qcow2", "raw"):
            raise SpecError(f"disk_format={fmt!r} is unknown", "use qcow2 or raw")
        chosen_boot = DiskBoot(disk=disk, disk_format=fmt, firmware=firmware)  # type: ignore[arg-type]
    elif boot is not None:
        chosen_boot = boot
        if isinstance(boot, KernelBoot):
            extra = p.text("cmdline")
            if extra or firmware:
                chosen_boot = KernelBoot(
                    kernel=boot.kernel,
                    initrd=boot.initrd,
                    cmdline=" ".join(x for x in (boot.cmdline, extra) if x),
                    firmware=firmware or boot.firmware,
                )
    else:
        raise SpecError("no boot source", "give kernel= (and initrd=) or disk=, or an image")

    balloon = None
    if p.flag("balloon", False):
        balloon = Balloon(
            free_page_reporting=p.flag("free_page_reporting", False),
            deflate_on_oom=p.flag("deflate_on_oom", False),
        )

    virtio_mem = None
    vmem_size = p.size("virtio_mem_size")
    if vmem_size:
        virtio_mem = VirtioMem(
            size=vmem_size,
            requested_size=p.size("virtio_mem_requested", 0) or 0,
            block_size=p.size("virtio_mem_block_size"),
            backend=_backend(p, "virtio_mem_"),
        )

    trace = p.raw("trace_events", ())
    if isinstance(trace, str):
        trace = tuple(t for t in trace.replace(",", " ").split() if t)

    spec = MachineSpec(
        boot=chosen_boot,
        memory=p.size("memory", 512 * 1024 * 1024) or 0,
        accel=accel,
        cpu=p.text("cpu", "max") or "max",
        smp=p.integer("smp", 1) or 0,
        machine=p.text("machine", "q35") or "q35",
        backend=_backend(p, ""),
        ssh_forward=p.flag("ssh_forward", True),
        balloon=balloon,
        virtio_mem=virtio_mem,
        pvpanic=p.flag("pvpanic", True),
        confidential=_confidential(p),
        tsc_frequency=p.integer("tsc_frequency"),
        trace_events=tuple(str(t) for t in trace),
        name=p.text("name", "cvmlab-guest") or "cvmlab-guest",
    )
    leftovers = p.unused()
    idle = [key for key in leftovers if key in MACHINE_KEYS]
    if idle:
        raise SpecError(
            f"parameter(s) {', '.join(idle)} have no effect here",
            "; ".join(f"{key} needs {_needs(key)}" for key in idle),
        )
    unknown = leftovers
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, MACHINE_KEYS, n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise SpecError(
            f"unknown machine parameter(s): {', '.join(hints)}",
            f"known keys: {', '.join(sorted(MACHINE_KEYS))}",
        )
    return spec


# --- JSON round trip (argv.json's companion, repro bundles) --------------------------


def spec_to_json(spec: MachineSpec) -> dict[str, Any]:
    """A JSON-ready dict of `spec`; `spec_from_json` reads it back to an equal spec."""
    data = dataclasses.asdict(spec)
    data["boot"]["type"] = "kernel" if isinstance(spec.boot, KernelBoot) else "disk"
    data["trace_events"] = list(spec.trace_events)
    return data


def _backend_from_json(data: Mapping[str, Any]) -> Backend:
    fields = {k: v for k, v in data.items() if k != "kind"}
    kind = data.get("kind")
    if kind == "anon":
        return AnonBackend(**fields)
    if kind == "memfd":
        return MemfdBackend(**fields)
    if kind == "file":
        return FileBackend(**fields)
    raise SpecError(f"backend kind {kind!r} in a saved spec is unknown", "re-run the test")


def _optional(data: Mapping[str, Any] | None, make: Any) -> Any:
    return None if data is None else make(data)


def spec_from_json(data: Mapping[str, Any]) -> MachineSpec:
    """Rebuild a spec saved by `spec_to_json`; a malformed record is a SpecError."""
    try:
        boot_data = dict(data["boot"])
        boot_type = boot_data.pop("type")
        firmware = _optional(boot_data.pop("firmware", None), lambda d: Firmware(**d))
        boot: Boot = (
            KernelBoot(firmware=firmware, **boot_data)
            if boot_type == "kernel"
            else DiskBoot(firmware=firmware, **boot_data)
        )

        def virtio_mem(d: Mapping[str, Any]) -> VirtioMem:
            rest = {k: v for k, v in d.items() if k != "backend"}
            return VirtioMem(backend=_backend_from_json(d["backend"]), **rest)

        def confidential(d: Mapping[str, Any]) -> Confidential:
            rest = {k: v for k, v in d.items() if k != "kind"}
            if d["kind"] == "snp":
                return SnpGuest(**rest)
            if d["kind"] == "sev":
                return SevGuest(**rest)
            qgs = _optional(
                rest.pop("quote_generation_socket", None), lambda q: QuoteGenerationSocket(**q)
            )
            return TdxGuest(quote_generation_socket=qgs, **rest)

        plain = {
            k: v
            for k, v in data.items()
            if k not in ("boot", "backend", "balloon", "virtio_mem", "confidential", "trace_events")
        }
        return MachineSpec(
            boot=boot,
            backend=_backend_from_json(data["backend"]),
            balloon=_optional(data.get("balloon"), lambda d: Balloon(**d)),
            virtio_mem=_optional(data.get("virtio_mem"), virtio_mem),
            confidential=_optional(data.get("confidential"), confidential),
            trace_events=tuple(data.get("trace_events", ())),
            **plain,
        )
    except (KeyError, TypeError) as exc:
        raise SpecError(f"a saved machine spec is malformed ({exc})", "re-run the test") from None
