"""The part of `pkg_resources` avocado 113 uses, answered by `importlib.metadata`.

Why: avocado finds its plugins through setuptools' `pkg_resources`, whose import alone
is 4-6 s of Python under TCG in the lab (it builds a working set and a requirements
parser; measured: `import avocado.core.main` 9.5 s with it, 5.2 s with this module).
The lab's avocado launcher (`orchestrator.lab.avocado_run`) installs this module as
`pkg_resources` before avocado is imported, so the lab's avocado, its fork server and
every forked test find their plugins through the standard library instead. Nothing
else changes: avocado on the host, and any process that imported the real module
first, keep setuptools' own.

What avocado 113 calls, all here: `iter_entry_points(group, name=None)` (entry points
with `.name`, `.module_name`, `.load()`), `get_entry_map(dist)`, `get_distribution(dist)`
(`.version`, `.location`), `DistributionNotFound` and `resource_filename(package, path)`.
tests/test_lab_entry_points.py compares each answer with setuptools' for every avocado
entry point group, so an avocado that needs more fails there, not in the lab.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from functools import cache
from typing import Any

#: The avocado major release whose calls this module answers (pyproject pins it); another
#: one keeps setuptools'.
AVOCADO_MAJOR = "113"


class DistributionNotFound(Exception):
    """pkg_resources' error for a distribution that is not installed."""


class EntryPoint:
    """An entry point as avocado reads it: `name`, `module_name`, `load()`."""

    def __init__(self, entry: metadata.EntryPoint) -> None:
        self._entry = entry
        self.name = entry.name
        self.module_name = entry.module

    def load(self) -> Any:
        return self._entry.load()

    def __repr__(self) -> str:
        return f"EntryPoint({self._entry.name!r} = {self._entry.value!r})"


class Distribution:
    """An installed distribution: `version`, and `location` (the directory it is in)."""

    def __init__(self, dist: metadata.Distribution) -> None:
        self.version = dist.version
        self.location = os.path.normpath(str(dist.locate_file("")))


@cache
def _all_entry_points() -> Any:
    # One scan of the installed distributions per process (pkg_resources also scans once).
    # Python 3.11 returns SelectableGroups, 3.12 EntryPoints: both have select(group=).
    return metadata.entry_points()


def iter_entry_points(group: str, name: str | None = None) -> Iterator[EntryPoint]:
    for entry in _all_entry_points().select(group=group):
        if name is None or entry.name == name:
            yield EntryPoint(entry)


def _distribution(name: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError as error:
        raise DistributionNotFound(name) from error


def get_distribution(name: str) -> Distribution:
    return Distribution(_distribution(name))


def get_entry_map(name: str) -> dict[str, dict[str, EntryPoint]]:
    groups: dict[str, dict[str, EntryPoint]] = {}
    for entry in _distribution(name).entry_points:
        groups.setdefault(entry.group, {})[entry.name] = EntryPoint(entry)
    return groups


def resource_filename(package: str, resource: str) -> str:
    """A file inside an installed package (avocado's schemas and libexec)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no package {package!r}")
    return os.path.join(os.path.dirname(spec.origin), resource)


def install() -> bool:
    """Make this module `pkg_resources` for this process (and its forks).

    Only before anything imported the real one, and only for AVOCADO_MAJOR: True
    when installed.
    """
    if "pkg_resources" in sys.modules:
        return False
    try:
        if metadata.version("avocado-framework").split(".")[0] != AVOCADO_MAJOR:
            return False
    except metadata.PackageNotFoundError:
        return False
    module = types.ModuleType("pkg_resources", __doc__)
    for name in ("DistributionNotFound", "iter_entry_points", "get_distribution",
                 "get_entry_map", "resource_filename"):  # fmt: skip
        setattr(module, name, globals()[name])
    sys.modules["pkg_resources"] = module
    return True
