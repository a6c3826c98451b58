"""orchestrator.host.confidential: completing a TDX/SNP/SEV spec from the host, before launch.

The host facts come from where QEMU takes them: `query-sev-capabilities` answers with the
QAPI SevCapability struct {pdh, cert-chain, cpu0-id, cbitpos, reduced-phys-bits}, whose
cbitpos is CPUID 0x8000001F EBX[5:0] and whose reduced-phys-bits is always 1
(target/i386/sev.c sev_get_capabilities). What runs for real here: QEMU 10.0 refusing
`query-sev-capabilities` ("SEV is not enabled in KVM"), this Intel CPU's CPUID leaf
0x8000001F (no SEV), and QEMU 10.0 parsing the generated `sev-guest` object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import CvmlabError, HostError, SpecError
from orchestrator.host.confidential import (
    CPUID_DEVICE,
    CPUID_SEV,
    CPUID_SEV_ES,
    CPUID_SEV_SNP,
    HostCpu,
    SevCapabilities,
    complete_sev_fields,
    cpuid_sev_capabilities,
    parse_cpu_list,
    prepare_confidential,
    query_sev_capabilities,
    quote_service_problem,
    required_tiers,
    resolve_firmware,
    sev_host_problems,
    snp_problems,
    tdx_problems,
)
from orchestrator.host.ovmf import AMDSEV_HASHES_AREA, ovmf_like
from orchestrator.host.probe import HostProbe, probe_host
from orchestrator.qemu.argv import confidential_object
from orchestrator.qemu.introspect import QemuFacts, introspect_qemu
from orchestrator.qemu.rules import validate
from orchestrator.qemu.spec import (
    Firmware,
    KernelBoot,
    MachineSpec,
    QuoteGenerationSocket,
    SevGuest,
    SnpGuest,
    TdxGuest,
    spec_from_json,
    spec_from_params,
    spec_to_json,
)
from orchestrator.units import GiB, MiB

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")

KERNEL = KernelBoot(kernel="/img/vmlinuz", initrd="/img/initrd.img")
# A Milan-like host: C-bit 51, the host's own physical-address reduction 5
# (CPUID 0x8000001F EBX = 51 | 5 << 6), SEV, SEV-ES and SEV-SNP in EAX.
MILAN_EAX = CPUID_SEV | CPUID_SEV_ES | CPUID_SEV_SNP | 1
MILAN_EBX = 51 | 5 << 6
MILAN = SevCapabilities.from_cpuid(MILAN_EAX, MILAN_EBX, "test CPUID")
# What `query-sev-capabilities` returns on such a host (QAPI SevCapability).
QMP_ANSWER = {"pdh": "AAAA", "cert-chain": "BBBB", "cpu0-id": "CCCC", "cbitpos": 51,
              "reduced-phys-bits": 1}  # fmt: skip
QUIET_HOST = HostCpu(present_cpus=64, smt_active=False, phys_bits=52)


@pytest.fixture(autouse=True)
def no_firmware_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CVMLAB_TDX_FIRMWARE", raising=False)
    monkeypatch.delenv("CVMLAB_SNP_FIRMWARE", raising=False)


def child_pids() -> list[str]:
    pids: list[str] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += (task / "children").read_text().split()
    return pids


# Firmware stand-ins: a file written as "ovmf" is an AmdSev build (a real SEV hashes area),
# "tdvf" a generic x86-64 OVMF (TDVF and SEV metadata, hashes area 0/0): the probe and the
# kernel-hashes decision read their tables (orchestrator/host/ovmf.py).
FIRMWARE_IMAGES = {
    "ovmf": ovmf_like(hashes_area=AMDSEV_HASHES_AREA),
    "tdvf": ovmf_like(),
}


def fake_root(tmp_path: Path, files: dict[str, str] | None = None) -> Path:
    root = tmp_path / "root"
    for path, text in (files or {}).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(".fd") and text in FIRMWARE_IMAGES:
            target.write_bytes(FIRMWARE_IMAGES[text])
        else:
            target.write_text(text)
    root.mkdir(exist_ok=True)
    return root


def spec(cgs: Any, **changes: Any) -> MachineSpec:
    return dataclasses.replace(
        MachineSpec(boot=KERNEL, accel="kvm", cpu="host", confidential=cgs), **changes
    )


# --- SEV capabilities: QMP answer and CPUID -------------------------------------------------


def test_capabilities_from_query_sev_capabilities_answer() -> None:
    caps = SevCapabilities.from_qmp(QMP_ANSWER, "qmp")
    assert (caps.cbitpos, caps.reduced_phys_bits) == (51, 1)


def test_capabilities_from_cpuid_take_ebx_5_0_and_qemus_reduction_of_one() -> None:
    assert (MILAN.cbitpos, MILAN.reduced_phys_bits) == (51, 1)
    assert MILAN.host_phys_reduction == 5
    assert MILAN.sev_snp is True


def test_cpuid_without_the_sev_bit_is_a_host_error() -> None:
    with pytest.raises(HostError, match="reports no SEV"):
        SevCapabilities.from_cpuid(0, MILAN_EBX, "test CPUID")


def test_this_hosts_cpuid_reports_no_sev() -> None:
    """Real: /dev/cpu/0/cpuid of this (Intel, no SEV) host."""
    if not os.access(CPUID_DEVICE, os.R_OK):
        pytest.skip(f"{CPUID_DEVICE} is not readable (modprobe cpuid, run as root)")
    try:
        caps = cpuid_sev_capabilities()
    except HostError as error:
        assert "no SEV" in error.problem or "no CPUID leaf" in error.problem
    else:
        pytest.skip(f"this host has SEV (C-bit {caps.cbitpos}): nothing to refuse")


@needs_qemu
def test_qemu_10_refuses_query_sev_capabilities_here_and_leaves_nothing_running() -> None:
    """Real QEMU 10.0 with -accel kvm: kvm_pvm has no SEV ("SEV is not enabled in KVM")."""
    assert QEMU is not None
    before = set(child_pids())
    with pytest.raises(HostError) as caught:
        query_sev_capabilities([QEMU])
    assert "query-sev-capabilities" in caught.value.problem
    assert any(
        reason in caught.value.problem
        for reason in ("SEV is not enabled in KVM", "KVM not enabled", "did not answer")
    ), caught.value.problem
    assert caught.value.fix
    assert set(child_pids()) <= before


# --- completing cbitpos and reduced-phys-bits ------------------------------------------------


def test_missing_cbitpos_and_reduced_phys_bits_come_from_the_host() -> None:
    done = complete_sev_fields(SnpGuest(), MILAN)
    assert (done.cbitpos, done.reduced_phys_bits) == (51, 1)


def test_explicit_values_equal_to_the_hosts_are_kept() -> None:
    done = complete_sev_fields(SnpGuest(cbitpos=51, reduced_phys_bits=1), MILAN)
    assert (done.cbitpos, done.reduced_phys_bits) == (51, 1)


def test_cbitpos_that_differs_from_the_host_names_both_values() -> None:
    with pytest.raises(SpecError) as caught:
        complete_sev_fields(SnpGuest(cbitpos=47), MILAN)
    assert "cbitpos=47" in caught.value.problem and "C-bit is 51" in caught.value.problem
    assert "cbitpos=51" in caught.value.fix


def test_reduced_phys_bits_given_is_kept_because_qemus_1_is_not_a_host_fact() -> None:
    """target/i386/sev.c sev_get_capabilities always answers reduced-phys-bits 1 (a QEMU
    constant), and QEMU accepts 1..63: a given value is not refused as "not the host's"."""
    done = complete_sev_fields(SevGuest(reduced_phys_bits=5), MILAN)
    assert (done.cbitpos, done.reduced_phys_bits) == (51, 5)


# --- firmware --------------------------------------------------------------------------------


def test_tdvf_found_in_a_usual_place_is_loaded_with_bios(tmp_path: Path) -> None:
    root = fake_root(tmp_path, {"/usr/share/ovmf/OVMF.inteltdx.fd": "tdvf"})
    done = resolve_firmware(spec(TdxGuest()), None, root)
    assert done.boot.firmware == Firmware(path="/usr/share/ovmf/OVMF.inteltdx.fd")


def test_firmware_the_probe_found_is_used(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        {"/usr/share/edk2/ovmf/OVMF.amdsev.fd": "ovmf", "/sys/module/kvm_amd/parameters/sev": "Y"},
    )
    probe = probe_host(root=root, qemu_facts=None)
    done = resolve_firmware(spec(SnpGuest()), probe, root)
    assert done.boot.firmware is not None
    assert done.boot.firmware.path == "/usr/share/edk2/ovmf/OVMF.amdsev.fd"


def test_missing_firmware_says_where_it_looked_and_how_to_name_it(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        resolve_firmware(spec(TdxGuest()), None, fake_root(tmp_path))
    assert "/usr/share/ovmf/OVMF.inteltdx.fd" in caught.value.problem
    assert "firmware=PATH" in caught.value.fix and "CVMLAB_TDX_FIRMWARE" in caught.value.fix


def test_firmware_named_in_the_environment_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CVMLAB_SNP_FIRMWARE", "/lab/fw/OVMF-snp.fd")
    with pytest.raises(SpecError) as caught:
        resolve_firmware(spec(SnpGuest()), None, fake_root(tmp_path))
    assert "/lab/fw/OVMF-snp.fd" in caught.value.problem
    assert "CVMLAB_SNP_FIRMWARE" in caught.value.problem


def test_given_firmware_must_exist(tmp_path: Path) -> None:
    given = spec(TdxGuest(), boot=KernelBoot(kernel="/k", firmware=Firmware(path="/no/tdvf.fd")))
    with pytest.raises(SpecError, match=re.escape("/no/tdvf.fd")):
        resolve_firmware(given, None, fake_root(tmp_path))


def test_a_split_pflash_descriptor_is_refused(tmp_path: Path) -> None:
    descriptor = {
        "features": ["intel-tdx"],
        "mapping": {"device": "flash", "executable": {"filename": "/fw/OVMF_CODE.tdx.fd"}},
        "targets": [{"architecture": "x86_64"}],
    }
    root = fake_root(
        tmp_path,
        {"/usr/share/qemu/firmware/60-tdx.json": json.dumps(descriptor),
         "/fw/OVMF_CODE.tdx.fd": "code"},
    )  # fmt: skip
    with pytest.raises(SpecError, match="-bios"):
        resolve_firmware(spec(TdxGuest()), None, root)


# --- host checks -----------------------------------------------------------------------------


def test_cpu_lists_are_counted() -> None:
    assert parse_cpu_list("0-63") == 64
    assert parse_cpu_list("0,2-3,8") == 4
    assert parse_cpu_list("") == 0


def test_host_cpu_reads_present_cpus_and_smt_from_sysfs(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        {"/sys/devices/system/cpu/present": "0-127\n", "/sys/devices/system/cpu/smt/active": "1"},
    )
    host = HostCpu.read(root, cpuid_device=str(tmp_path / "no-cpuid"))
    assert host == HostCpu(present_cpus=128, smt_active=True, phys_bits=None)


def test_linux_td_without_sept_ve_disable_is_refused() -> None:
    problems = tdx_problems(spec(TdxGuest(sept_ve_disable=False)), TdxGuest(sept_ve_disable=False),
                            QUIET_HOST)  # fmt: skip
    assert any("SEPT_VE_DISABLE" in p for p in problems)


def test_td_attributes_without_bit_28_are_refused_for_linux() -> None:
    tdx = TdxGuest(attributes=0x40000000)
    assert any("bit 28" in p for p in tdx_problems(spec(tdx), tdx, QUIET_HOST))


def test_td_attributes_without_bit_28_are_allowed_for_another_guest() -> None:
    tdx = TdxGuest(attributes=0x40000000)
    assert tdx_problems(spec(tdx), tdx, QUIET_HOST, linux_guest=False) == []


def test_td_with_more_vcpus_than_host_cpus_is_refused() -> None:
    tdx = TdxGuest()
    problems = tdx_problems(spec(tdx, smp=65), tdx, QUIET_HOST)
    assert any("smp=65" in p and "64" in p for p in problems)


def test_td_phys_bits_must_equal_the_hosts() -> None:
    tdx = TdxGuest()
    problems = tdx_problems(spec(tdx, cpu="host,phys-bits=46"), tdx, QUIET_HOST)
    assert any("phys-bits=46" in p and "52" in p for p in problems)


def test_td_quote_socket_that_does_not_exist_is_a_host_error(tmp_path: Path) -> None:
    """A stopped QGS is the host's missing capability (HostError -> CANCEL), not a FAIL."""
    tdx = TdxGuest(quote_generation_socket=QuoteGenerationSocket(type="unix", path="/run/qgs.sock"))
    root = fake_root(tmp_path, {"/usr/share/ovmf/OVMF.inteltdx.fd": "tdvf"})
    problem = quote_service_problem(tdx.quote_generation_socket, root)
    assert problem is not None and "/run/qgs.sock" in problem
    with pytest.raises(HostError, match="quote generation") as caught:
        prepare_confidential(spec(tdx), None, root=root, host=QUIET_HOST)
    assert "qgsd" in caught.value.fix


