"""Issue 12's points, each fed the bug it names, against facts from the sources.

No TDX or SNP host exists here: these are the pure decisions (firmware tables, kernel
lines, device modes, VM-type bits, QOM properties, SEV_STATUS), with the source of each
fact in the test's docstring. tests/test_lab_rehearsal.py runs them together on recorded
hosts; real sockets are used for the quote-service check.
"""

from __future__ import annotations

import socket
import stat
import tempfile
from pathlib import Path

import pytest

from orchestrator.errors import SpecError
from orchestrator.guest.coco import parse_coco_report
from orchestrator.host.coco_host import (
    Credentials,
    KernelLog,
    NodeStat,
    access_problem,
    kvm_vm_type_problem,
    qemu_interface_problem,
    snp_host_state,
    snp_init_problem,
    tdx_host_state,
    tdx_param_problem,
)
from orchestrator.host.confidential import decide_kernel_hashes, quote_service_problem
from orchestrator.host.ovmf import (
    AMDSEV_HASHES_AREA,
    SEV_HASH_TABLE_GUID,
    SEV_METADATA_GUID,
    TDX_METADATA_OFFSET_GUID,
    ovmf_like,
    parse_table,
)
from orchestrator.qemu.rules import check_snp_policy_bits
from orchestrator.qemu.spec import (
    DiskBoot,
    KernelBoot,
    MachineSpec,
    QuoteGenerationSocket,
    SevGuest,
    SnpGuest,
)

KERNEL = KernelBoot(kernel="/k", initrd="/i")
NONCE = b"N" * 64


def table(image: bytes):  # type: ignore[no-untyped-def]
    parsed = parse_table(image, len(image))
    assert parsed is not None
    return parsed


# --- point 1: kernel-hashes follows the firmware's table ---------------------------------------


def test_amdsev_table_demands_kernel_hashes_and_generic_ovmf_refuses_them() -> None:
    """edk2 ResetVectorVtf0.asm: the SEV hashes block (7255371f-...) holds base and size;
    AmdSevX64 reserves an area, OvmfPkgX64 publishes 0/0. QEMU target/i386/sev.c
    sev_add_kernel_loader_hashes needs base != 0 and size >= sizeof(PaddedSevHashTable)=176."""
    amdsev = table(ovmf_like(hashes_area=AMDSEV_HASHES_AREA))
    generic = table(ovmf_like())
    assert amdsev.measured_direct_boot and not generic.measured_direct_boot
    assert not table(ovmf_like(hashes_area=(0x80C000, 175))).measured_direct_boot
    assert SEV_HASH_TABLE_GUID in generic.guids  # the GUID alone proves nothing


def test_kernel_hashes_decided_from_the_table_and_contradictions_refused() -> None:
    """edk2 BlobVerifierLibSevHashes/BlobVerifierSevHashes.c VerifyBlob: no hashes table ->
    EFI_ACCESS_DENIED (the AmdSev guest never reaches its kernel); QEMU exits on
    kernel-hashes=on without an area ("guest firmware hashes table area is invalid")."""
    amdsev = table(ovmf_like(hashes_area=AMDSEV_HASHES_AREA))
    generic = table(ovmf_like())
    assert decide_kernel_hashes(SnpGuest(), KERNEL, amdsev, "/fw").kernel_hashes is True
    assert decide_kernel_hashes(SnpGuest(), KERNEL, generic, "/fw").kernel_hashes is False
    assert decide_kernel_hashes(SevGuest(), KERNEL, amdsev, "/fw").kernel_hashes is True
    with pytest.raises(SpecError, match="hashes table area is invalid"):
        decide_kernel_hashes(SnpGuest(kernel_hashes=True), KERNEL, generic, "/fw")
    with pytest.raises(SpecError, match="EFI_ACCESS_DENIED"):
        decide_kernel_hashes(SnpGuest(kernel_hashes=False), KERNEL, amdsev, "/fw")
    disk = DiskBoot(disk="/d.qcow2")
    assert decide_kernel_hashes(SnpGuest(), disk, amdsev, "/fw").kernel_hashes is None


# --- point 2: G1 on SNP judges SEV_STATUS, not cpuinfo -----------------------------------------

