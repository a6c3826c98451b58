"""The guest kernel: which package to take, its release string, and its modules.

The kernel is a Debian package from a suite (default bookworm-backports, the cloud
flavour) or a lab's own vmlinuz plus its `/lib/modules/<release>` directory. Modules are
chosen by name from `modules.dep` (dependencies first, in the order modprobe would load
them) and decompressed at build time so the guest's `insmod` needs no decompressor.
"""

from __future__ import annotations

import gzip
import lzma
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ImageError
from orchestrator.image.debian import ArchivePackage, PrivateApt

_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def module_name(path: str) -> str:
    """'kernel/drivers/char/hw_random/virtio-rng.ko.xz' -> 'virtio_rng' (as the kernel names it)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def uncompressed_path(path: str) -> str:
    """The module's path once decompressed: '.ko.xz' -> '.ko'."""
    for suffix in _MODULE_SUFFIXES[:-1]:
        if path.endswith(suffix):
            return path[: -len(suffix)] + ".ko"
    return path


def read_module(path: Path) -> bytes:
    """A module file's ELF contents, decompressing .xz/.gz in Python and .zst with zstd(1)."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        try:
            return subprocess.run(
                ["zstd", "-dc", str(path)], capture_output=True, check=True, timeout=60
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise ImageError(f"cannot decompress {path}: {exc}", "run ci/setup-host.sh") from exc
    return path.read_bytes()


def bzimage_release(vmlinuz: Path) -> str:
    """The release string in a bzImage's setup header ('6.12.95+deb12-cloud-amd64')."""
    with vmlinuz.open("rb") as stream:
        header = stream.read(0x210)
        # Boot protocol: "HdrS" at 0x202; a 16-bit pointer at 0x20e, plus 0x200, locates the
        # NUL-terminated version string ("<release> (<builder>) #1 SMP ...").
        if len(header) < 0x210 or header[0x202:0x206] != b"HdrS":
            raise ImageError(f"{vmlinuz} is not a bzImage kernel", "pass the kernel's vmlinuz file")
        offset = int.from_bytes(header[0x20E:0x210], "little") + 0x200
        stream.seek(offset)
        text = stream.read(256)
    release = text.split(b"\0", 1)[0].decode(errors="replace").split(" ", 1)[0]
    if offset <= 0x200 or not release:
        raise ImageError(f"{vmlinuz} has no version string", "pass a kernel built by kbuild")
    return release


# --------------------------------------------------------------------------- which kernel


@dataclass(frozen=True)
class KernelChoice:
    """A kernel package in the archive, the release it installs, and the packages to unpack.

    `parts` starts with `package`. Newer Debian kernels (7.x in trixie-backports) split
    the kernel: linux-image-<release> only depends on linux-binary-<release> (vmlinuz),
    linux-modules-<release> and linux-base-<release>; those are parts too.
    """

    package: ArchivePackage
    release: str
    parts: tuple[ArchivePackage, ...]


def _release_of(package_name: str) -> str:
    return package_name.removeprefix("linux-image-")


def resolve_archive_kernel(apt: PrivateApt, flavour: str, version: str | None) -> KernelChoice:
    """The kernel package of `flavour` in the suite: the newest, or the one `version` names.

    `version` may be a release ('6.12.95+deb12-cloud-amd64'), a release without the flavour
    ('6.12.95+deb12'), an upstream version ('6.12.95') or a Debian version ('6.12.95-1~bpo12+1').
    """
    if version is None:
        meta = apt.show(f"linux-image-{flavour}")
        if meta is None:
            raise ImageError(
                f"{apt.suite} has no linux-image-{flavour}",
                "choose a suite with Debian kernels (e.g. bookworm-backports or "
                "trixie-backports), or run with --refresh",
            )
        match = re.search(rf"\b(linux-image-\S+-{re.escape(flavour)})\b", meta.depends)
        if match is None:
            raise ImageError(
                f"linux-image-{flavour} {meta.version} depends on no kernel image ({meta.depends})",
                "pass --kernel-version",
            )
        target = match.group(1)
    else:
        target = _match_version(apt, flavour, version)
    package = apt.show(target)
    if package is None:
        raise ImageError(f"{apt.suite} lists {target} but has no record of it", "use --refresh")
    release = _release_of(package.name)
    return KernelChoice(package, release, (package, *_kernel_parts(apt, package, release)))


def _kernel_parts(apt: PrivateApt, image: ArchivePackage, release: str) -> list[ArchivePackage]:
    """The linux-*-<release> packages the image package depends on, at its exact version."""
    part_name = re.compile(rf"^linux-[a-z]+-{re.escape(release)}$")
    parts: list[ArchivePackage] = []
    pending = [image]
    seen = {image.name}
    while pending:
        current = pending.pop()
        for entry in current.depends.split(","):
            name = entry.split("|")[0].split("(")[0].strip()
            if not part_name.match(name) or name in seen:
                continue
            seen.add(name)
            part = apt.show(name)
            if part is None or part.version != image.version:
                found = part.version if part else "nothing"
                raise ImageError(
                    f"{image.name} {image.version} needs {name} at the same version; "
                    f"{apt.suite} has {found}",
                    "run with --refresh, or pass another --kernel-version",
                )
            parts.append(part)
            pending.append(part)
    return parts