def test_snp_policy_without_smt_on_an_smt_host_is_refused() -> None:
    smt_host = dataclasses.replace(QUIET_HOST, smt_active=True)
    assert snp_problems(SnpGuest(policy=0x20000), smt_host)
    assert snp_problems(SnpGuest(policy=0x30000), smt_host) == []
    assert snp_problems(SnpGuest(policy=0x20000), QUIET_HOST) == []


def sev_probe(tmp_path: Path, **params: str) -> HostProbe:
    files = {f"/sys/module/kvm_amd/parameters/{k}": v for k, v in params.items()}
    return probe_host(root=fake_root(tmp_path, files), qemu_facts=None)


def test_sev_es_needs_kvm_amd_sev_es(tmp_path: Path) -> None:
    probe = sev_probe(tmp_path, sev="Y", sev_es="N")
    problems = sev_host_problems(SevGuest(policy=0x5), probe, 512 * MiB, memlock=-1)
    assert any("kvm_amd.sev_es is N" in p for p in problems)


def test_sev_guest_ram_above_the_memlock_limit_is_refused(tmp_path: Path) -> None:
    probe = sev_probe(tmp_path, sev="Y")
    problems = sev_host_problems(SevGuest(), probe, 2 * GiB, memlock=64 * MiB)
    assert any("RLIMIT_MEMLOCK" in p for p in problems)


