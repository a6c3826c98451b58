"""Lab rehearsal without hardware: the probe and the spec preparation on recorded TDX/SNP hosts.

Each directory under tests/fixtures/labs/ is one lab configuration in the format
`cvmlab probe --lab-report` writes (orchestrator/host/lab_report.py): the files the probe
reads, at their paths, built from the documented formats (sysfs module parameters; kernel
lines of arch/x86/virt/vmx/tdx/tdx.c tdx_init/__tdx_enable, arch/x86/kvm/vmx/tdx.c
tdx_bringup, drivers/crypto/ccp/sev-dev.c, arch/x86/kvm/svm/sev.c sev_hardware_setup),
plus recorded.json (device ownership, the test user, KVM_CAP_VM_TYPES as
arch/x86/include/uapi/asm/kvm.h numbers them, QEMU's QOM properties as qapi/qom.json names
them). Firmware images are materialised from their kind with orchestrator.host.ovmf
(edk2 ResetVectorVtf0.asm and OvmfSevMetadata.asm layouts).

For every configuration the verdict and the fix it names are asserted; for the good ones
the confidential spec is prepared against the recording and its argv checked. Lab-only
path: nothing here launches a TD or an SNP guest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from test_probe import run_cli

from orchestrator.errors import SpecError
from orchestrator.host import lab_report
from orchestrator.host.coco_host import RECORDED
from orchestrator.host.confidential import HostCpu, SevCapabilities, prepare_confidential
from orchestrator.host.ovmf import AMDSEV_HASHES_AREA, ovmf_like
from orchestrator.host.probe import HostProbe
from orchestrator.qemu.argv import Plumbing, build_argv
from orchestrator.qemu.spec import Firmware, KernelBoot, MachineSpec, SnpGuest, TdxGuest

FIXTURES = Path(__file__).parent / "fixtures" / "labs"
IMAGES = {
    "amdsev": ovmf_like(hashes_area=AMDSEV_HASHES_AREA),  # OvmfPkg/AmdSev/AmdSevX64.dsc
    "generic": ovmf_like(),  # OvmfPkgX64.dsc: both markers, hashes area 0/0
    "split-code": ovmf_like(tdvf_beyond_file=True),  # OVMF_CODE.fd alone
    "ia32x64": ovmf_like(sev=False, tdx=False),  # OvmfPkgIa32X64: no X64 metadata
}
KERNEL = KernelBoot(kernel="/img/vmlinuz", initrd="/img/initrd.img", cmdline="console=ttyS0")
# Genoa-like CPUID 0x8000001F: SEV, SEV-ES, SEV-SNP; C-bit 51.
GENOA = SevCapabilities.from_cpuid(0b11011, 51 | 1 << 6, "recorded CPUID")
LAB_CPU = HostCpu(present_cpus=96, smt_active=True, phys_bits=52)


def recorded_host(name: str, tmp_path: Path) -> Path:
    """A writable copy of fixture `name` with its firmware images materialised."""
    root = shutil.copytree(FIXTURES / name, tmp_path / name)
    for path, kind in json.loads((root / RECORDED).read_text())["firmware_images"].items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(IMAGES[kind])
    return root


def replay(name: str, tmp_path: Path) -> tuple[HostProbe, Path]:
    root = recorded_host(name, tmp_path)
    return lab_report.replay_probe(root), root


@pytest.fixture(autouse=True)
def no_firmware_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CVMLAB_TDX_FIRMWARE", raising=False)
    monkeypatch.delenv("CVMLAB_SNP_FIRMWARE", raising=False)


def argv_of(spec: MachineSpec) -> str:
    return " ".join(build_argv(spec, Plumbing(qmp_socket="/run/cvmlab/qmp.sock")))


# --- TDX ---------------------------------------------------------------------------------------


def test_tdx_upstream_host_offers_tdx_and_its_spec_prepares(tmp_path: Path) -> None:
    probe, root = replay("tdx-upstream-good", tmp_path)
    tdx = probe.tiers["tdx"]
    assert tdx.available, tdx.reason
    assert "KVM_X86_TDX_VM" in tdx.reason
    assert tdx.evidence["tdx_init"]["module_initialized"]
    assert tdx.evidence["tdx_init"]["bios_keyids"] == [64, 128]
    spec = MachineSpec(boot=KERNEL, accel="kvm", cpu="host", confidential=TdxGuest())
    done = prepare_confidential(spec, probe, root=root, host=LAB_CPU)
    argv = argv_of(done)
    assert "tdx-guest" in argv and "-bios /usr/share/ovmf/OVMF.inteltdx.fd" in argv


def test_tdx_vendor_stack_is_named_with_the_upstream_fix(tmp_path: Path) -> None:
    """kvm_intel.tdx=Y, but KVM_CAP_VM_TYPES 0x5 lacks KVM_X86_TDX_VM (bit 5), and the QEMU
    has a tdx-guest without upstream's quote-generation-socket: a pre-upstream stack."""
    probe, _root = replay("tdx-vendor-stack", tmp_path)
    tdx = probe.tiers["tdx"]
    assert not tdx.available
    assert "lacks KVM_X86_TDX_VM (bit 5)" in tdx.reason
    assert "boot an upstream kernel >= 6.16" in tdx.reason
    assert "pre-upstream vendor build" in tdx.reason and "quote-generation-socket" in tdx.reason
    assert "upstream QEMU >= 10.1" in tdx.reason
    assert any("tdx_host=on" in sign for sign in tdx.evidence["vendor_stack"])
    assert any("/sys/firmware/tdx" in sign for sign in tdx.evidence["vendor_stack"])


