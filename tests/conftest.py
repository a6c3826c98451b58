"""Shared pytest fixtures: the QEMU binary and the default guest image.

Tests that need QEMU are skipped (with the reason) on a host without it; tests
that boot a guest are marked `vm` and use the image that `cvmlab image build`
made (built on first use, then cached).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.image import ImageManifest

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """The QEMU binary, or a skip saying how to install it."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (run ci/setup-host.sh)")
    return QEMU


@pytest.fixture(scope="session")
def guest_image(qemu_binary: str) -> ImageManifest:
    """The default image's manifest (kernel, initrd, cmdline, SSH user/key, host key)."""
    from orchestrator.image import default_image

    return default_image()


@pytest.fixture
def evidence_dir(tmp_path: Path) -> Path:
    """A per-test evidence directory (what avocado's data/ directory is for scenarios)."""
    path = tmp_path / "evidence"
    path.mkdir()
    return path