def test_required_tiers_follow_the_guest_type() -> None:
    assert required_tiers(spec(TdxGuest())) == ("tdx", "kvm")
    assert required_tiers(spec(SnpGuest())) == ("snp", "kvm")
    assert required_tiers(spec(SevGuest())) == ("kvm",)
    assert required_tiers(MachineSpec(boot=KERNEL)) == ("tcg",)


# --- the hook, end to end ---------------------------------------------------------------------


def test_prepare_completes_an_snp_spec_that_then_passes_every_rule(tmp_path: Path) -> None:
    root = fake_root(tmp_path, {"/usr/share/ovmf/OVMF.amdsev.fd": "ovmf"})
    done = prepare_confidential(spec(SnpGuest()), None, MILAN, root=root, host=QUIET_HOST)
    assert isinstance(done.confidential, SnpGuest)
    assert (done.confidential.cbitpos, done.confidential.reduced_phys_bits) == (51, 1)
    assert done.boot.firmware == Firmware(path="/usr/share/ovmf/OVMF.amdsev.fd")
    validate(done)


def test_prepare_leaves_a_plain_spec_alone() -> None:
    plain = MachineSpec(boot=KERNEL)
    assert prepare_confidential(plain, None) is plain


def test_prepare_keeps_explicit_values_when_the_host_cannot_be_read(tmp_path: Path) -> None:
    """Real: neither QMP (no probe) nor this host's CPUID can say; both values given."""
    root = fake_root(tmp_path, {"/usr/share/ovmf/OVMF.amdsev.fd": "ovmf"})
    given = spec(SnpGuest(cbitpos=47, reduced_phys_bits=1))
    done = prepare_confidential(given, None, root=root, host=QUIET_HOST)
    # kernel_hashes comes from the AmdSev firmware's table; the values given are kept.
    assert done.confidential == dataclasses.replace(given.confidential, kernel_hashes=True)


