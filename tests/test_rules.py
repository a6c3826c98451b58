"""rules.validate: every rule refuses its case by name; valid TDX/SNP specs pass; a spec is
checked against what the target QEMU (real 10.0 introspection, or documented 11.1) has."""

from __future__ import annotations

import base64
import dataclasses
import shutil
from typing import Any

import pytest

from orchestrator.errors import QemuError, SpecError
from orchestrator.qemu.introspect import QemuFacts, introspect_qemu
from orchestrator.qemu.rules import SPEC_RULES, validate, violations
from orchestrator.qemu.spec import (
    Balloon,
    Firmware,
    KernelBoot,
    MachineSpec,
    MemfdBackend,
    QuoteGenerationSocket,
    SevGuest,
    SnpGuest,
    TdxGuest,
    VirtioMem,
)
from orchestrator.qemu.version import QemuVersion
from orchestrator.units import GiB, KiB, MiB

MHz = 1_000_000


def b64(nbytes: int) -> str:
    return base64.b64encode(b"\x5a" * nbytes).decode()


KERNEL = KernelBoot(kernel="/img/vmlinuz", initrd="/img/initrd.img", cmdline="console=ttyS0")
TDVF = KernelBoot(kernel="/img/vmlinuz", firmware=Firmware(path="/fw/OVMF.inteltdx.fd"))
SNP_OVMF = KernelBoot(kernel="/img/vmlinuz", firmware=Firmware(path="/fw/OVMF.amdsev.fd"))

PLAIN = MachineSpec(boot=KERNEL)
VALID_TDX = MachineSpec(
    boot=TDVF,
    accel="kvm",
    cpu="host",
    tsc_frequency=2_500 * MHz,
    confidential=TdxGuest(
        attributes=0x10000000,
        sept_ve_disable=True,
        mrconfigid=b64(48),
        mrowner=b64(48),
        mrownerconfig=b64(48),
        quote_generation_socket=QuoteGenerationSocket(type="vsock", cid=2, port=4050),
    ),
)
VALID_SNP = MachineSpec(
    boot=SNP_OVMF,
    accel="kvm",
    cpu="EPYC-v4",
    backend=MemfdBackend(),
    confidential=SnpGuest(
        cbitpos=51,
        reduced_phys_bits=1,
        policy=0x30000,
        id_block=b64(96),
        id_auth=b64(4096),
        host_data=b64(32),
        guest_visible_workarounds=b64(16),
    ),
)


def tdx(**changes: Any) -> MachineSpec:
    assert isinstance(VALID_TDX.confidential, TdxGuest)
    return dataclasses.replace(
        VALID_TDX, confidential=dataclasses.replace(VALID_TDX.confidential, **changes)
    )


def snp(**changes: Any) -> MachineSpec:
    assert isinstance(VALID_SNP.confidential, SnpGuest)
    return dataclasses.replace(
        VALID_SNP, confidential=dataclasses.replace(VALID_SNP.confidential, **changes)
    )


def plain(**changes: Any) -> MachineSpec:
    return dataclasses.replace(PLAIN, **changes)


