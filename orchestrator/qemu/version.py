"""QEMU versions, and the QEMU version each feature cvmlab uses first appeared in.

The table is what `rules.validate` quotes when a QEMU lacks an object or a
property ("tdx-guest needs QEMU >= 10.1; this is 10.0.2"), and what the host
probe checks before it offers the `snp` or `tdx` tier. Each entry names its
source; `confirmed=False` marks a version seen only in a patch series, so
the real answer is always the target QEMU's own `qom-list-properties`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.errors import QemuError

_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True, order=True)
class QemuVersion:
    """A QEMU release as major.minor.micro; compares numerically (10.0.2 < 10.1)."""

    major: int
    minor: int
    micro: int = 0

    @classmethod
    def parse(cls, text: str) -> QemuVersion:
        """Read "10.0.2", "10.1", "v9.1.0" or `qemu-system-x86_64 --version`'s first line."""
        match = _VERSION_RE.search(text)
        if match is None:
            raise QemuError(
                f"{text!r} is not a QEMU version", "write it as MAJOR.MINOR[.MICRO], e.g. 10.1"
            )
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))

    @classmethod
    def from_qmp(cls, version: dict[str, int]) -> QemuVersion:
        """From the greeting's or `query-version`'s {"major", "minor", "micro"}."""
        return cls(int(version["major"]), int(version["minor"]), int(version.get("micro", 0)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"

    def short(self) -> str:
        """How release notes name versions: "10.1" for 10.1.0, "10.0.2" otherwise."""
        return f"{self.major}.{self.minor}" if self.micro == 0 else str(self)


@dataclass(frozen=True)
class Feature:
    """Something cvmlab relies on, and the first QEMU release that has it."""

    name: str
    since: QemuVersion
    what: str
    source: str
    # False: the version comes from a patch series or a QAPI "Since:" not yet
    # seen in a release; trust `qom-list-properties` over this table.
    confirmed: bool = True


def _v(text: str) -> QemuVersion:
    return QemuVersion.parse(text)


_FEATURE_LIST = (
    Feature(
        "guest-memfd",
        _v("9.1"),
        "QEMU creates guest_memfd for RAM of confidential guests (RAM_GUEST_MEMFD, "
        "KVM_EXIT_MEMORY_FAULT -> kvm_convert_memory)",
        "interfaces.md section 0; QEMU commits of 2024-04-23, first released in 9.1",
    ),
    Feature(
        "sev-snp-guest",
        _v("9.1"),
        "the sev-snp-guest object (SEV-SNP guests)",
        "interfaces.md section 0/2; docs/system/i386/amd-memory-encryption.rst "
        "'Launching (SEV-SNP)' added in 9.1",
    ),
    Feature(
        "sev-legacy-vm-type",
        _v("9.1"),
        "sev-guest's legacy-vm-type property",
        "interfaces.md section 0",
    ),
    Feature(
        "sev-snp-vcek-disabled",
        _v("9.1"),
        "sev-snp-guest's vcek-disabled property",
        "interfaces.md section 2",
    ),
    Feature(
        "memory-backend-shm",
        _v("9.1"),
        "the memory-backend-shm object",
        "interfaces.md section 3 (QAPI MemoryBackendShmProperties, since 9.1)",
    ),
    Feature(
        "memory-attributes-per-vm",
        _v("9.2"),
        "memory attributes checked per VM fd (commit 586d708c1e)",
        "interfaces.md section 0",
    ),
    Feature(
        "tdx-guest",
        _v("10.1"),
        "the tdx-guest object (Intel TDX guests)",
        "interfaces.md section 0/1; QAPI TdxGuestProperties 'Since: 10.1'",
    ),
    Feature(
        "ram-block-attributes",
        _v("10.1"),
        "RamBlockAttributes: guest_memfd regions own a RamDiscardManager",
        "interfaces.md section 0/3; lore 20250612082747.51539-6-chenyi.qiang@intel.com",
    ),
    Feature(
        "virtio-mem-coco-refusal",
        _v("10.1"),
        "virtio-mem on a confidential guest's memory fails to realize with "
        "'Failed to set RamDiscardManager' (one RamDiscardManager per region)",
        "interfaces.md sections 3 and 8.3 (code + patch; outcome inferred)",
        confirmed=False,
    ),
    Feature(
        "sev-snp-secure-tsc",
        _v("10.2"),
        "sev-snp-guest's secure-tsc, tsc-frequency and secure-avic properties",
        "interfaces.md section 0/2 (QAPI text 'since 10.2', seen in a patch series)",
        confirmed=False,
    ),
    Feature(
        "memfd-guest-memfd",
        _v("11.0"),
        "memory-backend-memfd,guest-memfd=on for non-confidential guests",
        "interfaces.md section 3 (Peter Xu's v3 series, QAPI 'since: 11.0'; merge not confirmed)",
        confirmed=False,
    ),
)

FEATURES: dict[str, Feature] = {feature.name: feature for feature in _FEATURE_LIST}

# QOM types and properties whose absence the table above explains. A lookup
# that is not here gets "this QEMU was built without it" instead of a version.
TYPE_FEATURES: dict[str, str] = {
    "sev-snp-guest": "sev-snp-guest",
    "tdx-guest": "tdx-guest",
    "memory-backend-shm": "memory-backend-shm",
}
PROPERTY_FEATURES: dict[tuple[str, str], str] = {
    ("sev-guest", "legacy-vm-type"): "sev-legacy-vm-type",
    ("sev-snp-guest", "vcek-disabled"): "sev-snp-vcek-disabled",
    ("sev-snp-guest", "secure-tsc"): "sev-snp-secure-tsc",
    ("sev-snp-guest", "tsc-frequency"): "sev-snp-secure-tsc",
    ("sev-snp-guest", "secure-avic"): "sev-snp-secure-tsc",
    ("memory-backend-memfd", "guest-memfd"): "memfd-guest-memfd",
}


def feature(name: str) -> Feature:
    """The table entry for `name`; a KeyError names the known features."""
    try:
        return FEATURES[name]
    except KeyError:
        raise KeyError(f"unknown QEMU feature {name!r}; known: {', '.join(FEATURES)}") from None


def has_feature(version: QemuVersion, name: str) -> bool:
    """True when `version` is at least the release that introduced `name`."""
    return version >= feature(name).since
