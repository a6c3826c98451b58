"""Host facts that decide whether TDX or SEV-SNP guests can start here, and the exact fix when not.

The probe's `tdx` and `snp` tiers ask this module; each "no" carries the one thing to
change. Capabilities, not version numbers, decide: the KVM VM types, the module
parameters, device access, the kernel's own initialisation lines, the firmware's table.

Facts, from the sources:

- TDX host, arch/x86/virt/vmx/tdx/tdx.c (pr_fmt "virt/tdx: "): tdx_init() prints
  "BIOS enabled: private KeyID range [a, b)" when the BIOS partitioned KeyIDs for TDX
  (IA32_MKTME_KEYID_PARTITIONING), else nothing; it then refuses with "initialization
  failed: too few private KeyIDs available." or "initialization failed: Hibernation
  support is enabled" (hibernation_available(): boot with `nohibernate`). The first
  SEAMCALL prints "module not loaded" when the BIOS's SEAM loader loaded no TDX module;
  check_features() prints "frame pointer (RBP) clobber bug present, upgrade TDX module";
  __tdx_enable() prints "module initialization failed (%d)" or "module initialized".
- KVM, arch/x86/kvm/vmx/tdx.c tdx_bringup() (pr_fmt "kvm_intel: "): with kvm_intel.tdx=1 it
  still turns TDX off and says why: "tdx: no TDX private KeyIDs available" (no
  X86_FEATURE_TDX_HOST_PLATFORM: tdx_init() failed above), "tdx: tdx requires
  kvm.enable_virt_at_load=1", "EPT is required for TDX", "TDP MMU and MMIO caching and EPT
  A/D bit is required for TDX", "APICv is required for TDX". So `kvm_intel.tdx = N` often
  does not mean "boot with kvm_intel.tdx=1": the log says what does.
- SNP host, drivers/crypto/ccp/sev-dev.c: after SNP_INIT the PSP driver prints "SEV-SNP
  API:<major>.<minor> build:<n>"; a failed init "SEV-SNP: failed to INIT ...". KVM's SNP
  needs firmware ABI >= 1.51 (arch/x86/kvm/svm/sev.c SNP_POLICY_API_MAJOR/MINOR, and
  sev-dev.c SNP_MIN_API_MAJOR/MINOR). kvm_amd prints "SEV-SNP enabled|disabled (ASIDs ...)"
  (sev_hardware_setup). Before 6.16 kvm_amd's `sev_snp=Y` did not prove that SNP_INIT
  succeeded (6.16 sets it from is_sev_snp_initialized()), so the ccp line decides.
- QEMU opens the `sev-device` (/dev/sev) read-write for SNP too (target/i386/sev.c
  sev_common_kvm_init: open(devname, O_RDWR)): the user who runs the tests needs that.
- Upstream KVM interfaces: KVM_CAP_VM_TYPES bit 4 (KVM_X86_SNP_VM, Linux 6.11) and bit 5
  (KVM_X86_TDX_VM, 6.16) (arch/x86/include/uapi/asm/kvm.h). Pre-upstream vendor stacks
  (older distribution TDX kernels, AMD's snp-host branches) enable the module parameters
  without these bits; their KVM speaks another interface and upstream QEMU fails inside it.
  Early Intel stacks also booted with `tdx_host=on` and exposed /sys/firmware/tdx.

`root` re-roots every file read, as in the probe. Outside the real root the kernel log is
the text file `<root>/dmesg`, and device ownership and the test user come from
`<root>/recorded.json` (what `cvmlab probe --lab-report` writes), so a lab's recorded
host can be replayed here.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.host.kernel_log import KMSG, kmsg_message

RECORDED = "recorded.json"  # in a recorded host tree: node ownership, the test user, facts
DMESG_FILE = "dmesg"  # in a recorded host tree: the kernel log as text

KVM_X86_SNP_VM = 4  # arch/x86/include/uapi/asm/kvm.h
KVM_X86_TDX_VM = 5
SNP_MIN_API = (1, 51)  # sev-dev.c SNP_MIN_API_MAJOR/MINOR; KVM's SNP_POLICY_API_MAJOR/MINOR
# tdx-guest's properties in upstream QEMU (qapi/qom.json TdxGuestProperties, 10.1).
UPSTREAM_TDX_GUEST_PROPERTIES = frozenset(
    {"attributes", "sept-ve-disable", "mrconfigid", "mrowner", "mrownerconfig",
     "quote-generation-socket"}
)  # fmt: skip
# sev-snp-guest's properties in upstream QEMU 9.1 (qapi/qom.json SevSnpGuestProperties;
# AMD's pre-upstream QEMU spelled one of them `auth-key-enabled`).
UPSTREAM_SNP_GUEST_PROPERTIES = frozenset(
    {"policy", "guest-visible-workarounds", "id-block", "id-auth", "author-key-enabled",
     "host-data"}
)  # fmt: skip


# --- the kernel log -------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelLog:
    """The kernel's messages, oldest first, and where they came from."""

    lines: tuple[str, ...]
    source: str
    readable: bool = True  # False: no permission, or nothing recorded

    def grep(self, pattern: re.Pattern[str]) -> list[re.Match[str]]:
        return [m for m in (pattern.search(line) for line in self.lines) if m]


