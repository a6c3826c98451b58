"""Build step `kind: kmod`: an out-of-tree kernel module built against the image's kernel.

The module's source lives in the recipe (e.g. `images/minimal/cvmlab-convert/`); it is
built with the host's gcc against `linux-headers-<release>` of the image's exact kernel,
from the same suite, and placed in the initramfs under `/lib/modules/<release>/extra/`
(listed in the image's modules.dep, so `modprobe` finds it; nothing loads it at boot).

Two halves, because the builder resolves packages before it builds anything:

- `kmod_packages(apt, kernel, release)` runs while planning: it finds
  `linux-headers-<release>` and the two packages it needs to be usable
  (`linux-headers-<abi>-common`, which holds the tree, and `linux-kbuild-<abi>`, which holds
  the host tools), following the headers package's own Depends. A missing package or a
  version that differs from the kernel's is an ImageError naming both versions, raised
  before anything is downloaded or launched.
- `build_kmod_step(ctx, params)` is the step handler: the packages are unpacked in
  `ctx.package_root`; it checks the tree is for `ctx.kernel_release`, runs
  `make -C <headers> M=<copy of the source> modules`, checks the module's vermagic, strips
  its debug info and adds it to the archive.

Recipe entry:

    steps:
      - kind: kmod
        source: cvmlab-convert        # directory of the recipe holding Kbuild + *.c
        module: cvmlab_convert        # the .ko the build produces
        skip_without_compiler: true   # optional, see below

Modules must be built with the kernel's own compiler (Debian's tree names it: gcc-12 for
bookworm's kernels, gcc-14 for trixie's). When the host lacks it, the step is an
ImageError, or with `skip_without_compiler` it ships no module and says why in the
manifest's build notes (`kmods.<module>.skipped`), so an image of a newer kernel can still
be built on an older host; what needs the module then cancels with that reason.

Debian's headers package is made to be installed at /usr/src: its Makefile includes the
common tree by absolute path. The unpacked copy is pointed at its own common tree instead,
so nothing on the host is used or changed. Module BTF is not generated (it needs pahole,
and nothing in cvmlab introspects the module's types).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ImageError
from orchestrator.image.debian import SETUP_FIX, ArchivePackage, PrivateApt

if TYPE_CHECKING:
    from orchestrator.image.builder import BuildContext

STEP_KIND = "kmod"
MAKE_TIMEOUT_S = 300.0
# Variables from the caller's environment that would change what kbuild does (an outer
# `make` exports MAKEFLAGS with its jobserver; a developer may have ARCH or O set).
_KBUILD_ENV = (
    "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "GNUMAKEFLAGS", "O", "ARCH",
    "CROSS_COMPILE", "CC", "LD", "KBUILD_OUTPUT", "KBUILD_EXTMOD", "KCFLAGS", "KCPPFLAGS",
    "LLVM", "INSTALL_MOD_PATH",
)  # fmt: skip
_VERMAGIC = re.compile(rb"(?:^|\0)vermagic=([^\0]*)")
_DEPENDS_NAME = re.compile(r"^\s*([a-z0-9][a-z0-9.+-]*)\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?\s*$")


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Dependency:
    name: str
    relation: str | None
    version: str | None


def _depends(field: str) -> list[_Dependency]:
    """A Depends field, first alternative of each entry ("a (= 1) | b" -> a (= 1))."""
    found = []
    for entry in field.split(","):
        first = entry.split("|")[0]
        match = _DEPENDS_NAME.match(first)
        if match:
            found.append(_Dependency(match.group(1), match.group(2), match.group(3)))
    return found


def kmod_packages(apt: PrivateApt, kernel: ArchivePackage, release: str) -> list[ArchivePackage]:
    """The packages that build modules for `kernel` (release `release`), from its suite.

    Returns `linux-headers-<release>`, its `linux-headers-*-common` and its
    `linux-kbuild-*` dependency. Raises ImageError, naming the kernel's version and the
    one found, when the suite lacks one of them or carries another version.
    """
    fix = (
        f"choose a kernel whose headers {apt.suite} carries (--kernel-version), or run with "
        "--refresh if the index is stale"
    )
    name = f"linux-headers-{release}"
    headers = apt.show(name)
    if headers is None:
        raise ImageError(
            f"{apt.suite} has no {name} for kernel {release} ({kernel.version}), so no "
            "module can be built for it",
            fix,
        )
    if headers.version != kernel.version:
        raise ImageError(
            f"{name} in {apt.suite} is version {headers.version} but the kernel "
            f"{kernel.name} is {kernel.version}",
            fix,
        )
    dependencies = _depends(headers.depends)
    common = next(
        (
            d
            for d in dependencies
            if d.name.startswith("linux-headers-") and d.name.endswith("-common")
        ),
        None,
    )
    kbuild = next((d for d in dependencies if d.name.startswith("linux-kbuild-")), None)
    packages = [headers]
    for label, dependency in (("linux-headers-*-common", common), ("linux-kbuild-*", kbuild)):
        if dependency is None:
            raise ImageError(
                f"{name} {headers.version} depends on no {label} package ({headers.depends})",
                "this is not a Debian kernel headers package the builder knows; " + fix,
            )
        package = apt.show(dependency.name)
        if package is None:
            raise ImageError(
                f"{apt.suite} has no {dependency.name}, which {name} {headers.version} needs",
                fix,
            )
        if dependency.relation == "=" and package.version != dependency.version:
            raise ImageError(
                f"{dependency.name} in {apt.suite} is version {package.version} but {name} "
                f"{headers.version} needs {dependency.version}",
                fix,
            )
        packages.append(package)
    return packages


# --------------------------------------------------------------------------- building


def _headers_tree(ctx: BuildContext) -> Path:
    """The kbuild tree for the image's kernel: unpacked packages, or a lab kernel's build/."""
    release = ctx.kernel_release
    unpacked = ctx.package_root / "usr" / "src" / f"linux-headers-{release}"
    if unpacked.is_dir():
        _point_at_unpacked_common(unpacked, ctx.package_root)
        return unpacked
    installed = ctx.modules_dir / "build"
    if (installed / "Makefile").is_file():
        return installed.resolve()
    others = sorted(p.name for p in (ctx.package_root / "usr" / "src").glob("linux-headers-*"))
    raise ImageError(
        f"no kernel headers for {release}: the step packages hold "
        f"{', '.join(others) or 'none'}, and {ctx.modules_dir} has no build/ tree",
        "build the image with an archive kernel (its headers come from the same suite), or "
        f"pass a --modules-dir whose build link points at the headers of {release}",
    )


def _point_at_unpacked_common(headers: Path, package_root: Path) -> None:
    """Debian's flavour Makefile names /usr/src paths (`include .../-common/Makefile`, and
    from 7.x `KBUILD_OUTPUT=`): point them at the unpacked copies."""
    makefile = headers / "Makefile"
    text = makefile.read_text()
    fixed = re.sub(r"(?<![\w.+-])/usr/src/", f"{package_root}/usr/src/", text)
    if fixed != text:
        makefile.write_text(fixed)


def _tree_release(headers: Path) -> str | None:
    path = headers / "include" / "config" / "kernel.release"
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _required_compiler(headers: Path) -> str | None:
    """The compiler Debian's tree names (`x86_64-linux-gnu-gcc-12`), if it names one."""
    try:
        text = (headers / ".kernelvariables").read_text()
    except OSError:
        return None
    cross = re.search(r"^override CROSS_COMPILE\s*=\s*(\S*)\s*$", text, re.MULTILINE)
    gcc = re.search(r"^CC\s*=.*\b(gcc-\d+)\s*$", text, re.MULTILINE)
    if gcc is None:
        return None
    return (cross.group(1) if cross else "") + gcc.group(1)