def test_prepare_without_values_on_a_host_without_sev_is_a_host_error(tmp_path: Path) -> None:
    """Real: this host's CPUID has no SEV, so nothing can fill cbitpos."""
    if not os.access(CPUID_DEVICE, os.R_OK):
        pytest.skip(f"{CPUID_DEVICE} is not readable")
    root = fake_root(tmp_path, {"/usr/share/ovmf/OVMF.amdsev.fd": "ovmf"})
    with contextlib.suppress(CvmlabError):
        if cpuid_sev_capabilities().sev:
            pytest.skip("this host has SEV")
    with pytest.raises(HostError, match="C-bit position"):
        prepare_confidential(spec(SnpGuest()), None, root=root, host=QUIET_HOST)


def test_prepare_refuses_snp_on_a_cpu_without_snp(tmp_path: Path) -> None:
    root = fake_root(tmp_path, {"/usr/share/ovmf/OVMF.amdsev.fd": "ovmf"})
    rome = SevCapabilities.from_cpuid(CPUID_SEV | CPUID_SEV_ES, 47, "test CPUID")
    with pytest.raises(HostError, match="no SEV-SNP"):
        prepare_confidential(spec(SnpGuest()), None, rome, root=root, host=QUIET_HOST)


# --- legacy SEV in the spec, the rules and real QEMU 10.0 ----------------------------------------