def read_kernel_log(root: Path = Path("/")) -> KernelLog:
    """Every message still in the ring buffer (`/dev/kmsg` from its start, non-blocking), or
    the recorded `<root>/dmesg` text for a recorded host."""
    if root != Path("/"):
        try:
            text = (root / DMESG_FILE).read_text(errors="replace")
        except OSError:
            return KernelLog((), f"{root / DMESG_FILE} (absent)", readable=False)
        stripped = (re.sub(r"^\[\s*[\d.]+\]\s*", "", line) for line in text.splitlines())
        return KernelLog(tuple(stripped), str(root / DMESG_FILE))
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        return KernelLog((), f"{KMSG} ({error.strerror})", readable=False)
    lines: list[str] = []
    try:
        while True:
            try:
                raw = os.read(fd, 16384)
            except BlockingIOError:
                break
            except BrokenPipeError:  # overwritten while reading: continue from the oldest
                continue
            if not raw:
                break
            lines.append(kmsg_message(raw.decode(errors="replace")))
    finally:
        os.close(fd)
    return KernelLog(tuple(lines), KMSG)


# --- recorded facts of a lab host -------------------------------------------------------------


def recorded(root: Path) -> dict[str, Any]:
    """`<root>/recorded.json` of a recorded host tree; {} on the real root or without one."""
    if root == Path("/"):
        return {}
    try:
        data = json.loads((root / RECORDED).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cmdline(root: Path) -> str:
    try:
        return (root / "proc/cmdline").read_text().strip()
    except OSError:
        return ""


def _modprobe_options(root: Path, module: str) -> str:
    """`options MODULE ...` lines from /etc/modprobe.d, joined (a lab may set tdx=1 there)."""
    found = []
    directory = root / "etc/modprobe.d"
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return ""
    for name in names:
        try:
            text = (directory / name).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "options" and words[1] == module:
                found.append(" ".join(words[2:]))
    return " ".join(found)


# --- device access ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Who runs the tests (and QEMU): effective uid and all group ids."""

    uid: int
    gids: frozenset[int]

    @classmethod
    def current(cls) -> Credentials:
        return cls(os.geteuid(), frozenset({os.getegid(), *os.getgroups()}))


@dataclass(frozen=True)
class NodeStat:
    """What decides read-write access to a device node."""

    mode: int
    uid: int
    gid: int
    is_char: bool = True


def access_problem(path: str, node: NodeStat | None, who: Credentials) -> str | None:
    """Why `who` cannot open `path` read-write (QEMU does, for /dev/sev), with the fix; None
    when it can. Root (CAP_DAC_OVERRIDE) always can; else the owner, group or other bits."""
    if node is None:
        return f"{path} does not exist"
    if not node.is_char:
        return f"{path} is not a character device"
    if who.uid == 0:
        return None
    if node.uid == who.uid:
        bits = (node.mode >> 6) & 0o6
    elif node.gid in who.gids:
        bits = (node.mode >> 3) & 0o6
    else:
        bits = node.mode & 0o6
    if bits == 0o6:
        return None
    return (
        f"uid {who.uid} cannot open {path} read-write (mode {stat.S_IMODE(node.mode):04o}, "
        f"owner {node.uid}, group {node.gid}), and QEMU opens it O_RDWR: add the test user to "
        f"group {node.gid} (or a udev rule giving that group rw on {path}), or run as root"
    )


def device_access(root: Path, path: str) -> tuple[NodeStat | None, Credentials, str | None]:
    """(node, who, problem) for `path` under `root`; a recorded tree gives both from its
    recorded.json ("nodes", "user"), the real host from stat() and this process."""
    facts = recorded(root)
    if facts:
        who_data = facts.get("user", {})
        who = Credentials(int(who_data.get("uid", 0)), frozenset(who_data.get("gids", ())))
        data = facts.get("nodes", {}).get(path)
        node = None
        if data is not None:
            mode = int(str(data["mode"]), 0)
            node = NodeStat(mode, int(data["uid"]), int(data["gid"]), bool(data.get("char", True)))
        return node, who, access_problem(path, node, who)
    who = Credentials.current()
    try:
        st = os.stat(root / path.lstrip("/"))
    except OSError:
        return None, who, access_problem(path, None, who)
    node = NodeStat(st.st_mode, st.st_uid, st.st_gid, stat.S_ISCHR(st.st_mode))
    if root == Path("/") and not node.is_char:
        return node, who, access_problem(path, node, who)
    if root != Path("/"):  # a plain file in a test tree stands for the node
        node = NodeStat(stat.S_IFCHR | stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return node, who, access_problem(path, node, who)


# --- TDX ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogFinding:
    """One kernel line that explains a state, and what to do about it."""

    line: str
    fix: str

    def text(self) -> str:
        return f'the kernel says "{self.line}": {self.fix}'


_TDX_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(regex), fix)
    for regex, fix in (
        (r"virt/tdx: initialization failed: Hibernation support is enabled",
         "add `nohibernate` to the host kernel command line and reboot (TDX does not "
         "initialise while hibernation is possible)"),
        (r"virt/tdx: initialization failed: too few private KeyIDs",
         "in the BIOS, give TDX at least 2 private KeyIDs (TME-MT key split)"),
        (r"virt/tdx: module not loaded",
         "no TDX module was loaded: in the BIOS enable TDX and the SEAM loader, and install "
         "or update the TDX module (a BIOS/firmware update)"),
        (r"virt/tdx: frame pointer \(RBP\) clobber bug present",
         "update the TDX module (BIOS/firmware update): this one clobbers RBP"),
        (r"virt/tdx: module initialization failed",
         "the TDX module did not initialise: read the virt/tdx lines before this one "
         "(memory outside the CMRs, hot-plugged memory, a TDX module too old for this kernel)"),
        (r"tdx: tdx requires kvm\.enable_virt_at_load=1",
         "boot with kvm.enable_virt_at_load=1 (or do not set it to 0)"),
        (r"EPT is required for TDX", "do not boot with kvm_intel.ept=0"),
        (r"TDP MMU and MMIO caching and EPT A/D bit is required for TDX",
         "do not set kvm.tdp_mmu=N, kvm.enable_mmio_caching=N or kvm_intel.eptad=N"),
        (r"APICv is required for TDX", "do not boot with kvm_intel.enable_apicv=0"),
        (r"(MOVDIR64B|Self-snoop|OSXSAVE) is required for TDX",
         "this CPU cannot run TDX guests: use a TDX-capable Xeon (4th gen or newer)"),
        (r"TDX not supported by the host platform",
         "enable TDX in the BIOS: TME, TME-MT, TDX, the SEAM loader, a TDX key split > 0"),
    )
)  # fmt: skip
_TDX_KEYIDS = re.compile(r"virt/tdx: BIOS enabled: private KeyID range \[(\d+), (\d+)\)")
_TDX_READY = re.compile(r"virt/tdx: (TDX[- ])?module initialized")
_TDX_NO_KEYIDS = re.compile(r"tdx: no TDX private KeyIDs available")
_TDX_ANY = re.compile(r"virt/tdx:|kvm_intel: .*(TDX|tdx)|tdx:")
BIOS_TDX_FIX = (
    "enable TDX in the BIOS (Memory Encryption (TME), Multi-Key TME (TME-MT), a TME-MT/TDX "
    "key split with TDX KeyIDs > 0, Trust Domain Extension (TDX), the TDX SEAM loader)"
)


