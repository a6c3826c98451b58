"""What `/dev/kvm` on this host can do for guest_memfd, measured in milliseconds.

`kvm_facts()` never raises for a missing or unusable device: it records why in
`reason`. The probe (`orchestrator/host/probe.py`) turns the facts into the
`gmem` and `sw-protected` tiers with `gmem_tier()` and `sw_protected_tier()`.

Rules (Documentation/virt/kvm/api.rst; research/interfaces.md sections 5, 7):
- guest_memfd needs `KVM_CAP_GUEST_MEMFD` (6.8) and `KVM_CAP_USER_MEMORY2`.
- `KVM_CAP_GUEST_MEMFD_FLAGS` (6.18) depends on the VM type, so it is asked
  of a default VM fd: 0x3 (MMAP | INIT_SHARED) for a default VM; CoCo VMs
  cannot use INIT_SHARED.
- Private memory and conversions need a VM type whose VM fd reports
  `KVM_MEMORY_ATTRIBUTE_PRIVATE` in `KVM_CAP_MEMORY_ATTRIBUTES`;
  `KVM_X86_SW_PROTECTED_VM` gives that without hardware.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.kvm import uapi
from orchestrator.kvm.device import Kvm, KvmFd, KvmIoctlError


@dataclass(frozen=True)
class KvmFacts:
    """Capabilities of one KVM device, as the kernel reported them."""

    device: str  # "/dev/kvm"
    usable: bool  # opened and KVM_GET_API_VERSION == 12
    reason: str  # why not usable ("" when usable)
    api_version: int | None
    caps: dict[str, int]  # name -> KVM_CHECK_EXTENSION on /dev/kvm
    vm_types: int  # KVM_CAP_VM_TYPES bitmask (1 << type)
    gmem_flags: int  # KVM_CAP_GUEST_MEMFD_FLAGS on a default VM fd
    memory_attributes: dict[int, int]  # VM type -> KVM_CAP_MEMORY_ATTRIBUTES on a VM of that type
    # Why a VM type in `vm_types` could not be created ({type: "EINVAL"}); optional detail.
    vm_errors: dict[int, str] = field(default_factory=dict)

    def has_vm_type(self, vm_type: int) -> bool:
        """`vm_type`'s bit is set in KVM_CAP_VM_TYPES (KVM_X86_SNP_VM = 4, KVM_X86_TDX_VM = 5:
        the upstream SNP and TDX interfaces that QEMU's sev-snp-guest / tdx-guest use)."""
        return self.usable and bool(self.vm_types & (1 << vm_type))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KvmFacts:
        """Facts recorded on another host (`cvmlab probe --lab-report`), for a replay."""
        return cls(
            device=str(data["device"]),
            usable=bool(data["usable"]),
            reason=str(data.get("reason", "")),
            api_version=data.get("api_version"),
            caps={str(k): int(v) for k, v in data.get("caps", {}).items()},
            vm_types=int(data["vm_types"]),
            gmem_flags=int(data.get("gmem_flags", 0)),
            memory_attributes={
                int(k): int(v) for k, v in data.get("memory_attributes", {}).items()
            },
            vm_errors={int(k): str(v) for k, v in data.get("vm_errors", {}).items()},
        )


def _unusable(device: str, reason: str, api_version: int | None = None) -> KvmFacts:
    return KvmFacts(device, False, reason, api_version, {}, 0, 0, {})


