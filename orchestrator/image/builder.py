"""Recipe -> image: resolve every input, name the image by their hash, build it once.

An image lives in `$XDG_CACHE_HOME/cvmlab/images/<name>-<hash12>/` (0700) with `vmlinuz`,
`initrd.img`, `config`, `id_ed25519` (0600), `id_ed25519.pub` and `manifest.json`. The
hash covers the recipe's files, the builder's code, the kernel package (suite, version and
the archive's sha256) or the lab's kernel files, and the exact host packages and files
copied into the initramfs. Same inputs -> same directory -> cache hit, with no download.

A build runs in a temporary directory next to the final one and is renamed into place, so
a reader never sees half an image; an flock per image makes concurrent builders of the
same image wait for one another instead of building twice.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.archive_mirror import archive_mirror
from orchestrator.errors import ImageError
from orchestrator.image.cpio import CpioArchive
from orchestrator.image.debian import (
    SETUP_FIX,
    ArchivePackage,
    PrivateApt,
    check_debian_host,
    extract_deb,
    host_package_versions,
    host_packages_owning,
    sha256_file,
    shared_libraries,
)
from orchestrator.image.kernel import (
    ModuleSelection,
    bzimage_release,
    module_name,
    read_module,
    resolve_archive_kernel,
    select_modules,
    uncompressed_path,
)
from orchestrator.image.manifest import ImageManifest, load_manifest, verify_image
from orchestrator.image.recipe import Recipe, RecipeFile, Step, load_recipe
from orchestrator.image.step_kmod import STEP_KIND as KMOD_KIND
from orchestrator.image.step_kmod import build_kmod_step, kmod_packages
from orchestrator.image.step_static_c import SHARED_STEP_KIND as SHARED_C_KIND
from orchestrator.image.step_static_c import STEP_KIND as STATIC_C_KIND
from orchestrator.image.step_static_c import build_shared_c, build_static_c

Progress = Callable[[str], None]

HOST_KEY_PATH = "/etc/dropbear/dropbear_ed25519_host_key"
# Images of the same recipe unused (no build, no cache hit) for this long are deleted
# after a new build of that recipe.
UNUSED_PRUNE_S = 3 * 86400
CLIENT_KEY = "id_ed25519"
# Modules of this package whose code shapes every image: their hash is part of the key
# (with the modules of the step kinds a recipe uses, so editing one step's code does not
# rebuild images that do not use it).
_CORE_SOURCES = ("builder.py", "cpio.py", "debian.py", "kernel.py", "manifest.py", "recipe.py")


def stderr_progress(message: str) -> None:
    """Default progress sink: one `image: ...` line on stderr."""
    print(f"image: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/cvmlab` (default `~/.cache/cvmlab`), created 0700."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative value.
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    path = root / "cvmlab"
    _private_dir(path)
    return path


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class HostFile:
    """A host file copied into the initramfs at `dest`, and the package that ships it."""

    dest: str
    source: Path
    package: str
    sha256: str
    applets: bool = False


@dataclass
class KernelSource:
    """Where the kernel comes from: an archive package, or a lab's vmlinuz + modules dir."""

    release: str
    package: ArchivePackage | None = None
    # The packages to unpack (`package` first); several for split 7.x kernels.
    parts: tuple[ArchivePackage, ...] = ()
    apt: PrivateApt | None = None
    vmlinuz: Path | None = None
    modules_dir: Path | None = None
    # For a lab kernel the selection is made while planning, to hash the files it uses.
    selection: ModuleSelection | None = None


@dataclass
class Plan:
    """Everything resolved before building; `digest` names the image."""

    recipe: Recipe
    kernel: KernelSource
    host_files: list[HostFile]
    step_packages: list[ArchivePackage]
    packages: dict[str, str]
    inputs: dict[str, str]
    digest: str = ""

    @property
    def image_name(self) -> str:
        return f"{self.recipe.name}-{self.digest[:12]}"