@dataclass(frozen=True)
class TdxHostState:
    """What the kernel log and command line say about TDX on this host."""

    keyids: tuple[int, int] | None  # BIOS-enabled private KeyID range
    module_initialized: bool
    findings: tuple[LogFinding, ...]
    lines: tuple[str, ...]  # every TDX line of the log, for the evidence and the lab report
    cmdline_tdx: bool  # kvm_intel.tdx=1 (cmdline or modprobe.d)
    nohibernate: bool  # the command line disables hibernation
    log_readable: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "bios_keyids": list(self.keyids) if self.keyids else None,
            "module_initialized": self.module_initialized,
            "findings": [f.text() for f in self.findings],
            "kernel_lines": list(self.lines),
            "kvm_intel.tdx=1 requested": self.cmdline_tdx,
            "nohibernate": self.nohibernate,
            "kernel_log_readable": self.log_readable,
        }


def tdx_host_state(root: Path = Path("/"), log: KernelLog | None = None) -> TdxHostState:
    log = log if log is not None else read_kernel_log(root)
    lines = tuple(line for line in log.lines if _TDX_ANY.search(line))
    keyids_match = next((m for m in (_TDX_KEYIDS.search(x) for x in lines) if m), None)
    keyids = (int(keyids_match[1]), int(keyids_match[2])) if keyids_match else None
    findings = []
    for line in lines:
        for pattern, fix in _TDX_FAILURES:
            if pattern.search(line):
                findings.append(LogFinding(line.strip(), fix))
                break
    if keyids is None and any(_TDX_NO_KEYIDS.search(x) for x in lines) and not findings:
        # tdx_init() printed nothing: the BIOS did not partition KeyIDs for TDX.
        line = next(x for x in lines if _TDX_NO_KEYIDS.search(x))
        findings.append(LogFinding(line.strip(), BIOS_TDX_FIX))
    cmdline = _cmdline(root)
    words = cmdline.split()
    options = _modprobe_options(root, "kvm_intel").split()
    wants = {"kvm_intel.tdx=1", "kvm_intel.tdx=Y", "kvm_intel.tdx=y", "kvm_intel.tdx=on"}
    cmdline_tdx = bool(wants & set(words)) or bool({"tdx=1", "tdx=Y", "tdx=y"} & set(options))
    nohibernate = "nohibernate" in words or "hibernate=no" in words
    return TdxHostState(
        keyids,
        any(_TDX_READY.search(x) for x in lines),
        tuple(findings),
        lines,
        cmdline_tdx,
        nohibernate,
        log.readable,
    )