def test_tdx_without_nohibernate_names_nohibernate_not_kvm_intel_tdx(tmp_path: Path) -> None:
    """kvm_intel.tdx=1 is on the command line; tdx_init() refused because hibernation is
    possible, so "boot with kvm_intel.tdx=1" would be the wrong fix."""
    probe, _root = replay("tdx-missing-nohibernate", tmp_path)
    reason = probe.tiers["tdx"].reason
    assert not probe.tiers["tdx"].available
    assert "add `nohibernate` to the host kernel command line" in reason
    assert "Hibernation support is enabled" in reason
    assert "boot with kvm_intel.tdx=1" not in reason


def test_tdx_with_only_a_split_code_image_rejects_it_by_its_tdvf_metadata(tmp_path: Path) -> None:
    probe, _root = replay("tdx-wrong-firmware", tmp_path)
    tdx = probe.tiers["tdx"]
    assert not tdx.available
    assert "no TDVF found" in tdx.reason
    rejected = tdx.evidence["firmware_search"]["rejected"]
    assert any("/usr/share/ovmf/OVMF.fd" in r and "not a whole -bios image" in r for r in rejected)


# --- SNP ---------------------------------------------------------------------------------------


def test_snp_upstream_host_offers_snp_and_amdsev_gets_kernel_hashes(tmp_path: Path) -> None:
    probe, root = replay("snp-upstream-good", tmp_path)
    snp = probe.tiers["snp"]
    assert snp.available, snp.reason
    assert "SNP firmware 1.55" in snp.reason and "KVM_X86_SNP_VM" in snp.reason
    assert snp.evidence["firmware"] == "/usr/share/ovmf/OVMF.amdsev.fd"
    spec = MachineSpec(boot=KERNEL, accel="kvm", cpu="host", confidential=SnpGuest())
    done = prepare_confidential(spec, probe, GENOA, root=root, host=LAB_CPU)
    assert isinstance(done.confidential, SnpGuest) and done.confidential.kernel_hashes is True
    assert '"kernel-hashes":true' in argv_of(done).replace(" ", "")


