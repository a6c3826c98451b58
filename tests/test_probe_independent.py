"""The probe against an independent measurement of the same machine, never one machine's facts.

Machines of one kind differ (one host kernel has guest_memfd, the next has none), so these
tests read the same facts a second way (a C program written against kvm.h's numbers,
`qemu -accel help`, QMP over stdio, /sys/module) and ask the probe to agree, on this host
and inside the kernel-under-test lab, where kvm and gmem are the chosen kernel's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.host.probe import HostProbe, probe_host

REPO = Path(__file__).resolve().parents[1]
QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


@pytest.fixture(scope="module")
def kvm_caps_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kvmcaps") / "kvm_caps"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(out), str(REPO / "tests/independent/kvm_caps.c")],
        check=True,
    )
    return out


def independent_kvm(binary: Path) -> dict[str, Any]:
    result = subprocess.run([str(binary)], capture_output=True, text=True, check=True)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def assert_gmem_tier_agrees(probe: HostProbe | dict[str, Any], caps: dict[str, Any]) -> None:
    tiers = probe.to_json()["tiers"] if isinstance(probe, HostProbe) else probe["tiers"]
    expected = bool(
        caps["dev_kvm"] and caps["guest_memfd"] > 0 and caps["user_memory2"] > 0
        and caps["default_vm"]
    )  # fmt: skip
    assert tiers["gmem"]["available"] == expected, (tiers["gmem"], caps)
    if expected:
        assert f"KVM_CAP_GUEST_MEMFD={caps['guest_memfd']}" in tiers["gmem"]["reason"]
        assert tiers["gmem"]["evidence"]["gmem_flags"] == caps["gmem_flags"]


def qmp_stdio(*commands: dict[str, Any]) -> list[dict[str, Any]]:
    """Answers of a `-machine none` QEMU to QMP commands over stdio (no cvmlab code)."""
    assert QEMU is not None
    lines = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    text = "".join(json.dumps(c) + "\n" for c in lines)
    done = subprocess.run(
        [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"],
        input=text, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [r["return"] for r in replies if "return" in r][1 : 1 + len(commands)]


@needs_qemu
def test_this_hosts_tiers_agree_with_an_independent_measurement(kvm_caps_binary: Path) -> None:
    probe = probe_host()
    assert_gmem_tier_agrees(probe, independent_kvm(kvm_caps_binary))
    accel_help = subprocess.run(
        [str(QEMU), "-accel", "help"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert probe.tiers["tcg"].available == ("tcg" in accel_help)
    vendor = [m for m in ("kvm_intel", "kvm_amd") if Path(f"/sys/module/{m}").is_dir()]
    if not vendor:
        assert not probe.tiers["kvm"].available, probe.tiers["kvm"]
    for tier, param in (("snp", "/sys/module/kvm_amd/parameters/sev_snp"),
                        ("tdx", "/sys/module/kvm_intel/parameters/tdx")):  # fmt: skip
        enabled = Path(param).exists() and Path(param).read_text().strip() in ("Y", "1")
        if not enabled:
            assert not probe.tiers[tier].available, probe.tiers[tier]
    (expansion,) = qmp_stdio(
        {"execute": "query-cpu-model-expansion",
         "arguments": {"type": "full", "model": {"name": "max"}}}
    )  # fmt: skip
    props = expansion["model"]["props"]
    assert probe.tiers["nested"].available == bool(props.get("svm") and props.get("npt"))
    assert probe.host.lab is None  # not inside the lab


@pytest.mark.lab
@needs_qemu
def test_inside_the_lab_kvm_and_gmem_are_the_kernel_under_tests(
    kvm_caps_binary: Path, tmp_path: Path
) -> None:
    """`cvmlab lab --kernel 7.3 -- cvmlab probe --json`: kvm and gmem available, as measured."""
    script = tmp_path / "inside.sh"
    script.write_text(
        f'"{REPO}/.venv/bin/cvmlab" probe --json > "{tmp_path}/probe.json"\n'
        f'"{kvm_caps_binary}" > "{tmp_path}/caps.json"\n'
        f'uname -r > "{tmp_path}/uname"\n'
    )
    shutil.copy(kvm_caps_binary, tmp_path / "kvm_caps")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "lab", "--kernel", "7.3", "--quiet",
         "--rw", str(tmp_path), "--rw", str(kvm_caps_binary.parent), "--", "sh", str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "CVMLAB_RESULTS": str(tmp_path / "results")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads((tmp_path / "probe.json").read_text())
    caps = json.loads((tmp_path / "caps.json").read_text())
    release = (tmp_path / "uname").read_text().strip()
    assert release.startswith("7.3."), release
    assert probe["host"]["kernel_release"] == release
    assert probe["host"]["lab"]["kernel_under_test"] == release
    assert probe["host"]["lab"]["outer_host_kernel"] == os.uname().release
    assert probe["tiers"]["kvm"]["available"], probe["tiers"]["kvm"]
    assert "kvm_amd" in probe["tiers"]["kvm"]["evidence"]["vendor_modules"]
    assert caps["guest_memfd"] > 0  # the kernel under test has guest_memfd, whatever the host
    assert_gmem_tier_agrees(probe, caps)