def tdx_param_problem(value: str | None, state: TdxHostState) -> str:
    """Why `kvm_intel.tdx` is not Y, and the exact fix (the log's reason first)."""
    shown = value or "absent"
    if state.findings:
        return f"kvm_intel parameter tdx is {shown}: " + "; ".join(f.text() for f in state.findings)
    if not state.cmdline_tdx:
        extra = "" if state.nohibernate else " nohibernate"
        return (
            f"kvm_intel parameter tdx is {shown}, not Y: boot with kvm_intel.tdx=1{extra} "
            "(the parameter is read-only and off by default)"
        )
    if not state.log_readable or not state.lines:
        return (
            f"kvm_intel parameter tdx is {shown} although kvm_intel.tdx=1 was requested, and the "
            "kernel log no longer says why: read `journalctl -k -b | grep -i tdx` "
            "(virt/tdx and kvm_intel lines)"
        )
    return (
        f"kvm_intel parameter tdx is {shown} although kvm_intel.tdx=1 was requested; the TDX "
        f"lines of the kernel log: {' | '.join(state.lines[-4:])}"
    )


# --- SNP ---------------------------------------------------------------------------------------


_SNP_API = re.compile(r"SEV-SNP API:(\d+)\.(\d+) build:(\d+)")
_SEV_API = re.compile(r"SEV API:(\d+)\.(\d+) build:(\d+)")
_SNP_INIT_FAILED = re.compile(r"SEV-SNP: failed to INIT|SEV-SNP: .*initiali[sz]ation failed")
_SNP_KVM = re.compile(r"kvm_amd: SEV-SNP (enabled|disabled|unusable)")
_SNP_ANY = re.compile(r"SEV|SNP|RMP|ccp ", re.IGNORECASE)
FIRMWARE_UPDATE_FIX = (
    "update the SEV firmware to SNP ABI >= 1.51: a BIOS update, or the "
    "amd_sev_fam19h_model*.sbin / fam1Ah file in /lib/firmware/amd that ccp loads at boot"
)