def _recipe_inputs(recipe: Recipe) -> dict[str, str]:
    return {
        f"recipe/{path.relative_to(recipe.directory)}": sha256_file(path)
        for path in recipe.source_files()
    }


def _builder_inputs(recipe: Recipe) -> dict[str, str]:
    here = Path(__file__).resolve().parent
    paths = {here / name for name in _CORE_SOURCES}
    for step in recipe.steps:
        for function in (STEP_HANDLERS.get(step.kind), STEP_PACKAGES.get(step.kind)):
            module = sys.modules.get(getattr(function, "__module__", ""))
            if module is not None and module.__file__:
                paths.add(Path(module.__file__).resolve())
    return {f"builder/{path.name}": sha256_file(path) for path in sorted(paths)}


def _host_files(recipe: Recipe) -> tuple[list[HostFile], dict[str, str]]:
    """The recipe's host binaries plus the libraries `ldd` names, with package versions."""
    versions = host_package_versions(b.package for b in recipe.host_binaries)
    files: list[HostFile] = []
    libraries: dict[str, Path] = {}
    for binary in recipe.host_binaries:
        if not binary.path.is_file():
            raise ImageError(
                f"{binary.path} is missing although {binary.package} is installed",
                f"reinstall {binary.package} (apt-get install --reinstall {binary.package})",
            )
        files.append(
            HostFile(
                binary.dest, binary.path, binary.package, sha256_file(binary.path), binary.applets
            )
        )
        for library in shared_libraries(binary.path):
            libraries.setdefault(str(library), library)
    owners = host_packages_owning(libraries.values())
    versions.update(host_package_versions(owners.values()))
    for dest, library in sorted(libraries.items()):
        files.append(HostFile(dest, library, owners[library], sha256_file(library)))
    return files, versions


def _step_packages(recipe: Recipe, kernel: KernelSource) -> list[ArchivePackage]:
    """Archive packages the steps need: their resolvers' and their `packages:` lists."""
    apt = kernel.apt
    release = kernel.release
    found: list[ArchivePackage] = []
    for step in recipe.steps:
        resolver = STEP_PACKAGES.get(step.kind)
        if resolver is not None and apt is not None and kernel.package is not None:
            found += resolver(apt, kernel.package, release)
    wanted = [
        str(name).format(release=release)
        for step in recipe.steps
        for name in step.params.get("packages", [])
    ]
    if not wanted:
        return found
    if apt is None:
        raise ImageError(
            f"recipe {recipe.name} needs packages from the kernel's suite ({', '.join(wanted)})",
            "build it with a kernel from the archive (no --vmlinuz)",
        )
    for name in wanted:
        package = apt.show(name)
        if package is None:
            raise ImageError(
                f"{apt.suite} has no package {name}", "use --refresh or fix the recipe"
            )
        found.append(package)
    return found


def _apt_for(recipe: Recipe, suite: str) -> PrivateApt:
    return apt_for_suite(suite, recipe.mirror)


def apt_for_suite(suite: str, mirror: str | None = None) -> PrivateApt:
    """The private apt state of `suite` from `mirror` (default: the host's), one per mirror."""
    chosen = archive_mirror(mirror)
    tag = hashlib.sha256(chosen.encode()).hexdigest()[:8]
    return PrivateApt(cache_root() / "apt" / f"{suite}-{tag}", suite, chosen)