# (rule id, a spec that breaks it, a word the message must contain)
REFUSALS: list[tuple[str, MachineSpec, str]] = [
    ("smp-min", plain(smp=0), "vCPU"),
    ("memory-min", plain(memory=76 * MiB), "128M"),
    ("memory-min", plain(memory=512), "512 bytes"),
    (
        "hugetlbsize-needs-hugetlb",
        plain(backend=MemfdBackend(hugetlb=False, hugetlbsize=2 * MiB)),
        "hugetlb=on",
    ),
    (
        "hugetlb-alignment",
        plain(memory=129 * MiB, backend=MemfdBackend(hugetlb=True, hugetlbsize=2 * MiB)),
        "multiple",
    ),
    (
        "hugetlb-alignment",
        plain(memory=512 * MiB, backend=MemfdBackend(hugetlb=True, hugetlbsize=1 * GiB)),
        "1G",
    ),
    ("virtio-mem-block-size", plain(virtio_mem=VirtioMem(1 * GiB, block_size=4 * KiB)), "1M"),
    ("virtio-mem-block-size", plain(virtio_mem=VirtioMem(1 * GiB, block_size=3 * MiB)), "power"),
    (
        "virtio-mem-block-size",
        plain(
            virtio_mem=VirtioMem(
                2 * GiB,
                block_size=2 * MiB,
                backend=MemfdBackend(hugetlb=True, hugetlbsize=1 * GiB),
            )
        ),
        "huge page",
    ),
    ("virtio-mem-alignment", plain(virtio_mem=VirtioMem(1025 * MiB)), "default block size 2M"),
    (
        "virtio-mem-alignment",
        plain(virtio_mem=VirtioMem(1 * GiB, requested_size=3 * MiB)),
        "requested-size",
    ),
    (
        "virtio-mem-requested",
        plain(virtio_mem=VirtioMem(1 * GiB, requested_size=2 * GiB)),
        "exceeds",
    ),
    (
        "virtio-mem-confidential",
        dataclasses.replace(VALID_SNP, virtio_mem=VirtioMem(1 * GiB)),
        "RamDiscardManager",
    ),
    ("confidential-accel", dataclasses.replace(VALID_TDX, accel="tcg"), "accel=kvm"),
    ("confidential-accel", dataclasses.replace(VALID_SNP, accel="tcg"), "accel=kvm"),
    (
        "confidential-pflash",
        dataclasses.replace(
            VALID_TDX, boot=KernelBoot(kernel="/k", firmware=Firmware("/fw/c.fd", "pflash"))
        ),
        "read-only memslots",
    ),
    (
        "confidential-pflash",
        dataclasses.replace(
            VALID_SNP, boot=KernelBoot(kernel="/k", firmware=Firmware("/fw/c.fd", "pflash"))
        ),
        "firmware_interface=bios",
    ),
    ("confidential-firmware", dataclasses.replace(VALID_TDX, boot=KERNEL), "TDVF"),
    ("confidential-firmware", dataclasses.replace(VALID_SNP, boot=KERNEL), "OVMF"),
    ("tdx-cpu-model", dataclasses.replace(VALID_TDX, cpu="Skylake-Server"), "Named cpu model"),
    ("tdx-tsc-frequency", dataclasses.replace(VALID_TDX, tsc_frequency=2_510 * MHz), "25 MHz"),
    ("tdx-tsc-frequency", dataclasses.replace(VALID_TDX, tsc_frequency=50 * MHz), "100 MHz"),
    ("tdx-tsc-frequency", dataclasses.replace(VALID_TDX, tsc_frequency=10_025 * MHz), "10 GHz"),
    ("tdx-attributes", tdx(attributes=0x10000001, sept_ve_disable=None), "0x1 outside"),
    ("tdx-attributes", tdx(attributes=1 << 29, sept_ve_disable=None), "unsupported TD attribute"),
    ("tdx-sept-ve-conflict", tdx(attributes=0, sept_ve_disable=True), "bit 28"),
    ("tdx-digest", tdx(mrowner=b64(32)), "mrowner decodes to 32 bytes, not 48"),
    ("tdx-digest", tdx(mrconfigid="not base64!"), "mrconfigid is not base64"),
    (
        "tdx-quote-socket",
        tdx(quote_generation_socket=QuoteGenerationSocket(type="vsock", cid=2)),
        "cid and port",
    ),
    (
        "tdx-quote-socket",
        tdx(quote_generation_socket=QuoteGenerationSocket(type="unix")),
        "needs a path",
    ),
    (
        "tdx-quote-socket",
        tdx(quote_generation_socket=QuoteGenerationSocket(type="vsock", cid=2, port=1, path="/s")),
        "no path",
    ),
    ("tdx-machine-options", dataclasses.replace(VALID_TDX, machine="q35,smm=on"), "SMM"),
    (
        "tdx-machine-options",
        dataclasses.replace(VALID_TDX, machine="q35,kernel_irqchip=on"),
        "split",
    ),
    ("snp-reduced-phys-bits", snp(reduced_phys_bits=None), "required"),
    ("snp-reduced-phys-bits", snp(reduced_phys_bits=64), "1..63"),
    ("snp-cbitpos", snp(cbitpos=None), "query-sev-capabilities"),
    ("snp-policy", snp(policy=0x10000), "bit 17"),
    ("snp-blob-size", snp(id_block=b64(95)), "id-block decodes to 95 bytes, not 96"),
    ("snp-blob-size", snp(id_auth=b64(4095)), "id-auth decodes to 4095 bytes"),
    ("snp-blob-size", snp(host_data="**"), "host-data is not base64"),
    ("snp-blob-size", snp(guest_visible_workarounds=b64(8)), "guest-visible-workarounds"),
    ("snp-policy-bits", snp(policy=0x30000 | 1 << 18), "MIGRATE_MA"),
    ("snp-policy-bits", snp(policy=0x30000 | 1 << 40), "beyond bit 20"),
    (
        "sev-policy",
        dataclasses.replace(
            VALID_SNP, confidential=SevGuest(cbitpos=51, reduced_phys_bits=1, policy=1 << 32)
        ),
        "uint32",
    ),
]


