"""The host probe: fake sysfs/proc/dev trees for hosts that cannot exist here (TDX, SNP,
no KVM, kvm_pvm), and the real host (the development and CI machine kind)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import QemuError, SpecError
from orchestrator.host import probe_cli
from orchestrator.host.ovmf import AMDSEV_HASHES_AREA, ovmf_like
from orchestrator.host.probe import (
    OVMF_SEV_METADATA_GUID,
    OVMF_TABLE_FOOTER_GUID,
    TDX_METADATA_OFFSET_GUID,
    _boot_check,
    _wait_for_marker,
    find_firmware,
    ovmf_guids,
    probe_host,
    shared_probe,
)
from orchestrator.kvm.facts import KvmFacts
from orchestrator.qemu.introspect import QemuFacts, introspect_qemu
from orchestrator.qemu.version import QemuVersion

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def child_pids() -> list[str]:
    """Children of every thread of this process (spawn() forks from its own thread)."""
    pids: list[str] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += (task / "children").read_text().split()
    return pids



@pytest.fixture(autouse=True)
def no_firmware_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lab's CVMLAB_*_FIRMWARE must not leak into the fake hosts."""
    monkeypatch.delenv("CVMLAB_TDX_FIRMWARE", raising=False)
    monkeypatch.delenv("CVMLAB_SNP_FIRMWARE", raising=False)


# --- fake hosts -------------------------------------------------------------------------------


def fake_host(
    root: Path,
    *,
    modules: dict[str, dict[str, str]] | None = None,
    dev: tuple[str, ...] = (),
    flags: str = "fpu sse2",
    files: dict[str, bytes] | None = None,
) -> Path:
    """A directory that looks like a host to the probe: /sys/module, /proc, /dev, files."""
    for module, params in (modules or {}).items():
        params_dir = root / "sys/module" / module / "parameters"
        params_dir.mkdir(parents=True)
        for name, value in params.items():
            (params_dir / name).write_text(value + "\n")
    (root / "dev").mkdir(parents=True, exist_ok=True)
    for node in dev:
        (root / "dev" / node).write_text("")
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/osrelease").write_text("6.16.0-lab\n")
    (root / "proc/cpuinfo").write_text(
        f"processor\t: 0\nmodel name\t: Lab CPU 9000\nflags\t\t: {flags}\n\n"
        f"processor\t: 1\nmodel name\t: Lab CPU 9000\nflags\t\t: {flags}\n"
    )
    for path, data in (files or {}).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def ovmf_image(*guids: uuid.UUID, size: int = 8192) -> bytes:
    """A firmware image with QEMU's OVMF GUID table (entries: data, u16 length, GUID)."""
    table = b""
    for guid in guids:
        data = b"\x01\x02\x03\x04"
        table += data + struct.pack("<H", len(data) + 18) + guid.bytes_le
    table += struct.pack("<H", len(table) + 18) + OVMF_TABLE_FOOTER_GUID.bytes_le
    return b"\xff" * (size - 32 - len(table)) + table + b"\0" * 32


@pytest.fixture(scope="module")
def qemu_10() -> QemuFacts:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return introspect_qemu(use_cache=False)


@pytest.fixture(scope="module")
def qemu_11_1(qemu_10: QemuFacts) -> QemuFacts:
    """Documented facts (ENVIRONMENT.md: QEMU 11.1.3 answers qom-list-properties for
    tdx-guest); no QEMU >= 10.1 is installed here to introspect."""
    tdx = dict.fromkeys(
        (
            "type",
            "quote-generation-socket",
            "mrowner",
            "mrconfigid",
            "sept-ve-disable",
            "attributes",
            "mrownerconfig",
        ),
        "string",
    )
    return dataclasses.replace(
        qemu_10,
        version=QemuVersion(11, 1, 3),
        types=qemu_10.types | {"tdx-guest"},
        properties={**qemu_10.properties, "tdx-guest": tdx},
    )


def tdx_host(root: Path) -> Path:
    return fake_host(
        root,
        modules={"kvm": {}, "kvm_intel": {"tdx": "Y", "nested": "N"}},
        dev=("kvm",),
        flags="fpu vmx tdx_host_platform",
        files={"/usr/share/ovmf/OVMF.inteltdx.fd": ovmf_like()},
    )