def test_snp_with_a_generic_ovmf_leaves_kernel_hashes_off(tmp_path: Path) -> None:
    """The same host with the lab's generic OVMF.fd named: its table's hashes area is 0/0, so
    kernel-hashes stays off; asking for it is refused with the error QEMU would exit with."""
    probe, root = replay("snp-upstream-good", tmp_path)
    boot = dataclasses.replace(KERNEL, firmware=Firmware(path="/usr/share/ovmf/OVMF.fd"))
    given = MachineSpec(boot=boot, accel="kvm", cpu="host", confidential=SnpGuest())
    done = prepare_confidential(given, probe, GENOA, root=root, host=LAB_CPU)
    assert isinstance(done.confidential, SnpGuest) and done.confidential.kernel_hashes is False
    assert "kernel-hashes" not in argv_of(done)
    forced = dataclasses.replace(given, confidential=SnpGuest(kernel_hashes=True))
    with pytest.raises(SpecError, match="hashes table area is invalid"):
        prepare_confidential(forced, probe, GENOA, root=root, host=LAB_CPU)


def test_snp_vendor_stack_is_named(tmp_path: Path) -> None:
    probe, _root = replay("snp-vendor-stack", tmp_path)
    snp = probe.tiers["snp"]
    assert not snp.available
    assert "lacks KVM_X86_SNP_VM (bit 4)" in snp.reason and ">= 6.11" in snp.reason
    assert "author-key-enabled" in snp.reason and "pre-upstream vendor build" in snp.reason


def test_snp_with_only_an_ia32x64_ovmf_says_why_it_was_rejected(tmp_path: Path) -> None:
    probe, _root = replay("snp-wrong-firmware", tmp_path)
    snp = probe.tiers["snp"]
    assert not snp.available
    assert "no SNP-capable OVMF found" in snp.reason
    assert "no SEV metadata offset" in snp.reason


def test_snp_without_dev_sev_access_names_the_group_fix(tmp_path: Path) -> None:
    """QEMU opens /dev/sev O_RDWR (target/i386/sev.c sev_common_kvm_init); uid 1000 against
    a root:root 0600 node cannot, although the node exists."""
    probe, _root = replay("snp-no-dev-sev-access", tmp_path)
    reason = probe.tiers["snp"].reason
    assert not probe.tiers["snp"].available
    assert "uid 1000 cannot open /dev/sev read-write (mode 0600" in reason
    assert "add the test user to group 0" in reason


# --- the lab report round trip ---------------------------------------------------------------


def test_a_lab_report_of_a_recorded_host_replays_to_the_same_verdicts(tmp_path: Path) -> None:
    probe, root = replay("tdx-missing-nohibernate", tmp_path)
    report = lab_report.write_lab_report(tmp_path / "report", probe, root=root)
    text = report.read_text()
    assert "virt/tdx: initialization failed: Hibernation support is enabled" in text
    assert "QEMU 11.1.3" in text and "quote-generation-socket" in text
    assert "KVM_CAP_VM_TYPES: 0x1" in text
    again = lab_report.replay_probe(tmp_path / "report")
    assert {n: t.available for n, t in again.tiers.items()} == {
        n: t.available for n, t in probe.tiers.items()
    }
    assert again.tiers["tdx"].reason == probe.tiers["tdx"].reason


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU installed")
def test_cvmlab_probe_lab_report_writes_a_replayable_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real host: kernel, cmdline, module parameters, QEMU properties, KVM VM types."""
    out = tmp_path / "lab"
    assert run_cli("--lab-report", str(out)) == 0
    assert "lab report:" in capsys.readouterr().out
    for name in ("report.md", "probe.json", RECORDED, "dmesg", "proc/cmdline", "proc/cpuinfo"):
        assert (out / name).is_file(), name
    assert (out.stat().st_mode & 0o777) == 0o700
    report = (out / "report.md").read_text()
    assert "host kernel: Linux" in report and "sev-snp-guest" in report
    assert run_cli("--replay", str(out)) == 0
    assert "tcg" in capsys.readouterr().out


def test_replay_of_a_directory_that_is_not_a_report_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not a recorded host"):
        run_cli("--replay", str(tmp_path))