@dataclass(frozen=True)
class SnpHostState:
    """What the kernel log says about SEV-SNP on this host."""

    snp_api: tuple[int, int, int] | None  # (major, minor, build) from ccp's SEV-SNP API line
    sev_api: tuple[int, int, int] | None
    kvm_snp: str | None  # kvm_amd's "SEV-SNP enabled|disabled"
    findings: tuple[LogFinding, ...]
    lines: tuple[str, ...]
    log_readable: bool

    def to_json(self) -> dict[str, Any]:
        def version(v: tuple[int, int, int] | None) -> str | None:
            return None if v is None else f"{v[0]}.{v[1]} build {v[2]}"

        return {
            "snp_firmware_api": version(self.snp_api),
            "sev_firmware_api": version(self.sev_api),
            "kvm_amd_snp": self.kvm_snp,
            "findings": [f.text() for f in self.findings],
            "kernel_lines": list(self.lines),
            "kernel_log_readable": self.log_readable,
        }


def snp_host_state(root: Path = Path("/"), log: KernelLog | None = None) -> SnpHostState:
    log = log if log is not None else read_kernel_log(root)
    lines = tuple(x for x in log.lines if _SNP_ANY.search(x))

    def first(pattern: re.Pattern[str]) -> tuple[int, int, int] | None:
        match = next((m for m in (pattern.search(x) for x in lines) if m), None)
        return None if match is None else (int(match[1]), int(match[2]), int(match[3]))

    snp_api = first(_SNP_API)
    sev_api = first(_SEV_API)  # "SEV API:" is not a substring of "SEV-SNP API:"
    kvm = next((m[1] for m in (_SNP_KVM.search(x) for x in lines) if m), None)
    findings = [
        LogFinding(x.strip(), "SNP_INIT failed in the PSP: " + FIRMWARE_UPDATE_FIX
                   + "; and check the BIOS: SNP enabled, SNP memory coverage of all RAM")
        for x in lines if _SNP_INIT_FAILED.search(x)
    ]  # fmt: skip
    if snp_api is not None and snp_api[:2] < SNP_MIN_API:
        line = next(x for x in lines if _SNP_API.search(x))
        findings.append(
            LogFinding(line.strip(), f"SNP firmware {snp_api[0]}.{snp_api[1]} is older than "
                       f"{SNP_MIN_API[0]}.{SNP_MIN_API[1]}, which KVM needs: {FIRMWARE_UPDATE_FIX}")
        )  # fmt: skip
    return SnpHostState(snp_api, sev_api, kvm, tuple(findings), lines, log.readable)


def snp_init_problem(state: SnpHostState) -> str | None:
    """Why SNP is not initialised although kvm_amd may say sev_snp=Y (6.11-6.15), or None.

    Only a positive sign decides "no": a failure line, a firmware below 1.51, or ccp's SEV
    API line without the SEV-SNP one (SNP_INIT did not run or failed). A log that holds
    neither line (rotated, unreadable) decides nothing; the evidence says so."""
    if state.findings:
        return "; ".join(f.text() for f in state.findings)
    if state.snp_api is None and state.sev_api is not None:
        return (
            f"the PSP driver printed its SEV API line ({state.sev_api[0]}.{state.sev_api[1]}) "
            "but no 'SEV-SNP API' line: SNP_INIT did not run or failed; "
            + FIRMWARE_UPDATE_FIX
            + ", enable SNP and SNP memory coverage in the BIOS, and check `dmesg | grep -i snp`"
        )
    if state.kvm_snp in ("disabled", "unusable"):
        return f"kvm_amd says SEV-SNP {state.kvm_snp}: read `dmesg | grep -iE 'sev|snp|rmp'`"
    return None