SNP_GUEST = """@features AMD SEV SEV-ES SEV-SNP
@flags fpu vme hypervisor
@sevstatus {status}
@device /dev/sev-guest
"""


def test_snp_guest_without_sev_cpuinfo_flags_passes_on_sev_status() -> None:
    """arch/x86/kernel/cpu/amd.c bsp_determine_snp clears X86_FEATURE_SEV_SNP in a guest
    (hypervisor flag); arch/x86/coco/sev sev_show_status prints "SEV: Status: SEV SEV-ES
    SEV-SNP ..." from MSR 0xC0010131 bits 0-2."""
    coco = parse_coco_report(SNP_GUEST.format(status="SEV SEV-ES SEV-SNP DebugSwap"), NONCE)
    what, ok, details = coco.cpu_evidence("sev-snp")
    assert ok and "SEV_STATUS" in what and details["sev_status"] == "0x7"
    assert coco.missing_flags("sev-snp") == []


def test_sev_status_msr_wins_and_an_sev_es_guest_is_not_snp() -> None:
    """SEV_STATUS = 0x3 (SEV, SEV-ES) is an SEV-ES guest: G1 for SNP must not hold."""
    coco = parse_coco_report(SNP_GUEST.format(status="SEV SEV-ES SEV-SNP") + "@msr 3\n", NONCE)
    _what, ok, details = coco.cpu_evidence("sev-snp")
    assert not ok and details["sev_status"] == "0x3" and "MSR" in details["source"]


def test_no_sev_status_evidence_is_not_a_pass() -> None:
    coco = parse_coco_report(SNP_GUEST.format(status=""), NONCE)
    _what, ok, details = coco.cpu_evidence("sev-snp")
    assert not ok and details["sev_status"] is None and "nowhere" in details["source"]


def test_tdx_still_judges_the_tdx_guest_flag() -> None:
    coco = parse_coco_report("@features Intel TDX\n@flags fpu tdx_guest\n", NONCE)
    assert coco.cpu_evidence("tdx")[1]
    assert not parse_coco_report("@features Intel TDX\n@flags fpu\n", NONCE).cpu_evidence("tdx")[1]


# --- point 3: the probe uses the VM-type bits; vendor QEMU by capability -----------------------


def test_vm_types_without_the_tdx_or_snp_bit_name_the_upstream_kernel() -> None:
    """arch/x86/include/uapi/asm/kvm.h: KVM_X86_SNP_VM 4, KVM_X86_TDX_VM 5; typical SNP host
    0x1d, TDX host 0x21 (research/interfaces.md section 7)."""
    assert kvm_vm_type_problem("tdx", 0x21) is None
    assert kvm_vm_type_problem("snp", 0x1D) is None
    problem = kvm_vm_type_problem("tdx", 0x1)
    assert problem and "KVM_X86_TDX_VM (bit 5)" in problem and "6.16" in problem
    problem = kvm_vm_type_problem("snp", 0xD)
    assert problem and "KVM_X86_SNP_VM (bit 4)" in problem and "6.11" in problem
    assert "could not be read" in (kvm_vm_type_problem("snp", None, "EACCES") or "")


def test_a_vendor_qemu_with_the_type_is_named_by_its_properties_not_its_version() -> None:
    """qapi/qom.json TdxGuestProperties (10.1) has quote-generation-socket; upstream
    SevSnpGuestProperties spells author-key-enabled (pre-upstream: auth-key-enabled)."""
    vendor = {"attributes", "sept-ve-disable", "mrconfigid", "mrowner", "mrownerconfig",
              "quote-generation-service"}  # fmt: skip
    problem = qemu_interface_problem("tdx", "tdx-guest", True, vendor, "8.0.0")
    assert problem and "quote-generation-socket" in problem and "vendor" in problem
    upstream = (vendor - {"quote-generation-service"}) | {"quote-generation-socket"}
    assert qemu_interface_problem("tdx", "tdx-guest", True, upstream, "10.1.0") is None
    snp = {"policy", "guest-visible-workarounds", "id-block", "id-auth", "auth-key-enabled",
           "host-data"}  # fmt: skip
    assert "author-key-enabled" in (qemu_interface_problem("snp", "x", True, snp, "8.2") or "")