def _local_kernel(recipe: Recipe, vmlinuz: Path, modules_dir: Path) -> KernelSource:
    for path, what in ((vmlinuz, "--vmlinuz"), (modules_dir, "--modules-dir")):
        if not path.exists():
            raise ImageError(f"{what} {path} does not exist", f"pass an existing path to {what}")
    if not modules_dir.is_dir():
        raise ImageError(
            f"--modules-dir {modules_dir} is not a directory", "pass /lib/modules/<release>"
        )
    release = bzimage_release(vmlinuz)
    if release != modules_dir.name:
        raise ImageError(
            f"{vmlinuz} is kernel {release} but {modules_dir} holds modules of {modules_dir.name}",
            f"pass --modules-dir .../lib/modules/{release}",
        )
    selection = select_modules(
        modules_dir,
        list(recipe.boot_modules),
        list(recipe.boot_modules_if_present),
        list(recipe.on_demand_modules),
    )
    return KernelSource(release, vmlinuz=vmlinuz, modules_dir=modules_dir, selection=selection)


def plan_image(
    recipe_name: str,
    kernel_suite: str | None,
    kernel_version: str | None,
    vmlinuz: Path | None,
    modules_dir: Path | None,
    refresh: bool,
    progress: Progress,
) -> Plan:
    """Resolve the recipe, the kernel and the host files; compute the image's digest."""
    if (vmlinuz is None) != (modules_dir is None):
        raise ImageError(
            "--vmlinuz and --modules-dir go together",
            "pass both (the kernel image and its /lib/modules/<release> directory)",
        )
    if vmlinuz is not None and (kernel_version is not None or kernel_suite is not None):
        raise ImageError(
            "--vmlinuz replaces the archive kernel", "drop --kernel-version/--kernel-suite"
        )
    check_debian_host()
    recipe = load_recipe(recipe_name)
    inputs = {**_recipe_inputs(recipe), **_builder_inputs(recipe)}
    packages: dict[str, str] = {}
    key: dict[str, Any] = {"recipe": recipe.name}
    apt: PrivateApt | None = None
    if vmlinuz is not None and modules_dir is not None:
        kernel = _local_kernel(recipe, Path(vmlinuz), Path(modules_dir))
        assert kernel.selection is not None and kernel.modules_dir is not None
        inputs["kernel/vmlinuz"] = sha256_file(kernel.vmlinuz or Path(vmlinuz))
        for relative in ("modules.dep", "modules.builtin", *kernel.selection.ship):
            path = kernel.modules_dir / relative
            if path.exists():
                inputs[f"kernel/modules/{relative}"] = sha256_file(path)
        key["kernel"] = {"source": "local", "release": kernel.release}
    else:
        suite = kernel_suite or recipe.kernel_suite
        apt = _apt_for(recipe, suite)
        apt.ensure_lists(refresh, progress)
        progress(f"resolving the {recipe.kernel_flavour} kernel in {suite}")
        choice = resolve_archive_kernel(apt, recipe.kernel_flavour, kernel_version)
        kernel = KernelSource(choice.release, choice.package, choice.parts, apt=apt)
        for part in choice.parts:
            packages[part.name] = part.version
            inputs[f"deb/{part.deb_name}"] = part.sha256
        key["kernel"] = {"source": "archive", "suite": suite}
    step_packages = _step_packages(recipe, kernel)
    for package in step_packages:
        packages[package.name] = package.version
        inputs[f"deb/{package.deb_name}"] = package.sha256
    step_host_packages = [str(p) for s in recipe.steps for p in s.params.get("host_packages", [])]
    packages.update(host_package_versions(step_host_packages))
    host_files, host_versions = _host_files(recipe)
    packages.update(host_versions)
    for item in host_files:
        inputs[f"host{item.source}"] = item.sha256
    key.update(packages=packages, inputs=inputs, host_files=[h.dest for h in host_files])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Plan(recipe, kernel, host_files, step_packages, packages, inputs, digest)


# --------------------------------------------------------------------------- building


@dataclass
class BuildContext:
    """What a build step sees: the archive being assembled and a scratch directory.

    `package_root` holds the step packages (`packages:` in the recipe) unpacked together.
    """

    recipe: Recipe
    archive: CpioArchive
    work: Path
    kernel_release: str
    modules_dir: Path
    package_root: Path
    progress: Progress
    notes: dict[str, Any] = field(default_factory=dict)