def kvm_facts(device: str = "/dev/kvm") -> KvmFacts:
    """Open `device`, read its capabilities, and create one VM per advertised type."""
    try:
        kvm = Kvm(device)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if exc.errno == errno.ENOENT:
            return _unusable(device, f"{device} does not exist (no KVM module loaded)")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return _unusable(device, f"no permission to open {device} ({name}): join group kvm")
        return _unusable(device, f"cannot open {device}: {name} ({os.strerror(exc.errno or 0)})")
    with kvm:
        try:
            api_version = kvm.api_version()
        except OSError as exc:
            return _unusable(device, f"KVM_GET_API_VERSION on {device} failed: {exc}")
        if api_version != uapi.KVM_API_VERSION:
            return _unusable(
                device,
                f"KVM_GET_API_VERSION is {api_version}, expected {uapi.KVM_API_VERSION}",
                api_version,
            )
        caps = {name: _check(kvm, number) for name, number in uapi.CAPS.items()}
        vm_types = caps["KVM_CAP_VM_TYPES"]
        gmem_flags = 0
        attributes: dict[int, int] = {}
        vm_errors: dict[int, str] = {}
        # Type 0 always exists; kernels before 6.8 have no KVM_CAP_VM_TYPES at all.
        for vm_type in sorted({uapi.KVM_X86_DEFAULT_VM, *uapi.vm_types_in(vm_types)}):
            try:
                with kvm.create_vm(vm_type) as vm:
                    attributes[vm_type] = _check(vm, uapi.KVM_CAP_MEMORY_ATTRIBUTES)
                    if vm_type == uapi.KVM_X86_DEFAULT_VM:
                        gmem_flags = _check(vm, uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
            except KvmIoctlError as exc:
                vm_errors[vm_type] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return KvmFacts(
            device, True, "", api_version, caps, vm_types, gmem_flags, attributes, vm_errors
        )


def _check(owner: KvmFd, cap: int) -> int:
    """KVM_CHECK_EXTENSION, with 0 for a cap the kernel refuses to answer."""
    try:
        return owner.check_extension(cap)
    except OSError:
        return 0


def _gmem_flag_text(flags: int) -> str:
    return f"{flags:#x} ({uapi.flag_names(flags, uapi.GMEM_FLAG_NAMES)})"


def gmem_tier(facts: KvmFacts) -> tuple[bool, str]:
    """(available, evidence or reason) for the `gmem` tier: guest_memfd on a default VM."""
    if not facts.usable:
        return False, facts.reason
    gmem = facts.caps.get("KVM_CAP_GUEST_MEMFD", 0)
    memory2 = facts.caps.get("KVM_CAP_USER_MEMORY2", 0)
    if not gmem:
        return False, "KVM_CAP_GUEST_MEMFD is 0: the kernel has no guest_memfd (needs Linux >= 6.8)"
    if not memory2:
        return False, "KVM_CAP_USER_MEMORY2 is 0: no KVM_SET_USER_MEMORY_REGION2 (Linux >= 6.8)"
    if uapi.KVM_X86_DEFAULT_VM not in facts.memory_attributes:
        error = facts.vm_errors.get(uapi.KVM_X86_DEFAULT_VM, "unknown error")
        return False, f"KVM_CREATE_VM(KVM_X86_DEFAULT_VM) failed with {error}"
    return True, (
        f"KVM_CAP_GUEST_MEMFD={gmem}, KVM_CAP_USER_MEMORY2={memory2}, "
        f"KVM_CAP_GUEST_MEMFD_FLAGS on a default VM={_gmem_flag_text(facts.gmem_flags)}, "
        f"KVM_CAP_VM_TYPES={facts.vm_types:#x}"
    )


def private_memory_types(facts: KvmFacts) -> list[int]:
    """VM types whose VM fd supports `KVM_MEMORY_ATTRIBUTE_PRIVATE`, sw-protected first."""
    capable = [
        vm_type
        for vm_type, attrs in facts.memory_attributes.items()
        if attrs & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
    ]
    return sorted(capable, key=lambda vm_type: (vm_type != uapi.KVM_X86_SW_PROTECTED_VM, vm_type))


def sw_protected_tier(facts: KvmFacts) -> tuple[bool, str]:
    """(available, evidence or reason) for `sw-protected`: private memory without hardware."""
    if not facts.usable:
        return False, facts.reason
    bit = 1 << uapi.KVM_X86_SW_PROTECTED_VM
    if not facts.vm_types & bit:
        return False, (
            f"KVM_CAP_VM_TYPES={facts.vm_types:#x} lacks KVM_X86_SW_PROTECTED_VM (bit 1): "
            "the kernel was built without CONFIG_KVM_SW_PROTECTED_VM"
        )
    if uapi.KVM_X86_SW_PROTECTED_VM not in facts.memory_attributes:
        error = facts.vm_errors.get(uapi.KVM_X86_SW_PROTECTED_VM, "unknown error")
        return False, f"KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM) failed with {error}"
    attrs = facts.memory_attributes[uapi.KVM_X86_SW_PROTECTED_VM]
    if not attrs & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
        return False, (
            f"KVM_CAP_MEMORY_ATTRIBUTES={attrs:#x} on a KVM_X86_SW_PROTECTED_VM lacks "
            "KVM_MEMORY_ATTRIBUTE_PRIVATE (0x8)"
        )
    return True, (
        f"KVM_CAP_VM_TYPES={facts.vm_types:#x} includes KVM_X86_SW_PROTECTED_VM; "
        f"KVM_CAP_MEMORY_ATTRIBUTES={attrs:#x} on it"
    )