def _match_version(apt: PrivateApt, flavour: str, version: str) -> str:
    pattern = re.compile(rf"^linux-image-(\S+)-{re.escape(flavour)}$")
    names = [n for n in apt.package_names("linux-image-") if pattern.match(n)]
    exact = f"linux-image-{version}"
    if exact in names:
        return exact
    if f"{exact}-{flavour}" in names:
        return f"{exact}-{flavour}"
    upstream = [n for n in names if re.match(rf"^linux-image-{re.escape(version)}[+-]", n)]
    if len(upstream) == 1:
        return upstream[0]
    # A Debian version ('6.12.95-1~bpo12+1') names the package version, not the package.
    upstream_of_debian = version.split("-", 1)[0]
    for name in names:
        if name.startswith(f"linux-image-{upstream_of_debian}+"):
            package = apt.show(name)
            if package is not None and package.version == version:
                return name
    releases = ", ".join(_release_of(n) for n in names) or "none"
    if len(upstream) > 1:
        raise ImageError(
            f"kernel version {version!r} is ambiguous in {apt.suite}",
            f"pass one of: {', '.join(_release_of(n) for n in upstream)}",
        )
    raise ImageError(
        f"{apt.suite} has no {flavour} kernel {version!r}",
        f"pass one of the releases it has: {releases} (or run with --refresh)",
    )


# --------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class ModuleSelection:
    """The modules an image ships, as paths relative to the modules dir (compressed names).

    `load` is in load order, dependencies first; `ship` is everything to copy (load plus
    on-demand modules and their dependencies); `builtin` and `absent` are requested names
    that need no file (built into the kernel) or that this kernel lacks (optional ones).
    """

    load: tuple[str, ...]
    ship: tuple[str, ...]
    builtin: tuple[str, ...]
    absent: tuple[str, ...]
    dependencies: dict[str, tuple[str, ...]]


def _read_modules_dep(modules_dir: Path) -> dict[str, tuple[str, ...]]:
    dep_file = modules_dir / "modules.dep"
    if not dep_file.exists():
        raise ImageError(
            f"{modules_dir} has no modules.dep",
            f"run `depmod -b <root> {modules_dir.name}` for that kernel, or pass its "
            "installed /lib/modules/<release> directory",
        )
    table: dict[str, tuple[str, ...]] = {}
    for line in dep_file.read_text().splitlines():
        module, sep, deps = line.partition(":")
        if sep:
            table[module.strip()] = tuple(deps.split())
    return table


def _builtin_names(modules_dir: Path) -> set[str]:
    builtin = modules_dir / "modules.builtin"
    if not builtin.exists():
        return set()
    return {module_name(line.strip()) for line in builtin.read_text().splitlines() if line.strip()}


def select_modules(
    modules_dir: Path,
    boot: list[str],
    boot_if_present: list[str],
    on_demand: list[str],
) -> ModuleSelection:
    """Resolve module names against `modules.dep` and `modules.builtin`.

    `boot` must exist (as a module or built in); `boot_if_present` and `on_demand` are
    skipped when the kernel lacks them. Raises ImageError naming a missing `boot` module.
    """
    table = _read_modules_dep(modules_dir)
    by_name = {module_name(path): path for path in table}
    builtin_names = _builtin_names(modules_dir)
    load: list[str] = []
    ship: list[str] = []
    builtin: list[str] = []
    absent: list[str] = []

    def add(name: str, required: bool, into: list[str]) -> None:
        key = name.replace("-", "_")
        path = by_name.get(key)
        if path is None:
            if key in builtin_names:
                builtin.append(key)
            elif required:
                raise ImageError(
                    f"kernel {modules_dir.name} has no module {name!r}",
                    "remove it from the recipe's modules, or choose a kernel that has it",
                )
            else:
                absent.append(key)
            return
        # modules.dep lists dependencies so that the last one must load first.
        for item in [*reversed(table[path]), path]:
            if item not in into:
                into.append(item)
            if item not in ship:
                ship.append(item)

    for name in boot:
        add(name, True, load)
    for name in boot_if_present:
        add(name, False, load)
    extra: list[str] = []
    for name in on_demand:
        add(name, False, extra)
    return ModuleSelection(
        load=tuple(load),
        ship=tuple(ship),
        builtin=tuple(builtin),
        absent=tuple(absent),
        dependencies={path: table[path] for path in ship},
    )