StepHandler = Callable[[BuildContext, dict[str, Any]], None]


def _expand(text: str, ctx: BuildContext) -> str:
    return text.format(
        recipe=ctx.recipe.directory,
        work=ctx.work,
        release=ctx.kernel_release,
        modules=ctx.modules_dir,
        packages=ctx.package_root,
    )


def run_command_step(ctx: BuildContext, params: dict[str, Any]) -> None:
    """`kind: command`: copy recipe sources into the scratch dir, run argv, install results.

    params: `copy` (recipe-relative files/dirs copied into the scratch dir), `argv` (list;
    '{recipe}', '{work}', '{release}', '{modules}', '{packages}' expanded), `install` (list
    of {from: scratch-relative file, dest: guest path, mode: octal string}). `packages` and
    `host_packages` are resolved while planning (they enter the image's hash).
    """
    for relative in params.get("copy", []):
        source = ctx.recipe.directory / str(relative)
        target = ctx.work / str(relative)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    argv = [_expand(str(arg), ctx) for arg in params.get("argv", [])]
    if argv:
        ctx.progress(f"step: {shlex.join(argv)}")
        result = subprocess.run(
            argv, cwd=ctx.work, capture_output=True, text=True, timeout=600, check=False
        )
        if result.returncode != 0:
            raise ImageError(
                f"build step `{shlex.join(argv)}` failed with status {result.returncode}",
                "fix the recipe's step or install what it needs (ci/setup-host.sh)",
                detail=(result.stdout + result.stderr)[-4000:],
            )
    for item in params.get("install", []):
        source = ctx.work / _expand(str(item["from"]), ctx)
        if not source.is_file():
            raise ImageError(f"build step did not produce {source}", "fix the recipe's step")
        mode = int(str(item.get("mode", "0644")), 8)
        ctx.archive.add_file(str(item["dest"]), source.read_bytes(), mode)


# Step kinds a recipe may use: kind -> handler, run in recipe order after the base image.
STEP_HANDLERS: dict[str, StepHandler] = {
    "command": run_command_step,
    STATIC_C_KIND: build_static_c,
    SHARED_C_KIND: build_shared_c,
    KMOD_KIND: build_kmod_step,
}
PackageResolver = Callable[[PrivateApt, ArchivePackage, str], list[ArchivePackage]]
# Step kinds that need archive packages matching the kernel (e.g. its headers): kind ->
# resolver(apt, kernel package, release), called while planning so that the packages'
# exact versions enter the image's hash. Skipped for a lab kernel (--vmlinuz).
STEP_PACKAGES: dict[str, PackageResolver] = {KMOD_KIND: kmod_packages}


