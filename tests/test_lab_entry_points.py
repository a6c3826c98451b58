"""The lab's `pkg_resources` stand-in answers as setuptools' own does, for what avocado asks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pkg_resources
import pytest

from orchestrator.lab import entry_points

AVOCADO = "avocado-framework"


def _groups() -> list[str]:
    """Every avocado entry point group any installed distribution declares (ours too)."""
    found: set[str] = set()
    for dist in pkg_resources.working_set:
        found.update(group for group in dist.get_entry_map() if group.startswith("avocado."))
    return sorted(found)


@pytest.fixture(params=["scan", "table"])
def source(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:  # fmt: skip
    """The stand-in's answers both ways: scanned here, and read from the launcher's table."""
    if request.param == "table":
        table = tmp_path / "entry_points.json"
        table.write_text(entry_points.table_json())
        monkeypatch.setenv(entry_points.TABLE_ENV, str(table))
    else:
        monkeypatch.delenv(entry_points.TABLE_ENV, raising=False)
    entry_points.table.cache_clear()
    yield request.param
    entry_points.table.cache_clear()


@pytest.mark.parametrize("group", [*_groups(), "console_scripts"])
def test_every_entry_point_of_a_group_is_found_alike(group: str, source: str) -> None:
    def listed(module: object) -> list[tuple[str, str]]:
        return sorted((ep.name, ep.module_name) for ep in module.iter_entry_points(group))  # type: ignore[attr-defined]

    assert listed(entry_points) == listed(pkg_resources)
    if not group.startswith("avocado."):
        return  # console_scripts: avocado only reads their module names
    for name, _ in listed(pkg_resources)[:3]:
        (ours,) = entry_points.iter_entry_points(group, name)
        (theirs,) = pkg_resources.iter_entry_points(group, name)
        assert ours.load() is theirs.load()


def test_entry_map_distribution_and_resources_are_setuptools_answers(source: str) -> None:
    ours, theirs = entry_points.get_entry_map(AVOCADO), pkg_resources.get_entry_map(AVOCADO)
    assert {g: sorted(e) for g, e in ours.items()} == {g: sorted(e) for g, e in theirs.items()}
    dist = entry_points.get_distribution(AVOCADO)
    real = pkg_resources.get_distribution(AVOCADO)
    assert (dist.version, dist.location) == (real.version, real.location)
    assert dist.version.split(".")[0] == entry_points.AVOCADO_MAJOR  # else setuptools' stays
    for resource in ("libexec", "schemas/runnable-recipe.schema.json"):
        assert entry_points.resource_filename("avocado", resource) == (
            pkg_resources.resource_filename("avocado", resource)
        )
    with pytest.raises(entry_points.DistributionNotFound):
        entry_points.get_distribution("cvmlab-no-such-distribution")


def test_a_table_of_another_interpreter_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = json.loads(entry_points.table_json())
    table["prefix"] = "/elsewhere/venv"
    table["distributions"]["avocado-framework"]["version"] = "1.0"  # would refuse install
    path = tmp_path / "entry_points.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(entry_points.TABLE_ENV, str(path))
    entry_points.table.cache_clear()
    try:
        assert entry_points.get_distribution(AVOCADO).version.startswith(entry_points.AVOCADO_MAJOR)
    finally:
        entry_points.table.cache_clear()


def test_the_launcher_runs_avocado_on_the_stand_in(tmp_path: Path) -> None:
    # In a fresh process, as orchestrator.lab.avocado_run does it: avocado imports and
    # lists its plugins and runners through the stand-in, not setuptools.
    script = (
        "import sys\n"
        "from orchestrator.lab import entry_points\n"
        "assert entry_points.install() and not entry_points.install()\n"
        "from avocado.core.main import main\n"
        "import pkg_resources\n"
        "assert pkg_resources.iter_entry_points is entry_points.iter_entry_points\n"
        "sys.argv = ['avocado', 'plugins']\n"
        "status = main()\n"
        "# The table answered everything: the scan's module was never needed.\n"
        "assert 'importlib.metadata' not in sys.modules\n"
        "sys.exit(status)\n"
    )
    # Written by an interpreter like the one that reads it (pytest's sys.path is not).
    table = tmp_path / "entry_points.json"
    table.write_text(subprocess.run(
        [sys.executable, "-c", "from orchestrator.lab import entry_points as e; "
         "print(e.table_json())"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout)  # fmt: skip
    env = {**os.environ, entry_points.TABLE_ENV: str(table)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "cvmlab-fork" in done.stdout and "avocado-instrumented" in done.stdout