def snp_host(root: Path, sev_snp: str = "Y") -> Path:
    return fake_host(
        root,
        modules={"kvm": {}, "kvm_amd": {"sev": "Y", "sev_es": "Y", "sev_snp": sev_snp}},
        dev=("kvm", "sev"),
        flags="fpu svm sev sev_es sev_snp",
        files={"/usr/share/ovmf/OVMF.amdsev.fd": ovmf_like(hashes_area=AMDSEV_HASHES_AREA)},
    )


def lab_kvm(vm_types: int) -> KvmFacts:
    """KVM facts as a lab host records them (research/interfaces.md section 7: an SNP host
    reports KVM_CAP_VM_TYPES 0x1d, a TDX host 0x21); a fake tree's dev/kvm is a plain file."""
    return KvmFacts("/dev/kvm", True, "", 12, {}, vm_types, 0, {})


TDX_KVM = lab_kvm(0x21)
SNP_KVM = lab_kvm(0x1D)


# --- fake TDX host -----------------------------------------------------------------------------


def test_tdx_host_with_qemu_11_1_offers_tdx_and_kvm(tmp_path: Path, qemu_11_1: QemuFacts) -> None:
    probe = probe_host(root=tdx_host(tmp_path), qemu_facts=qemu_11_1, kvm_facts=TDX_KVM)
    assert probe.tiers["tdx"].available, probe.tiers["tdx"].reason
    assert probe.tiers["tdx"].evidence["firmware"] == "/usr/share/ovmf/OVMF.inteltdx.fd"
    assert "11.1.3" in probe.tiers["tdx"].reason
    assert probe.tiers["kvm"].available and "bare metal" in probe.tiers["kvm"].reason
    assert probe.best_accel() == "kvm"
    assert probe.host.module_params["kvm_intel.tdx"] == "Y"
    assert probe.host.kernel_release == "6.16.0-lab"


def test_tdx_host_with_qemu_10_0_says_qemu_is_too_old(tmp_path: Path, qemu_10: QemuFacts) -> None:
    probe = probe_host(root=tdx_host(tmp_path), qemu_facts=qemu_10)
    reason = probe.tiers["tdx"].reason
    assert not probe.tiers["tdx"].available
    assert str(qemu_10.version) in reason and "has no tdx-guest object" in reason
    assert ">= 10.1" in reason


def test_tdx_host_without_tdx_module_parameter(tmp_path: Path, qemu_11_1: QemuFacts) -> None:
    root = tdx_host(tmp_path)
    (root / "sys/module/kvm_intel/parameters/tdx").write_text("N\n")
    probe = probe_host(root=root, qemu_facts=qemu_11_1)
    assert not probe.tiers["tdx"].available
    assert "kvm_intel parameter tdx is N" in probe.tiers["tdx"].reason
    assert "kvm_intel.tdx=1" in probe.tiers["tdx"].reason


def test_tdx_host_is_not_an_snp_host(tmp_path: Path, qemu_11_1: QemuFacts) -> None:
    probe = probe_host(root=tdx_host(tmp_path), qemu_facts=qemu_11_1, kvm_facts=TDX_KVM)
    reason = probe.tiers["snp"].reason
    assert not probe.tiers["snp"].available
    assert "kvm_amd is not loaded" in reason and "/dev/sev does not exist" in reason


def test_nested_tdx_host_is_reported_as_nested(tmp_path: Path, qemu_11_1: QemuFacts) -> None:
    root = tdx_host(tmp_path)
    cpuinfo = root / "proc/cpuinfo"
    cpuinfo.write_text(cpuinfo.read_text().replace("vmx", "vmx hypervisor"))
    probe = probe_host(root=root, qemu_facts=qemu_11_1)
    assert probe.host.nested and "nested" in probe.tiers["kvm"].reason


# --- fake SNP host -----------------------------------------------------------------------------


def test_snp_host_with_qemu_10_0_offers_snp(tmp_path: Path, qemu_10: QemuFacts) -> None:
    probe = probe_host(root=snp_host(tmp_path), qemu_facts=qemu_10, kvm_facts=SNP_KVM)
    assert probe.tiers["snp"].available, probe.tiers["snp"].reason
    assert probe.tiers["snp"].evidence["kvm_amd.sev_snp"] == "Y"
    assert probe.tiers["snp"].evidence["firmware"] == "/usr/share/ovmf/OVMF.amdsev.fd"
    assert not probe.tiers["tdx"].available
    assert "kvm_intel is not loaded" in probe.tiers["tdx"].reason


