"""Kernels under test: a Debian package by series or version, or the user's own build.

`--kernel 7.3` takes the newest 7.3.x generic (`-amd64`) kernel of Debian's backports
suites (6.x from bookworm-backports, 7.x from trixie-backports; both are searched, so a
new series needs no code change); `--kernel 7.3.4` or a full release
(`7.3.4+deb13-amd64`) names one. The generic flavour, because the `cloud` flavour lacks
KVM_AMD_SEV and therefore guest_memfd. Packages are downloaded with the image builder's
private apt (nothing is installed), unpacked once into the cache and kept by release.

`--vmlinuz PATH [--modules-dir DIR]` is a kernel tree under development: its bzImage, and
its `modules_install` directory unless everything the lab needs is built in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ImageError, LabError
from orchestrator.image.builder import apt_for_suite, cache_root
from orchestrator.image.debian import ArchivePackage, PrivateApt, extract_deb
from orchestrator.image.kernel import bzimage_release, resolve_archive_kernel

Progress = Callable[[str], None]

# Suites searched for Debian kernels, oldest first.
KERNEL_SUITES = ("bookworm-backports", "trixie-backports")
FLAVOUR = "amd64"
_NAME = re.compile(
    r"^linux-image-(?P<version>\d+\.\d+(?:\.\d+)?)\+(?P<abi>deb\d+(?:\.\d+)?)-amd64$"
)
_UNPACKED_FORMAT = 1


@dataclass(frozen=True)
class LabKernel:
    """A kernel to boot in the lab: its bzImage, its modules (if any) and where it came from."""

    release: str  # uname -r: '7.3.4+deb13-amd64'
    vmlinuz: Path
    modules_dir: Path | None  # <root>/lib/modules/<release> with modules.dep, or None
    origin: str  # 'debian trixie-backports linux-image-7.3.4+deb13-amd64 7.3.4-1~bpo13+1'

    @property
    def series(self) -> str:
        """'7.3' of '7.3.4+deb13-amd64'."""
        match = re.match(r"(\d+)\.(\d+)", self.release)
        return f"{match.group(1)}.{match.group(2)}" if match else self.release

    def to_json(self) -> dict[str, str | None]:
        return {
            "release": self.release,
            "series": self.series,
            "vmlinuz": str(self.vmlinuz),
            "modules_dir": str(self.modules_dir) if self.modules_dir else None,
            "origin": self.origin,
        }


def kernels_root() -> Path:
    """Where unpacked kernels live: <cvmlab cache>/kernels (0700)."""
    root = cache_root() / "kernels"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass(frozen=True)
class _Candidate:
    suite: str
    version: str  # upstream: 7.3.4
    release: str  # 7.3.4+deb13-amd64


def _candidates(apts: list[PrivateApt]) -> list[_Candidate]:
    found = []
    for apt in apts:
        for name in apt.package_names("linux-image-"):
            match = _NAME.match(name)
            if match:
                found.append(
                    _Candidate(apt.suite, match.group("version"), name.removeprefix("linux-image-"))
                )
    return sorted(found, key=lambda c: (_version_key(c.version), c.release))


def _matches(candidate: _Candidate, wanted: str) -> bool:
    if wanted in (candidate.release, candidate.release.removesuffix(f"-{FLAVOUR}")):
        return True
    return candidate.version == wanted or candidate.version.startswith(f"{wanted}.")


def available_series(apts: list[PrivateApt]) -> list[str]:
    """The kernel series the archive offers, for error messages: ['6.12', '7.2', '7.3']."""
    series = {".".join(c.version.split(".")[:2]) for c in _candidates(apts)}
    return sorted(series, key=_version_key)


def _check_request(wanted: str) -> None:
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?(\+deb\d+(\.\d+)?(-amd64)?)?", wanted):
        raise LabError(
            f"kernel {wanted!r} is neither a series (7.3), a version (7.3.4) nor a Debian "
            "release (7.3.4+deb13-amd64)",
            "pass --kernel SERIES|VERSION|RELEASE, or --vmlinuz PATH for your own build",
        )


def debian_kernel(wanted: str, *, refresh: bool = False, progress: Progress) -> LabKernel:
    """The newest Debian generic kernel matching `wanted`, downloaded and unpacked if needed."""
    _check_request(wanted)
    apts = [apt_for_suite(suite) for suite in KERNEL_SUITES]
    for apt in apts:
        apt.ensure_lists(refresh, progress)
    by_suite = {apt.suite: apt for apt in apts}
    matching = [c for c in _candidates(apts) if _matches(c, wanted)]
    # Newest first; the index may list names whose record has gone: skip those.
    for candidate in reversed(matching):
        apt = by_suite[candidate.suite]
        if apt.show(f"linux-image-{candidate.release}") is None:
            continue
        choice = resolve_archive_kernel(apt, FLAVOUR, candidate.release)
        return _unpacked(apt, choice.release, choice.parts, progress)
    have = ", ".join(available_series(apts)) or "none"
    raise LabError(
        f"Debian's {' and '.join(KERNEL_SUITES)} have no {FLAVOUR} kernel {wanted!r}",
        f"choose one of the series they have: {have} (or a version such as "
        f"{matching[-1].version if matching else '7.3.4'}); --refresh re-reads the archive",
    )


def _unpacked(
    apt: PrivateApt, release: str, parts: tuple[ArchivePackage, ...], progress: Progress
) -> LabKernel:
    """Download the packages and unpack them under kernels/<release>/ (once)."""
    versions = {part.name: part.version for part in parts}
    target = kernels_root() / release
    stamp = target / "cvmlab-kernel.json"
    origin = (
        f"debian {apt.suite} linux-image-{release} {versions.get(f'linux-image-{release}', '?')}"
    )
    if stamp.exists():
        data = json.loads(stamp.read_text())
        if data.get("packages") == versions and data.get("format") == _UNPACKED_FORMAT:
            return _kernel_in(target, release, str(data["origin"]))
    debs = [apt.download(part, cache_root() / "debs", progress) for part in parts]
    scratch = Path(tempfile.mkdtemp(prefix=f".{release}-", dir=kernels_root()))
    try:
        for deb in debs:
            progress(f"unpacking {deb.name}")
            extract_deb(deb, scratch)
        modules = _modules_dir(scratch, release)
        if modules is not None and not (modules / "modules.dep").exists():
            # Debian runs depmod when it installs a kernel; we do it on the copy.
            if not (scratch / "lib").exists():
                (scratch / "lib").symlink_to("usr/lib")
            _depmod(scratch, release)
        (scratch / "cvmlab-kernel.json").write_text(
            json.dumps({"format": _UNPACKED_FORMAT, "packages": versions, "origin": origin})
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _kernel_in(target, release, origin)


def _depmod(root: Path, release: str) -> None:
    result = subprocess.run(
        ["depmod", "-b", str(root), release], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise LabError(
            f"depmod for {release} failed: {result.stderr.strip()}", "run ci/setup-host.sh"
        )


def _modules_dir(root: Path, release: str) -> Path | None:
    for candidate in (root / "usr/lib/modules" / release, root / "lib/modules" / release):
        if candidate.is_dir() and not candidate.is_symlink():
            return candidate
    return None


def _kernel_in(root: Path, release: str, origin: str) -> LabKernel:
    modules = _modules_dir(root, release)
    candidates = [root / "boot" / f"vmlinuz-{release}"]
    if modules is not None:
        candidates.append(modules / "vmlinuz")
    vmlinuz = next((p for p in candidates if p.exists()), None)
    if vmlinuz is None:
        raise LabError(
            f"the packages of {release} hold no vmlinuz "
            f"(looked in {', '.join(map(str, candidates))})",
            f"delete {root} and try again, or pass --vmlinuz",
        )
    return LabKernel(release, vmlinuz, modules, origin)


def local_kernel(vmlinuz: Path, modules_dir: Path | None) -> LabKernel:
    """A kernel the user built: its bzImage and, optionally, its modules directory."""
    if not vmlinuz.is_file():
        raise LabError(
            f"--vmlinuz {vmlinuz} is not a file", "pass the bzImage (arch/x86/boot/bzImage)"
        )
    try:
        release = bzimage_release(vmlinuz)
    except ImageError as error:
        raise LabError(error.problem, error.fix) from None
    if modules_dir is not None:
        if not (modules_dir / "modules.dep").is_file():
            raise LabError(
                f"--modules-dir {modules_dir} has no modules.dep",
                "pass the <INSTALL_MOD_PATH>/lib/modules/<release> directory that "
                "`make modules_install` wrote (it runs depmod)",
            )
        if modules_dir.name != release:
            raise LabError(
                f"{vmlinuz} is kernel {release} but {modules_dir} holds modules of "
                f"{modules_dir.name}",
                "pass the modules directory built with that kernel",
            )
    return LabKernel(
        release,
        vmlinuz.resolve(),
        modules_dir.resolve() if modules_dir else None,
        f"local {vmlinuz.resolve()}",
    )


def check_kvm_modules(kernel: LabKernel) -> None:
    """Refuse, before booting, a kernel whose modules have no KVM or no kvm_amd.

    Only a kernel with a modules directory can be judged here (modules.dep and
    modules.builtin); one without is judged inside, where /dev/kvm exists or not.
    """
    if kernel.modules_dir is None:
        return
    names: set[str] = set()
    for listing in ("modules.dep", "modules.builtin"):
        try:
            text = (kernel.modules_dir / listing).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            path = line.split(":", 1)[0].strip()
            base = path.rsplit("/", 1)[-1].split(".ko", 1)[0]
            names.add(base.replace("-", "_"))
    if "kvm" not in names:
        raise LabError(
            f"kernel {kernel.release} has no KVM modules (no kvm in modules.dep or "
            "modules.builtin)",
            "build it with CONFIG_KVM=m (or y) and CONFIG_KVM_AMD",
        )
    if "kvm_amd" not in names:
        raise LabError(
            f"kernel {kernel.release} has KVM but no kvm_amd (the lab's CPU is TCG's AMD "
            "`-cpu max`, with SVM)",
            "build it with CONFIG_KVM_AMD=m (or y)",
        )
