"""orchestrator.guest.coco: the guest's own account of its confidential platform.

Kernel lines as arch/x86/mm/mem_encrypt.c print_mem_encrypt_feature_info() prints them
("Memory Encryption Features active: Intel TDX"; for AMD the active features in order,
"AMD " before them on older kernels). The detection script itself runs for real on a
plain guest in scenarios/confidentiality.py's control.
"""

from __future__ import annotations

from orchestrator.guest.coco import (
    features_line,
    parse_coco_report,
    platform_from_features,
)

NONCE = b"N" * 64


def test_tdx_kernel_line_is_tdx() -> None:
    line = "[    0.000000] Memory Encryption Features active: Intel TDX\n"
    assert platform_from_features(features_line(line)) == "tdx"


def test_snp_kernel_lines_old_and_new_are_snp() -> None:
    for line in (
        "Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP",
        "Memory Encryption Features active: SEV SEV-ES SEV-SNP",
    ):
        assert platform_from_features(features_line(line)) == "sev-snp"


def test_sev_es_and_sev_are_told_apart() -> None:
    assert platform_from_features("AMD SEV SEV-ES") == "sev-es"
    assert platform_from_features("AMD SEV") == "sev"


def test_a_plain_guest_is_none() -> None:
    assert features_line("[    0.1] Linux version 6.12\n") == ""
    assert platform_from_features("") == "none"


SNP_OUTPUT = """@features AMD SEV SEV-ES SEV-SNP
@flags fpu vme sev sev_es sev_snp hypervisor
@device /dev/sev-guest
@provider sev_guest
@outblob {report}
@generation 1
"""


def test_snp_report_that_carries_the_nonce() -> None:
    report = b"\0" * 0x50 + NONCE + b"\0" * 1000  # REPORT_DATA at 0x50
    coco = parse_coco_report(SNP_OUTPUT.format(report=report.hex()), NONCE)
    assert coco.platform == "sev-snp"
    assert coco.missing_flags("sev-snp") == []
    assert coco.devices == ("/dev/sev-guest",)
    assert coco.tsm_provider == "sev_guest"
    assert coco.report_has_nonce


def test_a_report_without_the_nonce_does_not_count() -> None:
    coco = parse_coco_report(SNP_OUTPUT.format(report=("00" * 1184)), NONCE)
    assert coco.report is not None and not coco.report_has_nonce


def test_missing_cpuinfo_flags_are_named() -> None:
    coco = parse_coco_report("@features Intel TDX\n@flags fpu vme\n", NONCE)
    assert coco.platform == "tdx"
    assert coco.missing_flags("tdx") == ["tdx_guest"]


def test_errors_of_the_script_are_kept() -> None:
    coco = parse_coco_report(
        "@features \n@flags fpu\n@error mkdir /sys/kernel/config/tsm/report/cvmlab-9\n", NONCE
    )
    assert coco.platform == "none" and coco.report is None
    assert coco.errors == ("mkdir /sys/kernel/config/tsm/report/cvmlab-9",)