def _run_tool(argv: list[str], what: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: {argv[0]} is missing", SETUP_FIX) from exc
    if result.returncode != 0:
        raise ImageError(f"{what} failed: {result.stderr.strip()}", SETUP_FIX)
    return result.stdout


def _kernel_files(plan: Plan, work: Path, progress: Progress) -> tuple[Path, Path, Path | None]:
    """(vmlinuz, modules dir, config or None) for the plan's kernel, unpacked if needed."""
    kernel = plan.kernel
    release = kernel.release
    if kernel.package is None:
        assert kernel.vmlinuz is not None and kernel.modules_dir is not None
        candidates = (kernel.vmlinuz.parent / f"config-{release}", kernel.modules_dir / "config")
        return kernel.vmlinuz, kernel.modules_dir, next((c for c in candidates if c.exists()), None)
    assert kernel.apt is not None
    root = work / "kernel"
    for part in kernel.parts:
        deb = kernel.apt.download(part, cache_root() / "debs", progress)
        progress(f"unpacking {deb.name}")
        extract_deb(deb, root)
    names = ", ".join(part.name for part in kernel.parts)
    # Debian 12 ships /boot/vmlinuz-<release> and /lib/modules/<release>; the split 7.x
    # packages ship everything, vmlinuz and config included, in /usr/lib/modules/<release>.
    modules_dir = next(
        (
            d
            for d in (root / "lib/modules" / release, root / "usr/lib/modules" / release)
            if d.is_dir()
        ),
        None,
    )
    if modules_dir is None:
        raise ImageError(f"{names} hold no modules for {release}", "pass another --kernel-version")
    vmlinuz = next(
        (p for p in (root / "boot" / f"vmlinuz-{release}", modules_dir / "vmlinuz") if p.exists()),
        None,
    )
    if vmlinuz is None:
        raise ImageError(f"{names} hold no vmlinuz for {release}", "pass another --kernel-version")
    if not (modules_dir / "modules.dep").exists():
        # Debian generates modules.dep when it installs a kernel; we do it on the copy.
        # depmod -b reads <base>/lib/modules: give the /usr layout that path too.
        if not (root / "lib").exists():
            (root / "lib").symlink_to("usr/lib")
        _run_tool(["depmod", "-b", str(root), release], "depmod")
    config = next(
        (p for p in (root / "boot" / f"config-{release}", modules_dir / "config") if p.exists()),
        None,
    )
    return vmlinuz, modules_dir, config


def _add_modules(ctx: BuildContext, selection: ModuleSelection) -> None:
    base = f"lib/modules/{ctx.kernel_release}"
    for relative in selection.ship:
        ctx.archive.add_file(
            f"{base}/{uncompressed_path(relative)}", read_module(ctx.modules_dir / relative)
        )
    # A modules.dep for what is shipped, so busybox `modprobe <name>` works in the guest.
    dep_lines = [
        f"{uncompressed_path(path)}: {' '.join(uncompressed_path(d) for d in deps)}".rstrip()
        for path, deps in selection.dependencies.items()
    ]
    ctx.archive.add_file(f"{base}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    builtin = ctx.modules_dir / "modules.builtin"
    if builtin.exists():
        ctx.archive.add_file(f"{base}/modules.builtin", builtin.read_bytes())
    load_list = "".join(f"{uncompressed_path(path)}\n" for path in selection.load)
    ctx.archive.add_file("/etc/cvmlab/boot-modules", load_list.encode())
    ctx.notes["modules_loaded"] = [module_name(p) for p in selection.load]
    ctx.notes["modules_builtin"] = list(selection.builtin)
    ctx.notes["modules_absent"] = list(selection.absent)


def _add_host_files(ctx: BuildContext, host_files: list[HostFile]) -> None:
    for item in host_files:
        ctx.archive.add_host_file(item.dest, item.source)
        if item.applets:
            listing = _run_tool([str(item.source), "--list-full"], f"{item.source} --list-full")
            for applet in listing.split():
                if f"/{applet}" not in ctx.archive:
                    ctx.archive.add_symlink(applet, item.dest)


def _add_directories(ctx: BuildContext) -> None:
    for path, mode in ctx.recipe.directories.items():
        ctx.archive.add_directory(path, mode)


def _add_recipe_files(ctx: BuildContext, files: tuple[RecipeFile, ...]) -> None:
    for item in files:
        ctx.archive.add_file(item.dest, (ctx.recipe.directory / item.src).read_bytes(), item.mode)


def _make_keys(ctx: BuildContext, image_dir: Path) -> str:
    """Create the guest's host key and the per-image client key; return the host public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    host_key = ctx.work / "host_key"
    _run_tool(["dropbearkey", "-t", "ed25519", "-f", str(host_key)], "dropbearkey")
    ctx.archive.add_file(HOST_KEY_PATH, host_key.read_bytes(), 0o600)
    listing = _run_tool(["dropbearkey", "-y", "-f", str(host_key)], "dropbearkey -y")
    public_lines = [line for line in listing.splitlines() if line.startswith("ssh-ed25519 ")]
    if not public_lines:
        raise ImageError("dropbearkey printed no ed25519 public key", SETUP_FIX)
    host_public = " ".join(public_lines[0].split()[:2])

    client = Ed25519PrivateKey.generate()
    private_bytes = client.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_bytes = client.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    comment = f"cvmlab-{ctx.recipe.name}"
    descriptor = os.open(image_dir / CLIENT_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(private_bytes)
    (image_dir / f"{CLIENT_KEY}.pub").write_bytes(public_bytes + f" {comment}\n".encode())
    (image_dir / f"{CLIENT_KEY}.pub").chmod(0o644)
    home = "/root" if ctx.recipe.ssh_user == "root" else f"/home/{ctx.recipe.ssh_user}"
    ctx.archive.add_directory(f"{home}/.ssh", 0o700)
    ctx.archive.add_file(f"{home}/.ssh/authorized_keys", public_bytes + b"\n", 0o600)
    return host_public


def _write_initrd(archive: CpioArchive, path: Path, compression: str) -> int:
    with path.open("wb") as raw:
        if compression == "gzip":
            # mtime=0: the compressed file depends only on the archive.
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as stream:
                archive.write(stream)  # type: ignore[arg-type]
        else:
            archive.write(raw)
    return path.stat().st_size


def _build(plan: Plan, image_dir: Path, progress: Progress) -> ImageManifest:
    """Build the image of `plan` into the empty directory `image_dir`."""
    recipe = plan.recipe
    work = image_dir / ".work"
    work.mkdir()
    try:
        vmlinuz, modules_dir, config = _kernel_files(plan, work, progress)
        release = plan.kernel.release
        if bzimage_release(vmlinuz) != release:
            raise ImageError(f"{vmlinuz} is not kernel {release}", "pass --kernel-version")
        selection = plan.kernel.selection or select_modules(
            modules_dir,
            list(recipe.boot_modules),
            list(recipe.boot_modules_if_present),
            list(recipe.on_demand_modules),
        )
        package_root = work / "packages"
        package_root.mkdir()
        archive = CpioArchive()
        ctx = BuildContext(recipe, archive, work, release, modules_dir, package_root, progress)
        archive.add_char_device("/dev/console", 5, 1, 0o600)
        _add_directories(ctx)
        _add_host_files(ctx, plan.host_files)
        _add_modules(ctx, selection)
        _add_recipe_files(ctx, recipe.files)
        env = {
            "READY_MARKER": recipe.ready_marker,
            "KERNEL_RELEASE": release,
            "IMAGE_NAME": recipe.name,
        }
        env_text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
        archive.add_file("/etc/cvmlab/image.env", env_text.encode())
        host_public = _make_keys(ctx, image_dir)
        if plan.step_packages:
            assert plan.kernel.apt is not None
            for package in plan.step_packages:
                deb = plan.kernel.apt.download(package, cache_root() / "debs", progress)
                extract_deb(deb, package_root)
        for step in recipe.steps:
            _run_step(ctx, step)

        shutil.copyfile(vmlinuz, image_dir / "vmlinuz")
        if config is not None:
            shutil.copyfile(config, image_dir / "config")
        initrd = image_dir / "initrd.img"
        progress(
            f"writing initrd ({len(archive)} files, {archive.data_size / 1e6:.1f} MB, "
            f"{recipe.compression})"
        )
        _write_initrd(archive, initrd, recipe.compression)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    outputs = {
        path.name: sha256_file(path)
        for path in sorted(image_dir.iterdir())
        if path.is_file() and path.name != "manifest.json"
    }
    manifest = ImageManifest(
        name=recipe.name,
        directory=image_dir,
        kernel=image_dir / "vmlinuz",
        initrd=initrd,
        cmdline=recipe.cmdline,
        ssh_user=recipe.ssh_user,
        ssh_key=image_dir / CLIENT_KEY,
        host_key=host_public,
        ready_marker=recipe.ready_marker,
        restored_clock=recipe.restored_clock,
        kernel_release=release,
        packages=plan.packages,
        inputs=plan.inputs,
        outputs=outputs,
    )
    manifest.write(ctx.notes)
    return manifest


def _run_step(ctx: BuildContext, step: Step) -> None:
    handler = STEP_HANDLERS.get(step.kind)
    if handler is None:
        raise ImageError(
            f"recipe {ctx.recipe.name}: unknown step kind {step.kind!r}",
            f"use one of: {', '.join(sorted(STEP_HANDLERS))}",
        )
    handler(ctx, step.params)


@contextmanager
def _image_lock(images: Path, name: str, progress: Progress) -> Iterator[None]:
    with (images / f".{name}.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process building {name}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cache_hit(final: Path, progress: Progress) -> ImageManifest:
    manifest = load_manifest(final)
    verify_image(manifest)
    # The directory's mtime records the last use; pruning spares recently used images.
    os.utime(final)
    progress(f"cache hit {final.name}")
    return manifest


def prune_unused_images(images: Path, keep: Path, progress: Progress) -> None:
    """Delete other images of the same recipe that nobody has used for UNUSED_PRUNE_S.

    Every change of an input makes a new image (about 20 MB); this bounds the cache on a
    developer's machine. An image in use, or being built (its lock is held), is spared.
    """
    recipe_name = keep.name.rsplit("-", 1)[0]
    now = time.time()
    for image in images.glob(f"{recipe_name}-*"):
        if image == keep or image.name.rsplit("-", 1)[0] != recipe_name:
            continue
        try:
            unused = now - image.stat().st_mtime
        except FileNotFoundError:
            continue
        if unused < UNUSED_PRUNE_S:
            continue
        with (images / f".{image.name}.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            # The lock file stays: a process may be waiting on it.
            shutil.rmtree(image, ignore_errors=True)
        progress(f"pruned {image.name} (unused for {unused / 86400:.0f} days)")


def build_image(
    recipe: str = "minimal",
    *,
    kernel_suite: str | None = None,
    kernel_version: str | None = None,
    vmlinuz: Path | None = None,
    modules_dir: Path | None = None,
    refresh: bool = False,
    progress: Progress = stderr_progress,
) -> ImageManifest:
    """Build the image of `recipe` (a name under images/ or a recipe directory), or reuse it.

    `kernel_suite` defaults to the recipe's (bookworm-backports for minimal); the newest
    kernel of the recipe's flavour is used unless `kernel_version` names one. A lab kernel
    is `vmlinuz` plus its `modules_dir` (/lib/modules/<release>). `refresh` re-reads the
    archive's index now (otherwise at most once a day). Raises ImageError with a fix.
    """
    started = time.monotonic()
    plan = plan_image(recipe, kernel_suite, kernel_version, vmlinuz, modules_dir, refresh, progress)
    images = _private_dir(cache_root() / "images")
    final = images / plan.image_name
    if (final / "manifest.json").exists():
        return _cache_hit(final, progress)
    with _image_lock(images, plan.image_name, progress):
        if (final / "manifest.json").exists():
            return _cache_hit(final, progress)
        if final.exists():
            raise ImageError(
                f"{final} exists but has no manifest", f"delete {final} and build again"
            )
        # Left by a builder that died: nobody else holds this image's lock.
        for stale in images.glob(f".build-{plan.image_name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".build-{plan.image_name}-", dir=images))
        try:
            scratch.chmod(0o700)
            _build(plan, scratch, progress)
            os.rename(scratch, final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    built = load_manifest(final)
    progress(f"built {final.name} in {time.monotonic() - started:.0f} s")
    prune_unused_images(images, final, progress)
    return built


def default_image(progress: Progress = stderr_progress) -> ImageManifest:
    """The default image (`minimal`, newest bookworm-backports cloud kernel), built once."""
    return build_image(progress=progress)
