"""The architecture is checked, not described: pyproject's layers contract holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_layers_contract_is_kept_with_no_ignored_imports() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert "ignore_imports" not in text  # no exception for a cycle or an upward import
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 kept, 0 broken" in done.stdout
