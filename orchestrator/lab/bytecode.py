"""Compile the checkout's Python to bytecode on the host before the lab boots.

Why: with PYTHONDONTWRITEBYTECODE set (as it is on our CI machines), or on a fresh
clone, nothing ever writes `__pycache__` for `orchestrator/` and `scenarios/`, so
every Python the lab starts compiles them from source again, under TCG: 119 modules
and 3.5 s of `compile()` in one `cvmlab profile run --inside-lab` (7.3, profiled),
and again in avocado, its fork server and its tests. The venv's packages have their
bytecode from pip. Compiling here takes about a second once and is a no-op while the
sources are unchanged; Python reads the files even where it may not write them.
"""

from __future__ import annotations

import compileall
from collections.abc import Sequence
from pathlib import Path

#: The checkout's packages the lab imports (relative to the checkout).
PACKAGES = ("orchestrator", "scenarios")


def compile_checkout(checkout: Path, packages: Sequence[str] = PACKAGES) -> bool:
    """Write `__pycache__` for `packages` under `checkout`; False if a file failed.

    A source that does not compile is not our concern here: the test importing it
    reports the SyntaxError where it belongs.
    """
    ok = True
    for package in packages:
        directory = checkout / package
        if directory.is_dir():
            ok = bool(compileall.compile_dir(str(directory), quiet=2, workers=1)) and ok
    return ok