# --- point 4: TDX init lines, nohibernate; /dev/sev access; SNP firmware and init ---------------


def log(*lines: str) -> KernelLog:
    return KernelLog(tuple(lines), "test")


def tdx_state(tmp_path: Path, cmdline: str, *lines: str):  # type: ignore[no-untyped-def]
    (tmp_path / "proc").mkdir(exist_ok=True)
    (tmp_path / "proc/cmdline").write_text(cmdline + "\n")
    return tdx_host_state(tmp_path, log(*lines))


def test_tdx_n_because_of_hibernation_names_nohibernate(tmp_path: Path) -> None:
    """arch/x86/virt/vmx/tdx/tdx.c tdx_init: "initialization failed: Hibernation support is
    enabled"; then arch/x86/kvm/vmx/tdx.c tdx_bringup: "no TDX private KeyIDs available"."""
    state = tdx_state(
        tmp_path, "ro kvm_intel.tdx=1",
        "virt/tdx: BIOS enabled: private KeyID range [64, 128)",
        "virt/tdx: initialization failed: Hibernation support is enabled",
        "kvm_intel: tdx: no TDX private KeyIDs available",
    )  # fmt: skip
    problem = tdx_param_problem("N", state)
    assert "nohibernate" in problem and "boot with kvm_intel.tdx=1" not in problem


def test_tdx_n_for_each_kernel_reason_names_its_own_fix(tmp_path: Path) -> None:
    """tdx.c: "module not loaded" (first SEAMCALL), "tdx requires kvm.enable_virt_at_load=1"
    (tdx_bringup), no "BIOS enabled" line + "no TDX private KeyIDs" (BIOS off)."""
    cases = {
        "virt/tdx: module not loaded": "SEAM loader",
        "kvm_intel: tdx: tdx requires kvm.enable_virt_at_load=1": "kvm.enable_virt_at_load=1",
        "kvm_intel: tdx: no TDX private KeyIDs available": "TME-MT",
        "virt/tdx: frame pointer (RBP) clobber bug present, upgrade TDX module": "update the TDX",
    }
    for line, fix in cases.items():
        state = tdx_state(tmp_path, "ro kvm_intel.tdx=1 nohibernate", line)
        assert fix in tdx_param_problem("N", state), line


def test_tdx_n_without_the_parameter_requested_asks_for_it_with_nohibernate(
    tmp_path: Path,
) -> None:
    state = tdx_state(tmp_path, "ro quiet")
    assert "boot with kvm_intel.tdx=1 nohibernate" in tdx_param_problem("N", state)
    state = tdx_state(tmp_path, "ro kvm_intel.tdx=1 nohibernate")
    assert "journalctl -k -b" in tdx_param_problem("N", state)


def test_dev_sev_access_is_judged_for_the_user_who_runs_qemu() -> None:
    """target/i386/sev.c opens sev-device O_RDWR; root has CAP_DAC_OVERRIDE."""
    node = NodeStat(stat.S_IFCHR | 0o600, 0, 0)
    lab_user = Credentials(1000, frozenset({1000}))
    problem = access_problem("/dev/sev", node, lab_user)
    assert problem and "uid 1000 cannot open /dev/sev read-write" in problem
    assert access_problem("/dev/sev", node, Credentials(0, frozenset({0}))) is None
    group = NodeStat(stat.S_IFCHR | 0o660, 0, 36)
    assert access_problem("/dev/sev", group, Credentials(1000, frozenset({1000, 36}))) is None
    read_only = NodeStat(stat.S_IFCHR | 0o640, 0, 36)
    assert access_problem("/dev/sev", read_only, Credentials(1000, frozenset({36})))


