"""Image recipes: `images/<name>/recipe.yaml` plus the files it copies into the initramfs.

A recipe names the kernel (suite, flavour), the kernel command line, the host binaries to
copy (with their shared libraries), the modules to load at boot or ship for later, files
and directories of the recipe to place in the initramfs, and build steps. Steps are the
extension point: each has a `kind` handled by a function registered in the builder, so a
later recipe can add e.g. a static C helper or an out-of-tree kernel module without
changing how the rest is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from orchestrator.errors import ImageError
from orchestrator.image.manifest import RESTORED_CLOCKS

RECIPE_FILE = "recipe.yaml"
COMPRESSIONS = ("none", "gzip")


def images_root() -> Path:
    """The repository's `images/` directory (recipes and their sources)."""
    return Path(__file__).resolve().parents[2] / "images"


@dataclass(frozen=True)
class HostBinary:
    """A file from an installed host package, copied to `dest` in the guest."""

    package: str
    path: Path
    dest: str
    # Create a symlink for every applet the binary implements (busybox).
    applets: bool = False


@dataclass(frozen=True)
class RecipeFile:
    """A file of the recipe directory (`src`, relative) placed at `dest` with `mode`."""

    src: str
    dest: str
    mode: int


@dataclass(frozen=True)
class Step:
    """A build step: `kind` selects the handler, `params` are its settings from the recipe."""

    kind: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe; `directory` holds recipe.yaml and the files it names."""

    name: str
    directory: Path
    kernel_suite: str
    kernel_flavour: str
    mirror: str | None  # None: the host's apt mirror (orchestrator.archive_mirror)
    cmdline: str
    ready_marker: str
    ssh_user: str
    compression: str
    #: Who sets a restored guest's clock: "ssh" (cvmlab, with `date -s` over SSH) or
    #: "rtc" (the guest's SSH server, from the RTC, before a connection's process starts).
    restored_clock: str
    host_binaries: tuple[HostBinary, ...]
    boot_modules: tuple[str, ...]
    boot_modules_if_present: tuple[str, ...]
    on_demand_modules: tuple[str, ...]
    files: tuple[RecipeFile, ...]
    directories: dict[str, int] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()

    def source_files(self) -> list[Path]:
        """Every file under the recipe directory: all of them are inputs of the image."""
        return sorted(p for p in self.directory.rglob("*") if p.is_file())


def _mode(value: Any, where: str) -> int:
    # YAML reads 0755 as the integer 755 under YAML 1.1 rules only sometimes: insist on text.
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value):
        return int(value, 8)
    raise ImageError(f"{where}: mode {value!r} must be an octal string", 'write e.g. "0644"')


def _guest_path(value: Any, where: str) -> str:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or ".." in PurePosixPath(value).parts
    ):
        raise ImageError(f"{where}: {value!r} is not an absolute guest path", "write e.g. /etc/x")
    return value


def _names(section: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = section.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"{where}: '{key}' must be a list of names", "fix the recipe")
    return tuple(value)


def load_recipe(recipe: str) -> Recipe:
    """Load a recipe by name (a directory under images/) or by path to its directory."""
    candidate = Path(recipe)
    directory = candidate if candidate.is_dir() else images_root() / recipe
    path = directory / RECIPE_FILE
    if not path.is_file():
        known = sorted(p.parent.name for p in images_root().glob(f"*/{RECIPE_FILE}"))
        raise ImageError(
            f"no image recipe {recipe!r} (no {path})",
            f"use one of: {', '.join(known) or 'none found'}, or the path of a recipe directory",
        )
    try:
        # libyaml's loader when PyYAML has it: a cache hit parses the recipe every time.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        data = yaml.load(path.read_text(), Loader=loader)
    except yaml.YAMLError as exc:
        raise ImageError(f"{path} is not valid YAML: {exc}", "fix the recipe") from exc
    if not isinstance(data, dict):
        raise ImageError(f"{path} is not a map", "fix the recipe")
    where = str(path)
    try:
        kernel = data.get("kernel", {})
        modules = data.get("modules", {})
        binaries = tuple(
            HostBinary(
                package=str(item["package"]),
                path=Path(item["path"]),
                dest=_guest_path(item["dest"], where),
                applets=bool(item.get("applets", False)),
            )
            for item in data.get("host_binaries", [])
        )
        files = tuple(
            RecipeFile(
                src=str(item["src"]),
                dest=_guest_path(item["dest"], where),
                mode=_mode(item.get("mode", "0644"), where),
            )
            for item in data.get("files", [])
        )
        directories = {
            _guest_path(item["path"], where): _mode(item.get("mode", "0755"), where)
            for item in data.get("directories", [])
        }
        steps = tuple(
            Step(kind=str(item["kind"]), params={k: v for k, v in item.items() if k != "kind"})
            for item in data.get("steps") or []
        )
        parsed = Recipe(
            name=str(data["name"]),
            directory=directory.resolve(),
            kernel_suite=str(kernel["suite"]),
            kernel_flavour=str(kernel["flavour"]),
            mirror=str(kernel["mirror"]) if kernel.get("mirror") else None,
            cmdline=str(data["cmdline"]),
            ready_marker=str(data["ready_marker"]),
            ssh_user=str(data.get("ssh_user", "root")),
            compression=str(data.get("compression", "gzip")),
            restored_clock=str(data.get("restored_clock", "ssh")),
            host_binaries=binaries,
            boot_modules=_names(modules, "boot", where),
            boot_modules_if_present=_names(modules, "boot_if_present", where),
            on_demand_modules=_names(modules, "on_demand", where),
            files=files,
            directories=directories,
            steps=steps,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ImageError(f"{where}: missing or malformed entry ({exc})", "fix the recipe") from exc
    if parsed.compression not in COMPRESSIONS:
        raise ImageError(
            f"{where}: compression {parsed.compression!r} unknown", f"use one of {COMPRESSIONS}"
        )
    if parsed.restored_clock not in RESTORED_CLOCKS:
        raise ImageError(
            f"{where}: restored_clock {parsed.restored_clock!r} unknown",
            f"use one of {RESTORED_CLOCKS}",
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", parsed.ready_marker):
        raise ImageError(f"{where}: ready_marker must be one word", "e.g. CVMLAB-READY")
    for item in parsed.files:
        if not (parsed.directory / item.src).is_file():
            raise ImageError(f"{where}: file {item.src!r} is not in the recipe", "add it")
    return parsed
