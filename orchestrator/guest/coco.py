"""What the guest says about itself: is it a TDX / SEV-SNP guest, and can it get a report?

G1 ("the guest is what was asked for") from inside the guest, as the anchors check it
(research/anchors-mission.md sections 1-3; interfaces.md section 6):

- the kernel's line "Memory Encryption Features active: Intel TDX" or
  "...: AMD SEV SEV-ES SEV-SNP" (arch/x86/mm/mem_encrypt.c print_mem_encrypt_feature_info;
  older kernels print "AMD " before the list);
- TDX: the /proc/cpuinfo flag `tdx_guest` (set by tdx_early_init and kept);
- SEV-SNP: the SEV_STATUS MSR (0xC0010131: bit 0 SEV, 1 SEV-ES, 2 SEV-SNP; AMD APM vol. 2,
  15.34.10), read through /dev/cpu/0/msr when the `msr` module is there, else as the kernel
  printed it at boot ("SEV: Status: SEV SEV-ES SEV-SNP ...", arch/x86/coco/sev sev_show_status,
  Linux >= 6.9). Not cpuinfo: Linux clears X86_FEATURE_SEV_SNP in every guest
  (arch/x86/kernel/cpu/amd.c bsp_determine_snp: the `hypervisor` flag disables it) and the
  guest's sev/sev_es flags depend on what the hypervisor's CPUID and MSRs show, so their
  absence says nothing about an SNP guest;
- the attestation device /dev/tdx_guest or /dev/sev-guest (modules tdx_guest /
  sev_guest, loaded on demand: the default image ships them unloaded);
- a configfs-tsm report (Documentation/ABI/testing/configfs-tsm): write 64 bytes to
  `inblob`, read `outblob` and `provider`. SEV-SNP's outblob is the attestation report
  (REPORT_DATA, which holds the inblob, at offset 0x50); TDX's is a quote, which needs a
  quote-generation service on the host (without one the read fails).

All of it is one SSH command running a fixed script; `parse_coco_report` turns its
output into `GuestCoco` (pure, tested on text). On a plain guest every answer is "none",
which the confidentiality control asserts.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from orchestrator.errors import GuestError

Platform = Literal["tdx", "sev-snp", "sev-es", "sev", "none"]
TSM_REPORT_DIR = "/sys/kernel/config/tsm/report"
NONCE_BYTES = 64  # configfs-tsm: inblob is at most 64 bytes; ours is exactly 64
# Letters and digits only: the nonce crosses the guest's shell as an argument.
_NONCE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

_FEATURES = re.compile(r"Memory Encryption Features active:\s*(?P<features>.*)$", re.M)

#: What each platform shows: cpuinfo flags, device node, module, configfs-tsm provider.
EXPECTED: Mapping[str, Mapping[str, Any]] = {
    "tdx": {"flags": ("tdx_guest",), "device": "/dev/tdx_guest", "module": "tdx_guest",
            "provider": "tdx_guest"},
    "sev-snp": {"flags": (), "sev_status": ("SEV", "SEV-ES", "SEV-SNP"),
                "device": "/dev/sev-guest", "module": "sev_guest", "provider": "sev_guest"},
}  # fmt: skip
MSR_AMD64_SEV = 0xC0010131
# SEV_STATUS bits 0, 1, 2 and the names sev_show_status() prints for them.
SEV_STATUS_BITS = {"SEV": 1 << 0, "SEV-ES": 1 << 1, "SEV-SNP": 1 << 2}

# Markers the script prints before each section; values on the same line.
_SCRIPT = r"""
echo "@features $(dmesg | grep -m1 'Memory Encryption Features active' | sed 's/.*active: *//')"
echo "@flags $(grep -m1 '^flags' /proc/cpuinfo | sed 's/^flags[[:space:]]*: *//')"
echo "@sevstatus $(dmesg | grep -m1 'SEV: Status:' | sed 's/.*Status: *//')"
modprobe msr >/dev/null 2>&1
if [ -e /dev/cpu/0/msr ]; then
    v=$(dd if=/dev/cpu/0/msr bs=8 count=1 skip=3221291313 iflag=skip_bytes 2>/dev/null \
        | od -An -tx8 | tr -d ' \n')
    echo "@msr ${v:-unreadable}"
