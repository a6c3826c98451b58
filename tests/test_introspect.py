"""QemuVersion, the feature table, and introspecting the installed QEMU (real, via QMP)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.errors import QemuError
from orchestrator.qemu.introspect import QemuFacts, cache_dir, introspect_qemu
from orchestrator.qemu.version import FEATURES, QemuVersion, feature, has_feature

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def child_pids() -> list[str]:
    """Children of every thread of this process (spawn() forks from its own thread)."""
    pids: list[str] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += (task / "children").read_text().split()
    return pids


LOADER = Path("/lib64/ld-linux-x86-64.so.2")


# --- versions -------------------------------------------------------------------------


def test_version_parses_dotted_and_two_part_forms() -> None:
    assert QemuVersion.parse("10.0.2") == QemuVersion(10, 0, 2)
    assert QemuVersion.parse("10.1") == QemuVersion(10, 1, 0)
    assert QemuVersion.parse("QEMU emulator version 9.1.50 (Debian)") == QemuVersion(9, 1, 50)


def test_versions_compare_numerically_not_as_text() -> None:
    assert QemuVersion(10, 0, 2) < QemuVersion(10, 1)
    assert QemuVersion(9, 2) < QemuVersion(10, 0)
    assert QemuVersion(10, 10) > QemuVersion(10, 9, 99)


def test_version_prints_as_written_and_short_form_drops_zero_micro() -> None:
    assert str(QemuVersion(10, 0, 2)) == "10.0.2"
    assert QemuVersion(10, 1).short() == "10.1"
    assert QemuVersion(10, 0, 2).short() == "10.0.2"


def test_not_a_version_is_a_qemu_error() -> None:
    with pytest.raises(QemuError, match="not a QEMU version"):
        QemuVersion.parse("ten")


def test_feature_table_holds_the_documented_minimum_versions() -> None:
    expected = {
        "sev-snp-guest": "9.1",
        "tdx-guest": "10.1",
        "virtio-mem-coco-refusal": "10.1",
        "memory-backend-shm": "9.1",
        "guest-memfd": "9.1",
    }
    for name, since in expected.items():
        assert feature(name).since == QemuVersion.parse(since), name
    assert all(f.source for f in FEATURES.values())


def test_has_feature_is_inclusive_at_the_introducing_release() -> None:
    assert has_feature(QemuVersion(10, 1), "tdx-guest")
    assert not has_feature(QemuVersion(10, 0, 2), "tdx-guest")


# --- the installed QEMU -----------------------------------------------------------------


@pytest.fixture(scope="module")
def facts() -> QemuFacts:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return introspect_qemu(use_cache=False)


def test_introspection_reports_version_and_accelerators(facts: QemuFacts) -> None:
    version_line = subprocess.run(
        [facts.binary, "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert facts.version == QemuVersion.parse(version_line)
    assert "tcg" in facts.accelerators
    assert "q35" in facts.machines


def test_introspection_lists_properties_of_the_types_cvmlab_uses(facts: QemuFacts) -> None:
    assert {"size", "share", "hugetlb", "hugetlbsize", "seal"} <= facts.property_names(
        "memory-backend-memfd"
    )
    assert {"mem-path", "discard-data"} <= facts.property_names("memory-backend-file")
    assert facts.properties["virtio-mem-pci"]["requested-size"] == "size"
    assert facts.has_property("virtio-balloon-pci", "free-page-reporting")


@needs_qemu
def test_facts_survive_a_json_round_trip(facts: QemuFacts) -> None:
    assert QemuFacts.from_json(facts.to_json()) == facts


@needs_qemu
def test_probe_leaves_no_qemu_running(facts: QemuFacts) -> None:
    fresh = introspect_qemu(use_cache=False)
    # Our own children only: a probe's QEMU is reaped before introspect returns.
    children = child_pids()
    assert fresh.version == facts.version
    assert children == []


@needs_qemu
def test_second_lookup_comes_from_the_disk_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cold = introspect_qemu()
    warm = introspect_qemu()
    assert not cold.from_cache and warm.from_cache
    assert warm.version == cold.version and warm.properties == cold.properties
    assert list(cache_dir().glob("*.json")) and cache_dir().is_relative_to(tmp_path)
    print(f"\nintrospection cold {cold.probe_s * 1000:.0f} ms (QEMU start + QMP)")


@needs_qemu
def test_cache_is_keyed_by_the_binary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert QEMU is not None
    copy = tmp_path / "qemu-system-x86_64"
    os.symlink(QEMU, copy)
    introspect_qemu(str(copy))
    assert introspect_qemu(str(copy)).from_cache
    # A new binary at the same path (another size and mtime) is probed again.
    copy.unlink()
    shutil.copy2(QEMU, copy)
    os.utime(copy, ns=(0, 1))
    assert not introspect_qemu(str(copy)).from_cache


@needs_qemu
def test_a_corrupt_cache_entry_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    introspect_qemu()
    for entry in cache_dir().glob("*.json"):
        entry.write_text("{not json")
    again = introspect_qemu()
    assert not again.from_cache and "tcg" in again.accelerators


@pytest.mark.skipif(QEMU is None or not LOADER.exists(), reason="needs QEMU and the ld.so loader")
def test_qemu_runs_through_a_dynamic_loader_command() -> None:
    assert QEMU is not None
    command = [str(LOADER), "--library-path", "/usr/lib/x86_64-linux-gnu", QEMU]
    facts = introspect_qemu(command, use_cache=False)
    assert facts.command[0] == str(LOADER)
    assert facts.binary == os.path.realpath(QEMU)
    assert "tcg" in facts.accelerators


# --- errors --------------------------------------------------------------------------------


def test_missing_binary_names_it_and_the_fix() -> None:
    with pytest.raises(QemuError) as caught:
        introspect_qemu("qemu-system-does-not-exist", use_cache=False)
    assert "qemu-system-does-not-exist" in caught.value.problem
    assert "ci/setup-host.sh" in caught.value.fix


def test_missing_binary_behind_a_loader_is_named() -> None:
    with pytest.raises(QemuError, match="/nonexistent/qemu-system-x86_64"):
        introspect_qemu([sys.executable, "/nonexistent/qemu-system-x86_64"], use_cache=False)


def test_binary_that_dies_at_start_carries_its_stderr(tmp_path: Path) -> None:
    dying = tmp_path / "qemu-dies"
    dying.write_text("#!/bin/sh\necho 'qemu: could not load PC BIOS' >&2\nexit 1\n")
    dying.chmod(0o755)
    with pytest.raises(QemuError) as caught:
        introspect_qemu(str(dying), use_cache=False)
    assert "exited at start with status 1" in caught.value.problem
    assert "could not load PC BIOS" in caught.value.detail


def test_binary_that_never_answers_qmp_times_out_and_is_killed(tmp_path: Path) -> None:
    silent = tmp_path / "qemu-silent"
    # Keeps the QMP socket open but never speaks: the deadline must end it.
    silent.write_text("#!/bin/sh\nexec sleep 30\n")
    silent.chmod(0o755)
    with pytest.raises(QemuError, match=r"did not answer QMP within 0\.5 s"):
        introspect_qemu(str(silent), use_cache=False, timeout=0.5)
    children = child_pids()
    assert children == []