@pytest.mark.parametrize(
    ("rule_id", "spec", "needle"),
    REFUSALS,
    ids=[f"{rule}-{i}" for i, (rule, _spec, _needle) in enumerate(REFUSALS)],
)
def test_rule_refuses_with_its_name_and_reason(
    rule_id: str, spec: MachineSpec, needle: str
) -> None:
    with pytest.raises(SpecError) as caught:
        validate(spec)
    assert f"rule {rule_id}:" in str(caught.value)
    assert needle in str(caught.value)
    assert caught.value.fix, "every refusal says what to do"


def test_every_spec_rule_has_a_refusal_case() -> None:
    assert {rule.id for rule in SPEC_RULES} == {rule_id for rule_id, _s, _n in REFUSALS}


def test_rule_ids_are_unique() -> None:
    ids = [rule.id for rule in SPEC_RULES]
    assert len(ids) == len(set(ids))


def test_valid_plain_tdx_and_snp_specs_are_accepted() -> None:
    validate(PLAIN)
    validate(VALID_TDX)
    validate(VALID_SNP)


def test_tdx_accepts_cpu_max_and_host_with_options() -> None:
    validate(dataclasses.replace(VALID_TDX, cpu="max"))
    validate(dataclasses.replace(VALID_TDX, cpu="host,+pks,pmu=on"))


def test_tdx_accepts_pks_and_perfmon_attribute_bits() -> None:
    validate(tdx(attributes=(1 << 28) | (1 << 30) | (1 << 63)))


def test_virtio_mem_alignment_follows_a_given_block_size() -> None:
    validate(plain(virtio_mem=VirtioMem(1 * GiB, requested_size=1 * MiB, block_size=1 * MiB)))


def test_every_broken_rule_is_listed_in_the_detail() -> None:
    with pytest.raises(SpecError) as caught:
        validate(plain(smp=0, memory=32 * MiB))
    assert "rule smp-min:" in str(caught.value)
    assert "rule memory-min:" in caught.value.detail
    assert [v.rule.id for v in violations(plain(smp=0, memory=32 * MiB))] == [
        "smp-min",
        "memory-min",
    ]


# --- against a target QEMU ------------------------------------------------------------------