def test_snp_host_with_sev_snp_off(tmp_path: Path, qemu_10: QemuFacts) -> None:
    probe = probe_host(root=snp_host(tmp_path, sev_snp="N"), qemu_facts=qemu_10)
    assert not probe.tiers["snp"].available
    assert "kvm_amd parameter sev_snp is N, not Y" in probe.tiers["snp"].reason


def test_snp_host_with_a_qemu_older_than_9_1(tmp_path: Path, qemu_10: QemuFacts) -> None:
    old = dataclasses.replace(
        qemu_10, version=QemuVersion(9, 0), types=qemu_10.types - {"sev-snp-guest"}
    )
    probe = probe_host(root=snp_host(tmp_path), qemu_facts=old, kvm_facts=SNP_KVM)
    assert "has no sev-snp-guest object (upstream QEMU >= 9.1" in probe.tiers["snp"].reason


def test_snp_host_without_firmware_says_where_it_looked(tmp_path: Path, qemu_10: QemuFacts) -> None:
    root = snp_host(tmp_path)
    (root / "usr/share/ovmf/OVMF.amdsev.fd").unlink()
    probe = probe_host(root=root, qemu_facts=qemu_10)
    assert not probe.tiers["snp"].available
    assert "no SNP-capable OVMF found" in probe.tiers["snp"].reason
    assert (
        "/usr/share/ovmf/OVMF.amdsev.fd"
        in probe.tiers["snp"].evidence["firmware_search"]["searched"]
    )


# --- no KVM, and kvm_pvm --------------------------------------------------------------------


def test_host_without_kvm_runs_tcg_only(tmp_path: Path, qemu_10: QemuFacts) -> None:
    probe = probe_host(root=fake_host(tmp_path), qemu_facts=qemu_10)
    assert probe.tiers["tcg"].available
    assert not probe.tiers["kvm"].available
    assert "/dev/kvm does not exist" in probe.tiers["kvm"].reason
    assert not probe.tiers["gmem"].available
    assert "does not exist" in probe.tiers["gmem"].reason
    assert probe.best_accel() == "tcg"


def test_kvm_pvm_host_is_present_but_not_usable_for_stock_guests(
    tmp_path: Path, qemu_10: QemuFacts
) -> None:
    root = fake_host(
        tmp_path, modules={"kvm": {}, "kvm_pvm": {"verbose": "0"}}, dev=("kvm",), flags="hypervisor"
    )
    probe = probe_host(root=root, qemu_facts=qemu_10)
    kvm = probe.tiers["kvm"]
    assert not kvm.available
    assert "provided by kvm_pvm" in kvm.reason and "not usable for stock guests" in kvm.reason
    assert kvm.evidence["other_kvm_modules"] == ["kvm_pvm"]
    assert probe.best_accel() == "tcg"


def test_missing_qemu_makes_tcg_unavailable_with_the_fix(tmp_path: Path) -> None:
    probe = probe_host("qemu-system-nowhere", root=fake_host(tmp_path))
    assert probe.qemu is None
    assert not probe.tiers["tcg"].available
    assert "ci/setup-host.sh" in probe.tiers["tcg"].reason
    assert probe.qemu_error is not None


# --- require and JSON -------------------------------------------------------------------------


def test_require_is_none_when_all_tiers_are_there_else_the_reasons(
    tmp_path: Path, qemu_10: QemuFacts
) -> None:
    probe = probe_host(root=snp_host(tmp_path), qemu_facts=qemu_10, kvm_facts=SNP_KVM)
    assert probe.require(["tcg", "snp"]) is None
    reason = probe.require(["snp", "tdx"])
    assert reason is not None
    assert reason.startswith("tier tdx is not available on this host: kvm_intel is not loaded")


def test_require_refuses_an_unknown_tier_name(tmp_path: Path, qemu_10: QemuFacts) -> None:
    probe = probe_host(root=fake_host(tmp_path), qemu_facts=qemu_10)
    with pytest.raises(SpecError, match="unknown tier 'tdx2'"):
        probe.require(["tdx2"])