def test_snp_firmware_below_1_51_and_a_missing_snp_init_are_named() -> None:
    """drivers/crypto/ccp/sev-dev.c prints "SEV-SNP API:%d.%d build:%d" after SNP_INIT and
    needs SNP_MIN_API 1.51 (KVM: SNP_POLICY_API_MAJOR/MINOR 1/51)."""
    old = snp_host_state(log=log("ccp 0000:01:00.5: SEV API:1.49 build:3",
                             "ccp 0000:01:00.5: SEV-SNP API:1.49 build:3"))  # fmt: skip
    assert "older than 1.51" in (snp_init_problem(old) or "")
    no_snp = snp_host_state(log=log("ccp 0000:01:00.5: SEV API:1.55 build:21"))
    assert "no 'SEV-SNP API' line" in (snp_init_problem(no_snp) or "")
    failed = snp_host_state(log=log("ccp 0000:01:00.5: SEV-SNP: failed to INIT rc -5, error 0x3"))
    assert "SNP_INIT failed" in (snp_init_problem(failed) or "")
    good = snp_host_state(log=log("ccp 0000:01:00.5: SEV API:1.55 build:21",
                              "ccp 0000:01:00.5: SEV-SNP API:1.55 build:21"))  # fmt: skip
    assert snp_init_problem(good) is None and good.snp_api == (1, 55, 21)
    assert snp_init_problem(snp_host_state(log=log())) is None  # a rotated log decides nothing


# --- point 5: firmware identity by what the table points at ------------------------------------


def test_both_markers_are_in_every_x86_64_ovmf_so_the_metadata_decides() -> None:
    """edk2 ResetVectorVtf0.asm carries the TDX and SEV metadata offsets in every X64 build;
    QEMU hw/i386/tdvf.c loads TDVF sections from the file, so a section beyond the file (a
    split OVMF_CODE) cannot be loaded with -bios."""
    whole = table(ovmf_like())
    split = table(ovmf_like(tdvf_beyond_file=True))
    assert {TDX_METADATA_OFFSET_GUID, SEV_METADATA_GUID} <= whole.guids & split.guids
    assert whole.tdvf_ready and whole.sev_snp_ready
    assert not split.tdvf_ready and any("beyond the file" in p for p in split.problems)
    ia32 = table(ovmf_like(sev=False, tdx=False))
    assert not ia32.tdvf_ready and not ia32.sev_snp_ready


# --- point 6: SNP policy mask, reduced_phys_bits wording, the quote service ---------------------


def test_snp_policy_bits_21_to_25_are_refused_like_kvm_does() -> None:
    """arch/x86/kvm/svm/sev.c SNP_POLICY_MASK_VALID = API minor/major, SMT, RSVD_MBO, DEBUG,
    SINGLE_SOCKET (bits 0-17, 19, 20); snp_launch_start returns EINVAL outside it."""
    base = MachineSpec(boot=KERNEL, accel="kvm", cpu="host")

    def snp(policy: int) -> MachineSpec:
        cgs = SnpGuest(cbitpos=51, reduced_phys_bits=1, policy=policy)
        return MachineSpec(**{**base.__dict__, "confidential": cgs})

    assert check_snp_policy_bits(snp(0x30000 | 1 << 19 | 1 << 20), None) is None
    for bit in range(21, 26):
        problem = check_snp_policy_bits(snp(0x30000 | 1 << bit), None)
        assert problem is not None and "beyond bit 20" in problem.problem


def test_a_quote_service_socket_that_refuses_is_named_and_one_that_listens_passes() -> None:
    """Real unix sockets: a bound but not listening socket refuses (a stopped QGS's stale
    file); a listening one accepts, as QEMU's GetQuote connection needs."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "qgs.socket"
        qgs = QuoteGenerationSocket(type="unix", path=str(path))
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        try:
            problem = quote_service_problem(qgs)
            assert problem and "nothing answers" in problem
        finally:
            stale.close()
        path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            server.listen(1)
            assert quote_service_problem(qgs) is None


def test_an_unreadable_msr_falls_back_to_the_kernel_status_line() -> None:
    """No msr module (the default image ships none): the script prints "@msr unreadable"."""
    text = SNP_GUEST.format(status="SEV SEV-ES SEV-SNP") + "@msr unreadable\n"
    coco = parse_coco_report(text, NONCE)
    assert coco.sev_status_msr is None and coco.cpu_evidence("sev-snp")[1]
    assert any("SEV_STATUS MSR" in e for e in coco.errors)