def test_confidential_sev_defaults_to_legacy_vm_type_off() -> None:
    made = spec_from_params({"kernel": "/k", "confidential": "sev", "accel": "kvm"})
    assert made.confidential == SevGuest(policy=0x1, legacy_vm_type="off")
    assert spec_from_json(spec_to_json(made)) == made


def test_sev_es_policy_and_legacy_vm_type_from_parameters() -> None:
    made = spec_from_params({"kernel": "/k", "confidential": "sev", "sev_policy": "0x5",
                             "legacy_vm_type": "auto"})  # fmt: skip
    assert isinstance(made.confidential, SevGuest)
    assert made.confidential.es and made.confidential.legacy_vm_type == "auto"


def test_sev_keys_without_confidential_sev_say_what_they_need() -> None:
    with pytest.raises(SpecError, match="confidential=sev"):
        spec_from_params({"kernel": "/k", "legacy_vm_type": "off"})


def test_sev_es_on_its_own_vm_type_cannot_use_pflash() -> None:
    pflash = KernelBoot(kernel="/k", firmware=Firmware(path="/fw/OVMF_CODE.fd", interface="pflash"))
    es = spec(SevGuest(cbitpos=51, reduced_phys_bits=1, policy=0x5), boot=pflash)
    with pytest.raises(SpecError, match="confidential-pflash"):
        validate(es)
    validate(dataclasses.replace(es, confidential=SevGuest(cbitpos=51, reduced_phys_bits=1)))


@pytest.fixture(scope="module")
def qemu_10() -> QemuFacts:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return introspect_qemu(QEMU)


SEV_FULL = SevGuest(cbitpos=51, reduced_phys_bits=1, policy=0x5, legacy_vm_type="off",
                    kernel_hashes=True)  # fmt: skip


def test_every_sev_guest_property_cvmlab_writes_is_in_qemu_10(qemu_10: QemuFacts) -> None:
    body = json.loads(confidential_object(SEV_FULL))
    assert body.pop("qom-type") == "sev-guest"
    body.pop("id")
    props = qemu_10.properties["sev-guest"]
    assert set(body) <= set(props), sorted(set(body) - set(props))
    assert props["legacy-vm-type"] == "OnOffAuto"
    assert body["legacy-vm-type"] == "off"


def test_qemu_10_parses_the_generated_sev_guest_object(qemu_10: QemuFacts) -> None:
    """QEMU's own QAPI parser reads the object (object-add) and reports legacy-vm-type back."""
    body = json.loads(confidential_object(SEV_FULL))
    lines = [
        {"execute": "qmp_capabilities"},
        {"execute": "object-add", "arguments": body},
        {
            "execute": "qom-get",
            "arguments": {"path": "/objects/cgs0", "property": "legacy-vm-type"},
        },
        {"execute": "qom-get", "arguments": {"path": "/objects/cgs0", "property": "policy"}},
        {"execute": "quit"},
    ]
    result = subprocess.run(
        [*qemu_10.command, "-machine", "none", "-nodefaults", "-display", "none",
         "-no-user-config", "-qmp", "stdio"],
        input="".join(json.dumps(line) + "\n" for line in lines),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    replies = [
        m for m in map(json.loads, result.stdout.splitlines()) if "return" in m or "error" in m
    ]
    assert replies[1] == {"return": {}}, replies[1]
    assert replies[2] == {"return": "off"}
    assert replies[3] == {"return": 0x5}