fi
if [ -n "$1" ]; then modprobe "$1" >/dev/null 2>&1; fi
for d in /dev/tdx_guest /dev/sev-guest; do [ -e "$d" ] && echo "@device $d"; done
grep -q ' /sys/kernel/config ' /proc/mounts \
    || mount -t configfs configfs /sys/kernel/config 2>/dev/null
r=/sys/kernel/config/tsm/report
if [ -d "$r" ]; then
    d="$r/cvmlab-$$"
    if mkdir "$d" 2>/dev/null; then
        echo "@provider $(cat "$d/provider" 2>/dev/null)"
        printf '%s' "$2" > "$d/inblob" 2>/dev/null || echo "@error inblob"
        if od -An -v -tx1 "$d/outblob" > /tmp/cvmlab-outblob 2>/tmp/cvmlab-outblob.err; then
            echo "@outblob $(tr -d ' \n' < /tmp/cvmlab-outblob)"
        else
            echo "@error outblob $(cat /tmp/cvmlab-outblob.err)"
        fi
        echo "@generation $(cat "$d/generation" 2>/dev/null)"
        rm -f /tmp/cvmlab-outblob /tmp/cvmlab-outblob.err
        rmdir "$d"
    else
        echo "@error mkdir $d"
    fi
else
    echo "@error no $r"
fi
"""


class Shell(Protocol):
    def run(self, cmd: str | Sequence[str], timeout: float = ..., check: bool = ...) -> Any: ...


@dataclass(frozen=True)
class GuestCoco:
    """The guest's own account of its confidential platform."""

    features: str  # the text after "Memory Encryption Features active:" ("" if none)
    flags: frozenset[str]
    devices: tuple[str, ...]
    tsm_provider: str | None
    report: bytes | None  # configfs-tsm outblob
    nonce: bytes
    errors: tuple[str, ...] = field(default=())
    sev_status_line: str = ""  # names after "SEV: Status:" in the guest's kernel log
    sev_status_msr: int | None = None  # SEV_STATUS read through /dev/cpu/0/msr

    @property
    def platform(self) -> Platform:
        """What the kernel line says the guest is ("none" without the line)."""
        return platform_from_features(self.features)

    @property
    def report_has_nonce(self) -> bool:
        """The report carries our 64-byte nonce (SNP REPORT_DATA; inside a TDX quote's body)."""
        return self.report is not None and self.nonce in self.report

    def missing_flags(self, platform: str) -> list[str]:
        return [f for f in EXPECTED.get(platform, {}).get("flags", ()) if f not in self.flags]

    @property
    def sev_status(self) -> int | None:
        """SEV_STATUS bits 0-2: from the MSR when read, else from the kernel's Status line."""
        if self.sev_status_msr is not None:
            return self.sev_status_msr
        if not self.sev_status_line:
            return None
        words = set(self.sev_status_line.split())
        return sum(bit for name, bit in SEV_STATUS_BITS.items() if name in words)

    def cpu_evidence(self, platform: str) -> tuple[str, bool, dict[str, Any]]:
        """(what, holds, details) of the CPU-level G1 evidence for `platform`: the
        `tdx_guest` flag for TDX; SEV_STATUS bits SEV, SEV-ES and SEV-SNP for SEV-SNP.
        No SEV_STATUS at all (no msr module, a kernel older than 6.9) does not hold:
        missing evidence is never a pass."""
        if platform != "sev-snp":
            flags = EXPECTED.get(platform, {}).get("flags", ())
            missing = self.missing_flags(platform)
            return f"cpuinfo carries {', '.join(flags)}", not missing, {"missing": missing}
        status = self.sev_status
        source = (
            f"MSR {MSR_AMD64_SEV:#x}" if self.sev_status_msr is not None
            else "the kernel's 'SEV: Status:' line" if self.sev_status_line
            else "nowhere (no /dev/cpu/0/msr, no 'SEV: Status:' line)"
        )  # fmt: skip
        wanted = sum(SEV_STATUS_BITS.values())
        ok = status is not None and status & wanted == wanted
        details = {
            "sev_status": None if status is None else hex(status),
            "source": source,
            "cpuinfo_sev_flags": sorted(self.flags & {"sev", "sev_es", "sev_snp"}),
        }
        return (
            f"SEV_STATUS ({MSR_AMD64_SEV:#x}) has SEV, SEV-ES and SEV-SNP set (read from "
            f"{source})",
            ok,
            details,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "features": self.features,
            "platform": self.platform,
            "coco_flags": sorted(self.flags & {"tdx_guest", "sev", "sev_es", "sev_snp"}),
            "sev_status": None if self.sev_status is None else hex(self.sev_status),
            "sev_status_line": self.sev_status_line,
            "devices": list(self.devices),
            "tsm_provider": self.tsm_provider,
            "report_bytes": len(self.report) if self.report is not None else None,
            "report_has_nonce": self.report_has_nonce,
            "errors": list(self.errors),
        }


