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

The answers come from a table (`table()`): every distribution that declares an
`avocado.*` or `console_scripts` entry point, with its version, location and all its
entry points. Inside the lab, `cvmlab lab` writes the host's table into the run
directory and names it in $CVMLAB_ENTRY_POINTS, so the command does not import
`importlib.metadata` nor scan every distribution's metadata over 9p: 2.5 s of
`import importlib.metadata` alone under TCG (measured with `-X importtime` on 7.3).
The table is used only by the interpreter it describes (same `sys.prefix` and
`sys.path` after its first entry); anything else, and any other group, is answered by
`importlib.metadata`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import sys
import types
from collections.abc import Iterator
from typing import Any

#: The avocado major release whose calls this module answers (pyproject pins it); another
#: one keeps setuptools'.
AVOCADO_MAJOR = "113"
#: Names the table file the launcher's process may read instead of scanning.
TABLE_ENV = "CVMLAB_ENTRY_POINTS"
TABLE_FORMAT = 1


def _covered(group: str) -> bool:
    """The groups the table holds in full: what avocado asks for (its plugins, and
    `console_scripts` for its `avocado-runner-*` executables)."""
    return group.startswith("avocado.") or group == "console_scripts"


class DistributionNotFound(Exception):
    """pkg_resources' error for a distribution that is not installed."""


class EntryPoint:
    """An entry point as avocado reads it: `name`, `module_name`, `load()`."""

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self.value = value
        # "module[:attr.attr] [extras]", as importlib.metadata.EntryPoint parses it.
        target = value.split("[", 1)[0].strip()
        module, _, attr = target.partition(":")
        self.module_name = module.strip()
        self._attrs = [part for part in attr.strip().split(".") if part]

    def load(self) -> Any:
        module = importlib.import_module(self.module_name)
        return functools.reduce(getattr, self._attrs, module)

    def __repr__(self) -> str:
        return f"EntryPoint({self.name!r} = {self.value!r})"


class Distribution:
    """An installed distribution: `version`, and `location` (the directory it is in)."""

    def __init__(self, version: str, location: str) -> None:
        self.version = version
        self.location = location


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _interpreter() -> dict[str, Any]:
    # sys.path[0] is the script's directory or the cwd: it differs between the launcher
    # (a console script) and the command (`python -m ...`) of one environment.
    return {"prefix": sys.prefix, "path": sys.path[1:]}


def scan() -> dict[str, Any]:
    """This interpreter's table, from `importlib.metadata` (the slow way, once)."""
    from importlib import metadata

    dists: dict[str, dict[str, Any]] = {}
    for dist in metadata.distributions():
        name = _normalized(dist.metadata["Name"] or "")
        if name in dists:
            continue  # the first on sys.path wins, as importlib.metadata's own answer
        entries = [[e.group, e.name, e.value] for e in dist.entry_points]
        if name == _normalized("avocado-framework") or any(
            _covered(group) for group, _, _ in entries
        ):
            dists[name] = {
                "version": dist.version,
                "location": os.path.normpath(str(dist.locate_file(""))),
                "entry_points": entries,
            }
    return {"format": TABLE_FORMAT, **_interpreter(), "distributions": dists}


def table_json() -> str:
    """This interpreter's table as the launcher writes it for the lab's command."""
    return json.dumps(scan())


@functools.cache
def table() -> dict[str, Any]:
    """The table for this process: $CVMLAB_ENTRY_POINTS when it describes this
    interpreter, else a scan."""
    path = os.environ.get(TABLE_ENV)
    if path:
        try:
            with open(path) as stream:
                loaded = json.load(stream)
        except (OSError, ValueError):
            loaded = None
        if (
            isinstance(loaded, dict)
            and loaded.get("format") == TABLE_FORMAT
            and all(loaded.get(key) == value for key, value in _interpreter().items())
        ):
            return loaded
    return scan()


def iter_entry_points(group: str, name: str | None = None) -> Iterator[EntryPoint]:
    if not _covered(group):
        from importlib import metadata

        entries = [(e.name, e.value) for e in metadata.entry_points().select(group=group)]
    else:
        entries = [
            (entry_name, value)
            for dist in table()["distributions"].values()
            for entry_group, entry_name, value in dist["entry_points"]
            if entry_group == group
        ]
    for entry_name, value in entries:
        if name is None or entry_name == name:
            yield EntryPoint(entry_name, value)


def _distribution(name: str) -> dict[str, Any]:
    found = table()["distributions"].get(_normalized(name))
    if found is not None:
        return dict(found)
    from importlib import metadata

    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError as error:
        raise DistributionNotFound(name) from error
    return {
        "version": dist.version,
        "location": os.path.normpath(str(dist.locate_file(""))),
        "entry_points": [[e.group, e.name, e.value] for e in dist.entry_points],
    }


def get_distribution(name: str) -> Distribution:
    dist = _distribution(name)
    return Distribution(dist["version"], dist["location"])


def get_entry_map(name: str) -> dict[str, dict[str, EntryPoint]]:
    groups: dict[str, dict[str, EntryPoint]] = {}
    for group, entry_name, value in _distribution(name)["entry_points"]:
        groups.setdefault(group, {})[entry_name] = EntryPoint(entry_name, value)
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
        version = get_distribution("avocado-framework").version
    except DistributionNotFound:
        return False
    if version.split(".")[0] != AVOCADO_MAJOR:
        return False
    module = types.ModuleType("pkg_resources", __doc__)
    for name in ("DistributionNotFound", "iter_entry_points", "get_distribution",
                 "get_entry_map", "resource_filename"):  # fmt: skip
        setattr(module, name, globals()[name])
    sys.modules["pkg_resources"] = module
    return True