def test_probe_json_is_serialisable_and_names_every_tier(
    tmp_path: Path, qemu_10: QemuFacts
) -> None:
    data = json.loads(json.dumps(probe_host(root=tdx_host(tmp_path), qemu_facts=qemu_10).to_json()))
    assert list(data["tiers"]) == ["tcg", "kvm", "gmem", "sw-protected", "snp", "tdx", "nested"]
    assert data["qemu"]["version"] == str(qemu_10.version)
    assert data["host"]["cpu_model"] == "Lab CPU 9000"


# --- firmware ------------------------------------------------------------------------------------


def test_ovmf_guid_table_is_parsed() -> None:
    path_guids = {TDX_METADATA_OFFSET_GUID, OVMF_SEV_METADATA_GUID}
    assert ovmf_guids_of(ovmf_image(*path_guids)) == path_guids


def ovmf_guids_of(data: bytes) -> set[uuid.UUID] | None:
    import tempfile

    with tempfile.NamedTemporaryFile() as image:
        image.write(data)
        image.flush()
        return ovmf_guids(Path(image.name))


def test_image_without_a_guid_table_has_none() -> None:
    assert ovmf_guids_of(b"\xff" * 8192) is None


def test_generic_ovmf_is_taken_only_when_its_table_proves_tdx(tmp_path: Path) -> None:
    plain = fake_host(tmp_path / "a", files={"/usr/share/qemu/OVMF.fd": ovmf_image()})
    path, evidence = find_firmware("tdx", plain)
    assert path is None
    assert "no TDX metadata offset" in evidence["rejected"][0]
    tdvf = fake_host(tmp_path / "b", files={"/usr/share/qemu/OVMF.fd": ovmf_like()})
    assert find_firmware("tdx", tdvf)[0] == "/usr/share/qemu/OVMF.fd"


def test_firmware_descriptor_with_the_feature_is_preferred(tmp_path: Path) -> None:
    descriptor = {
        "interface-types": ["uefi"],
        "mapping": {"device": "memory", "filename": "/opt/tdx/TDVF.fd"},
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
        "features": ["intel-tdx", "verbose-dynamic"],
    }
    root = fake_host(
        tmp_path,
        files={
            "/usr/share/qemu/firmware/60-tdvf.json": json.dumps(descriptor).encode(),
            "/opt/tdx/TDVF.fd": b"tdvf",
            "/usr/share/ovmf/OVMF.inteltdx.fd": b"other",
        },
    )
    path, evidence = find_firmware("tdx", root)
    assert path == "/opt/tdx/TDVF.fd"
    assert evidence["source"] == "descriptor /usr/share/qemu/firmware/60-tdvf.json"


def test_firmware_override_that_does_not_exist_is_the_reason(
    tmp_path: Path, qemu_11_1: QemuFacts
) -> None:
    probe = probe_host(
        root=tdx_host(tmp_path), qemu_facts=qemu_11_1, tdx_firmware=Path("/lab/TDVF.fd")
    )
    assert not probe.tiers["tdx"].available
    assert "TDVF /lab/TDVF.fd (given) does not exist" in probe.tiers["tdx"].reason