def platform_from_features(features: str) -> Platform:
    """ "Intel TDX" -> tdx; "AMD SEV SEV-ES SEV-SNP" (or without "AMD") -> sev-snp; ..."""
    words = set(features.replace(",", " ").split())
    if "TDX" in words:
        return "tdx"
    if "SEV-SNP" in words:
        return "sev-snp"
    if "SEV-ES" in words:
        return "sev-es"
    if "SEV" in words:
        return "sev"
    return "none"


def features_line(dmesg: str) -> str:
    """The feature list of the kernel's memory-encryption line, or ""."""
    match = _FEATURES.search(dmesg)
    return match["features"].strip() if match else ""


def parse_coco_report(text: str, nonce: bytes) -> GuestCoco:
    """The script's output as GuestCoco (pure)."""
    features = ""
    flags: frozenset[str] = frozenset()
    devices: list[str] = []
    provider: str | None = None
    report: bytes | None = None
    errors: list[str] = []
    status_line = ""
    msr: int | None = None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        value = value.strip()
        if key == "@features":
            features = value
        elif key == "@flags":
            flags = frozenset(value.split())
        elif key == "@device":
            devices.append(value)
        elif key == "@provider":
            provider = value or None
        elif key == "@outblob":
            try:
                report = bytes.fromhex(value)
            except ValueError:
                errors.append(f"outblob is not hex: {value[:40]!r}")
        elif key == "@error":
            errors.append(value)
        elif key == "@sevstatus":
            status_line = value
        elif key == "@msr":
            try:
                msr = int(value, 16)
            except ValueError:
                errors.append(f"SEV_STATUS MSR: {value or 'no output'}")
    return GuestCoco(
        features, flags, tuple(devices), provider, report, nonce, tuple(errors), status_line, msr
    )


def read_guest_coco(shell: Shell, module: str | None = None, timeout: float = 60.0) -> GuestCoco:
    """Run the detection script in the guest; `module` (tdx_guest / sev_guest) is loaded first."""
    nonce = "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(NONCE_BYTES))
    result = shell.run(
        ["sh", "-c", _SCRIPT, "cvmlab-coco", module or "", nonce],
        timeout=timeout,
        check=False,
    )
    if "@features" not in result.stdout:
        raise GuestError(
            f"the guest's platform check printed nothing usable (status {result.exit_status})",
            "see the guest's dmesg; the image needs busybox with dmesg, od and xargs",
            detail=result.stderr,
        )
    return parse_coco_report(result.stdout, nonce.encode())


__all__ = [
    "EXPECTED",
    "GuestCoco",
    "features_line",
    "parse_coco_report",
    "platform_from_features",
    "read_guest_coco",
]