BIOS_SNP_FIX = (
    "enable SEV-SNP in the BIOS (SMEE, SEV-SNP support, SNP memory coverage / RMP table for "
    "all RAM, SEV-ES ASID space limit > 1) and boot a kernel >= 6.11 with kvm_amd.sev_snp=1"
)


# --- upstream interface or vendor stack ---------------------------------------------------------


@dataclass(frozen=True)
class InterfaceCheck:
    """Does this host's KVM/QEMU speak the upstream TDX or SNP interface?"""

    problems: tuple[str, ...]
    evidence: dict[str, Any] = field(default_factory=dict)


def kvm_vm_type_problem(kind: str, vm_types: int | None, kvm_reason: str = "") -> str | None:
    """KVM must list KVM_X86_TDX_VM (bit 5) / KVM_X86_SNP_VM (bit 4) in KVM_CAP_VM_TYPES:
    the upstream interface that QEMU's tdx-guest / sev-snp-guest use."""
    bit, name, since = (
        (KVM_X86_TDX_VM, "KVM_X86_TDX_VM", "6.16") if kind == "tdx"
        else (KVM_X86_SNP_VM, "KVM_X86_SNP_VM", "6.11")
    )  # fmt: skip
    if vm_types is None:
        return (
            f"KVM_CAP_VM_TYPES could not be read ({kvm_reason or 'no usable /dev/kvm'}), so "
            f"KVM's {name} cannot be confirmed: fix /dev/kvm access first"
        )
    if vm_types & (1 << bit):
        return None
    return (
        f"KVM_CAP_VM_TYPES={vm_types:#x} lacks {name} (bit {bit}): this KVM does not speak the "
        f"upstream {kind.upper()} interface (Linux >= {since}); a pre-upstream vendor kernel "
        f"enables the module parameter without it, and upstream QEMU fails inside KVM: boot an "
        f"upstream kernel >= {since} (or your distribution's kernel that carries upstream "
        f"{kind.upper()})"
    )


def vendor_stack_signs(kind: str, root: Path, params: Mapping[str, str | None]) -> list[str]:
    """Traces of a pre-upstream vendor stack on this host (evidence, and lab-report lines)."""
    signs = []
    words = _cmdline(root).split()
    if kind == "tdx":
        if (root / "sys/firmware/tdx").exists():
            signs.append("/sys/firmware/tdx exists (pre-upstream Intel TDX host kernel)")
        if "tdx_host=on" in words:
            signs.append("kernel command line has tdx_host=on (pre-upstream Intel TDX host)")
    else:
        if params.get("kvm_amd.sev_snp") is None and (root / "sys/module/kvm_amd").is_dir():
            signs.append("kvm_amd has no sev_snp parameter (kernel without upstream SNP host)")
    return signs


def qemu_interface_problem(
    kind: str, type_name: str, has_type: bool, properties: Iterable[str], version: str
) -> str | None:
    """Why this QEMU's confidential object is not the upstream one, or None.

    Decided by capability: the QOM type must exist and carry upstream's properties. A type
    without them is a vendor fork (e.g. a pre-10.1 Intel TDX QEMU, an AMD snp-latest QEMU):
    it drives KVM through a pre-upstream interface."""
    if not has_type:
        return None  # the caller names the missing type
    upstream = UPSTREAM_TDX_GUEST_PROPERTIES if kind == "tdx" else UPSTREAM_SNP_GUEST_PROPERTIES
    missing = sorted(upstream - set(properties))
    if not missing:
        return None
    first = "10.1" if kind == "tdx" else "9.1"
    return (
        f"QEMU {version}'s {type_name} lacks upstream properties {', '.join(missing)}: a "
        f"pre-upstream vendor build that drives KVM through another interface; use upstream "
        f"QEMU >= {first} (its {type_name} has {', '.join(sorted(upstream))})"
    )


__all__ = [
    "Credentials",
    "KernelLog",
    "NodeStat",
    "SnpHostState",
    "TdxHostState",
    "access_problem",
    "device_access",
    "kvm_vm_type_problem",
    "qemu_interface_problem",
    "read_kernel_log",
    "recorded",
    "snp_host_state",
    "snp_init_problem",
    "tdx_host_state",
    "tdx_param_problem",
    "vendor_stack_signs",
]