def test_firmware_from_the_environment_is_used(
    tmp_path: Path, qemu_11_1: QemuFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tdx_host(tmp_path)
    (root / "usr/share/ovmf/OVMF.inteltdx.fd").unlink()
    (root / "lab").mkdir()
    (root / "lab/TDVF.fd").write_bytes(b"tdvf")
    monkeypatch.setenv("CVMLAB_TDX_FIRMWARE", "/lab/TDVF.fd")
    probe = probe_host(root=root, qemu_facts=qemu_11_1, kvm_facts=TDX_KVM)
    assert probe.tiers["tdx"].available, probe.tiers["tdx"].reason
    assert probe.tiers["tdx"].evidence["firmware_search"]["source"] == "override"


# --- the real host -------------------------------------------------------------------------------


@needs_qemu
def test_warm_probe_uses_the_qemu_facts_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property: Any
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cold = probe_host()
    warm = probe_host()
    assert cold.qemu is not None and not cold.qemu.from_cache
    assert warm.qemu is not None and warm.qemu.from_cache
    record_property("probe_cold_ms", round(cold.duration_s * 1000, 1))
    record_property("probe_warm_ms", round(warm.duration_s * 1000, 1))
    print(f"\nprobe cold {cold.duration_s * 1000:.0f} ms, warm {warm.duration_s * 1000:.1f} ms")


# --- the boot check's marker wait (real processes) ---------------------------------------------


def _popen(script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)


def _finish(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def test_marker_wait_sees_the_marker() -> None:
    proc = _popen("echo 'Linux version'; echo 'CVMLAB-READY uptime=1.0'; exec sleep 30")
    try:
        result = _wait_for_marker(proc, "CVMLAB-READY", time.monotonic() + 10)
    finally:
        _finish(proc)
    assert result["reached_marker"]


def test_marker_wait_reports_an_exit_before_the_marker() -> None:
    proc = _popen("echo 'emulation failure'; exit 3")
    try:
        result = _wait_for_marker(proc, "CVMLAB-READY", time.monotonic() + 10)
    finally:
        _finish(proc)
    assert result == {"reached_marker": False, "result": "QEMU exited with status 3"}


def test_marker_wait_gives_up_at_the_deadline() -> None:
    proc = _popen("echo 'Booting from ROM..'; exec sleep 30")
    try:
        result = _wait_for_marker(proc, "CVMLAB-READY", time.monotonic() + 0.3)
    finally:
        _finish(proc)
    assert not result["reached_marker"] and "deadline" in result["result"]


@needs_qemu
@pytest.mark.vm
def test_boot_check_sees_the_default_image_get_ready_under_tcg(qemu_10: QemuFacts) -> None:
    """The --check-accel path end to end, with the accelerator that works here (TCG)."""
    result = _boot_check(qemu_10, timeout=90, accel="tcg")
    assert result["reached_marker"], result
    children = child_pids()
    assert children == []
    print(f"\nTCG boot check reached the marker in {result['seconds']} s")


# --- cvmlab probe ---------------------------------------------------------------------------------


def run_cli(*args: str) -> int:
    parser = argparse.ArgumentParser(prog="cvmlab")
    probe_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["probe", *args])
    status: int = parsed.handler(parsed)
    return status


@needs_qemu
def test_cli_prints_a_table_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli() == 0
    out = capsys.readouterr().out
    for tier in ("tcg", "kvm", "gmem", "sw-protected", "snp", "tdx", "nested"):
        assert any(line.split()[:1] == [tier] for line in out.splitlines()), tier
    assert "best accelerator:" in out


@needs_qemu
def test_cli_json_is_the_probe(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["tiers"]) == {"tcg", "kvm", "gmem", "sw-protected", "snp", "tdx", "nested"}


def test_cli_missing_qemu_is_a_qemu_error() -> None:
    with pytest.raises(QemuError, match="qemu-system-nowhere"):
        run_cli("--qemu", "qemu-system-nowhere")


@needs_qemu
def test_cvmlab_probe_with_missing_qemu_prints_one_line_and_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "probe", "--qemu", "qemu-system-nowhere"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "qemu-system-nowhere" in result.stderr


def _measured_by_in_a_fork(binary: str, results: multiprocessing.SimpleQueue[int]) -> None:
    results.put(shared_probe(binary).measured_by)


def test_shared_probe_is_measured_once_and_inherited_by_forks() -> None:
    binary = "cvmlab-no-such-qemu-for-the-shared-probe"
    first = shared_probe(binary)
    assert shared_probe(binary) is first and first.measured_by == os.getpid()
    assert first.probe.qemu is None and not first.probe.tiers["tcg"].available
    record = json.loads(first.json_text)  # what each test writes as probe.json
    assert record["measured_by_pid"] == os.getpid() and record["measured_at"] > 0
    assert record["tiers"]["tcg"]["available"] is False
    context = multiprocessing.get_context("fork")
    results: multiprocessing.SimpleQueue[int] = context.SimpleQueue()
    child = context.Process(target=_measured_by_in_a_fork, args=(binary, results))
    child.start()
    child.join(60)
    assert results.get() == os.getpid()  # the child read its parent's measurement
    # Another QEMU is measured for itself.
    assert shared_probe([binary, "-x"]) is not first
