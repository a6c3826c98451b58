"""QEMU from trixie-backports in a private prefix (orchestrator.qemu.private_build).

The fetch itself runs for real (Debian's archive is reachable from CI); a second call is
a cache hit. Failures are classified: an unreachable archive is ArchiveUnreachable (tests
that need the prefix skip on it), a bad suite is a plain QemuError.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.errors import QemuError
from orchestrator.qemu import private_build
from orchestrator.qemu.private_build import (
    ArchiveUnreachable,
    PrivateQemu,
    _dir_name,
    _parse_uris,
    private_qemu,
)
from orchestrator.qemu.version import QemuVersion

# Lines of `apt-get install --print-uris` as apt 2.6 prints them: the hash column may be
# empty (a trailing space) or hold a hash.
PRINT_URIS = "\n".join(
    [
        "Reading package lists...",
        "'http://mirror.example/debian/pool/main/q/qemu/qemu-system-x86_11.1.3%2bds-1%7ebpo13"
        "%2b1_amd64.deb' qemu-system-x86_1%3a11.1.3+ds-1~bpo13+1_amd64.deb 10377056 ",
        "'http://mirror.example/debian/pool/main/i/ipxe/ipxe-qemu_1.21.1%2bgit20250501.dad20602"
        "%2bdfsg-1_all.deb' ipxe-qemu_1.21.1+git20250501.dad20602+dfsg-1_all.deb 1225404 "
        "MD5Sum:805bab75a8b85a51c4057295805",
    ]
)


@pytest.fixture(scope="module")
def fetched() -> PrivateQemu:
    try:
        return private_qemu(progress=lambda message: None)
    except ArchiveUnreachable as error:
        pytest.skip(f"Debian's archive is unreachable: {error}")


def test_print_uris_lines_give_package_version_and_file() -> None:
    debs = _parse_uris(PRINT_URIS)
    assert [(d.package, d.version, d.size) for d in debs] == [
        ("qemu-system-x86", "1:11.1.3+ds-1~bpo13+1", 10377056),
        ("ipxe-qemu", "1.21.1+git20250501.dad20602+dfsg-1", 1225404),
    ]
    # apt keeps the epoch's colon quoted in the file it downloads.
    assert debs[0].file == "qemu-system-x86_1%3a11.1.3+ds-1~bpo13+1_amd64.deb"


def test_prefix_directory_is_named_by_the_version_without_its_epoch() -> None:
    assert _dir_name("1:11.1.3+ds-1~bpo13+1") == "11.1.3+ds-1~bpo13+1"


def test_a_suite_name_that_is_not_one_is_refused_before_apt_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(QemuError, match="is not a Debian suite name"):
        private_qemu("trixie; rm -rf /", progress=lambda message: None)


def test_unreachable_archive_without_a_cached_prefix_is_archive_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(private_build, "APT_RETRIES", 0)  # apt would retry for 7 s
    # Port 9 (discard) on loopback: nothing listens, the connect is refused at once.
    with pytest.raises(ArchiveUnreachable, match="unreachable"):
        private_qemu(mirror="http://127.0.0.1:9/debian", progress=lambda message: None)


def test_prefix_runs_a_qemu_with_tdx_guest_through_its_own_loader(fetched: PrivateQemu) -> None:
    command = fetched.command()
    assert command[-1] == str(fetched.binary)
    assert f"QEMU_MODULE_DIR={fetched.module_dir}" in command
    result = subprocess.run(
        [*command, "-object", "help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "tdx-guest" in result.stdout.split()
    version = subprocess.run(
        [*command, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert QemuVersion.parse(version) >= QemuVersion(10, 1)


def test_nothing_is_installed_on_the_host(fetched: PrivateQemu) -> None:
    """The prefix lives in cvmlab's cache; the host's dpkg knows none of its packages' files."""
    owner = subprocess.run(
        ["dpkg", "-S", str(fetched.binary)], capture_output=True, text=True, check=False
    )
    assert owner.returncode != 0
    assert "cvmlab/qemu/" in str(fetched.prefix)


def test_second_call_within_a_day_is_a_cache_hit(fetched: PrivateQemu) -> None:
    messages: list[str] = []
    assert private_qemu(progress=messages.append) == fetched
    assert messages == []
