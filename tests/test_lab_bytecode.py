"""The checkout's bytecode, written on the host so the lab's Pythons need not compile."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from orchestrator.lab.bytecode import compile_checkout


def _package(root: Path, name: str, body: str) -> Path:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = package / "module.py"
    source.write_text(body)
    return source


def test_bytecode_is_written_and_used_where_python_may_not_write_it(tmp_path: Path) -> None:
    source = _package(tmp_path, "pkg", "VALUE = 42\n")
    assert compile_checkout(tmp_path, ["pkg"])
    cached = Path(importlib.util.cache_from_source(str(source)))
    assert cached.is_file()
    # Same size and mtime, other value: only a Python that loads the cached bytecode
    # (and may not write any, like ours in CI) still sees 42.
    stat = source.stat()
    source.write_text("VALUE = 43\n")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    done = subprocess.run(
        [sys.executable, "-c", "import pkg.module as m; print(m.VALUE)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    assert done.stdout.strip() == "42"


def test_a_source_that_does_not_compile_is_reported_and_the_rest_compiled(tmp_path: Path) -> None:
    _package(tmp_path, "broken", "def f(:\n")
    good = _package(tmp_path, "good", "VALUE = 1\n")
    assert not compile_checkout(tmp_path, ["broken", "good"])
    assert Path(importlib.util.cache_from_source(str(good))).is_file()


def test_a_missing_package_is_no_error(tmp_path: Path) -> None:
    assert compile_checkout(tmp_path, ["absent"])