@pytest.fixture(scope="module")
def qemu_10() -> QemuFacts:
    """The installed QEMU (10.0.2 on the development and CI machines), introspected for real."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return introspect_qemu(use_cache=False)


@pytest.fixture
def qemu_11_1(qemu_10: QemuFacts) -> QemuFacts:
    """Documented facts: the installed QEMU's answers plus QEMU 11.1.3's tdx-guest
    (ENVIRONMENT.md). Not introspected: no QEMU >= 10.1 is installed here."""
    tdx_props = dict.fromkeys(
        ("type", "quote-generation-socket", "mrowner", "mrconfigid", "mrownerconfig"), "string"
    )
    tdx_props.update({"sept-ve-disable": "bool", "attributes": "uint64"})
    return dataclasses.replace(
        qemu_10,
        version=QemuVersion(11, 1, 3),
        types=qemu_10.types | {"tdx-guest"},
        properties={**qemu_10.properties, "tdx-guest": tdx_props},
    )


def test_tdx_on_the_installed_qemu_names_its_version_and_10_1(qemu_10: QemuFacts) -> None:
    if qemu_10.has_type("tdx-guest"):
        pytest.skip(f"{qemu_10.describe()} has tdx-guest")
    with pytest.raises(QemuError) as caught:
        validate(VALID_TDX, qemu_10)
    message = str(caught.value)
    assert "rule qemu-object:" in message and "tdx-guest" in message
    assert str(qemu_10.version) in message  # "10.0.2" here
    assert "10.1" in message


def test_tdx_on_documented_qemu_11_1_is_accepted(qemu_11_1: QemuFacts) -> None:
    validate(VALID_TDX, qemu_11_1)


def test_snp_and_every_device_on_the_installed_qemu_are_accepted(qemu_10: QemuFacts) -> None:
    validate(VALID_SNP, qemu_10)
    validate(
        plain(
            backend=MemfdBackend(hugetlb=True, hugetlbsize=2 * MiB, seal=False),
            balloon=Balloon(free_page_reporting=True, deflate_on_oom=True),
            virtio_mem=VirtioMem(1 * GiB, 128 * MiB, 2 * MiB),
        ),
        qemu_10,
    )


def test_virtio_mem_with_snp_is_left_to_qemu_before_10_1(qemu_10: QemuFacts) -> None:
    if qemu_10.version >= QemuVersion(10, 1):
        pytest.skip("the installed QEMU already refuses it")
    validate(dataclasses.replace(VALID_SNP, virtio_mem=VirtioMem(1 * GiB)), qemu_10)


def test_virtio_mem_with_tdx_is_refused_on_qemu_11_1(qemu_11_1: QemuFacts) -> None:
    with pytest.raises(SpecError, match=r"rule virtio-mem-confidential:.*11\.1\.3"):
        validate(dataclasses.replace(VALID_TDX, virtio_mem=VirtioMem(1 * GiB)), qemu_11_1)


def test_missing_property_of_an_older_qemu_names_the_version_that_has_it(
    qemu_10: QemuFacts,
) -> None:
    older_snp = {
        k: v for k, v in qemu_10.properties["sev-snp-guest"].items() if k != "vcek-disabled"
    }
    qemu_9_0 = dataclasses.replace(
        qemu_10,
        version=QemuVersion(9, 0, 0),
        properties={**qemu_10.properties, "sev-snp-guest": older_snp},
    )
    with pytest.raises(QemuError) as caught:
        validate(snp(vcek_disabled=True), qemu_9_0)
    assert "rule qemu-property:" in str(caught.value)
    assert "vcek-disabled" in str(caught.value)
    assert "9.0.0" in str(caught.value) and "9.1" in str(caught.value)


def test_missing_property_of_a_current_qemu_says_it_was_built_without_it(
    qemu_10: QemuFacts,
) -> None:
    memfd = {k: v for k, v in qemu_10.properties["memory-backend-memfd"].items() if k != "seal"}
    stripped = dataclasses.replace(
        qemu_10, properties={**qemu_10.properties, "memory-backend-memfd": memfd}
    )
    with pytest.raises(QemuError, match=r"rule qemu-property:.*seal.*built without"):
        validate(plain(backend=MemfdBackend()), stripped)


def test_accelerator_missing_from_qemu_is_a_qemu_error(qemu_10: QemuFacts) -> None:
    tcg_only = dataclasses.replace(qemu_10, accelerators=frozenset({"tcg"}))
    with pytest.raises(QemuError, match=r"rule qemu-accel:.*kvm"):
        validate(plain(accel="kvm"), tcg_only)


def test_unknown_machine_type_is_a_qemu_error(qemu_10: QemuFacts) -> None:
    with pytest.raises(QemuError, match=r"rule qemu-machine:.*'no-such-board'"):
        validate(plain(machine="no-such-board"), qemu_10)


def test_spec_rules_come_before_qemu_rules(qemu_10: QemuFacts) -> None:
    with pytest.raises(SpecError, match="rule confidential-accel:"):
        validate(dataclasses.replace(VALID_TDX, accel="tcg"), qemu_10)