def _check_tree(headers: Path, release: str) -> None:
    found = _tree_release(headers)
    if found != release:
        raise ImageError(
            f"the kernel headers in {headers} are for {found or 'an unknown release'}, "
            f"but the image's kernel is {release}",
            f"use linux-headers-{release} from the kernel's own suite",
        )


def missing_compiler(headers: Path) -> str | None:
    """The kernel's compiler (from Debian's tree) when this host lacks it, else None."""
    compiler = _required_compiler(headers)
    if compiler is None or shutil.which(compiler) is not None:
        return None
    return compiler


def _kbuild_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _KBUILD_ENV}
    env["LC_ALL"] = "C"
    return env


def module_vermagic(data: bytes) -> str | None:
    """The `vermagic=` string of a module's .modinfo ("6.12.95+deb12-cloud-amd64 SMP ...")."""
    match = _VERMAGIC.search(data)
    return match.group(1).decode(errors="replace") if match else None


def _run(argv: list[str], cwd: Path, what: str, timeout: float) -> str:
    """Run a build tool; its output, or ImageError with the output's tail as detail."""
    try:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=_kbuild_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: {argv[0]} is missing", SETUP_FIX) from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what} did not finish in {timeout:.0f} s", "try again") from exc
    if result.returncode != 0:
        raise ImageError(
            f"{what} failed with status {result.returncode}",
            "see the compiler's output below",
            detail=(result.stdout + result.stderr)[-4000:],
        )
    return result.stdout + result.stderr


def _add_to_modules_dep(ctx: BuildContext, dest: str) -> None:
    """List the module in the image's modules.dep (no dependencies) so modprobe finds it."""
    base = f"lib/modules/{ctx.kernel_release}/"
    relative = dest.lstrip("/")
    if not relative.startswith(base):
        return
    dep_path = f"/{base}modules.dep"
    entry = ctx.archive.get(dep_path)
    lines = entry.data.decode().splitlines() if entry is not None else []
    line = f"{relative[len(base) :]}:"
    if line not in lines:
        lines.append(line)
    ctx.archive.add_file(dep_path, ("\n".join(lines) + "\n").encode())


def build_kmod_step(ctx: BuildContext, params: Mapping[str, Any]) -> None:
    """`kind: kmod`: build `params["module"]`.ko from the recipe dir `params["source"]`."""
    try:
        source_name = str(params["source"])
        module = str(params["module"])
    except KeyError as exc:
        raise ImageError(
            f"recipe {ctx.recipe.name}: a kmod step needs {exc.args[0]!r}",
            "give source: <recipe dir with Kbuild> and module: <name of the .ko>",
        ) from None
    if not re.fullmatch(r"[A-Za-z0-9_]+", module):
        raise ImageError(
            f"kmod step: module name {module!r} is not a kernel module name", "e.g. cvmlab_convert"
        )
    source = ctx.recipe.directory / source_name
    if not (source / "Kbuild").is_file() and not (source / "Makefile").is_file():
        raise ImageError(
            f"kmod step: {source} has no Kbuild or Makefile",
            "point source: at the module's directory",
        )
    release = ctx.kernel_release
    dest = str(params.get("dest", f"/lib/modules/{release}/extra/{module}.ko"))
    dest = dest.format(release=release, module=module)

    headers = _headers_tree(ctx)
    _check_tree(headers, release)
    compiler = missing_compiler(headers)
    if compiler is not None:
        reason = (
            f"kernel {release} was built with {compiler}, which this host lacks, and modules "
            "must be built with the kernel's own compiler"
        )
        if params.get("skip_without_compiler", False):
            ctx.progress(f"skipping {module}.ko: {reason}")
            ctx.notes.setdefault("kmods", {})[module] = {"dest": dest, "skipped": reason}
            return
        raise ImageError(
            reason, f"install {compiler} on the host, or choose a kernel built with the host's gcc"
        )
    # Build in a copy: the recipe directory is an input of the image and stays pristine.
    build_dir = ctx.work / f"kmod-{module}"
    if build_dir.exists():
        shutil.rmtree(build_dir)
    shutil.copytree(source, build_dir)
    ctx.progress(f"building {module}.ko against {headers.name}")
    started = time.monotonic()
    output = _run(
        ["make", "-C", str(headers), f"M={build_dir}", "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"],
        build_dir,
        f"building {module}.ko against {headers.name}",
        MAKE_TIMEOUT_S,
    )
    seconds = time.monotonic() - started
    # Our own code builds warning-free; say so loudly if a kernel's headers disagree.
    warnings = [line for line in output.splitlines() if "warning:" in line]
    for line in warnings[:5]:
        ctx.progress(f"{module}.ko: {line.strip()}")
    built = build_dir / f"{module}.ko"
    if not built.is_file():
        raise ImageError(
            f"the build of {source_name} produced no {module}.ko", "fix module: in the recipe"
        )
    vermagic = module_vermagic(built.read_bytes())
    if vermagic is None or vermagic.split(" ", 1)[0] != release:
        raise ImageError(
            f"{module}.ko was built for {vermagic or 'no vermagic'}, not for {release}",
            "the headers do not match the kernel; rebuild with --refresh",
        )
    stripped = build_dir / f"{module}.stripped.ko"
    _run(
        ["strip", "--strip-debug", "-o", str(stripped), str(built)],
        build_dir,
        f"stripping {module}.ko",
        60,
    )
    data = stripped.read_bytes()
    ctx.archive.add_file(dest, data, 0o644)
    _add_to_modules_dep(ctx, dest)
    ctx.notes.setdefault("kmods", {})[module] = {
        "dest": dest,
        "headers": headers.name,
        "vermagic": vermagic,
        "bytes": len(data),
        "warnings": len(warnings),
        "build_s": round(seconds, 2),
    }
    ctx.progress(f"built {module}.ko in {seconds:.1f} s ({len(data) // 1024} KiB) -> {dest}")
