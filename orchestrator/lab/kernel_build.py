"""Kernels from source: the lab's sw-protected kernel, built from Debian's `linux-source-<series>`.

No Debian kernel enables `CONFIG_KVM_SW_PROTECTED_VM`, so private memory for plain VMs
(`KVM_X86_SW_PROTECTED_VM`, `KVM_SET_MEMORY_ATTRIBUTES`) and the upstream private-memory
selftests need a kernel of our own. This module builds it:

1. the source: `linux-source-<series>` from the Debian suite that carries it (through the
   project's private apt, nothing installed), unpacked once under the kernel cache; or a
   user's tree (`--tree DIR`);
2. the config: `make defconfig kvm_guest.config`, then `FRAGMENT` (what the lab needs built
   in, modules off, what the lab never uses trimmed away) with `scripts/config`, then
   `make olddefconfig`; every symbol of the fragment is checked in the final `.config`, so
   a symbol that Kconfig dropped (unmet dependency, renamed) is an error naming it, not a
   kernel that silently lacks it;
3. `nice -n 19 make -jN bzImage` (the machine is shared) in a separate object directory,
   with progress lines (phase, elapsed, files compiled) and the whole output in a log whose
   tail is shown on failure.

A build from the archive is cached under `kernels/` of the cvmlab cache
(`$CVMLAB_KERNEL_CACHE` overrides), keyed by the hash of its inputs: the source package
(name, version, sha256), the fragment, the compiler and linker versions and `RECIPE`.
Same inputs, same key: a cache hit builds nothing. A user's tree cannot be hashed cheaply,
so its object directory is kept and `make` (incremental) runs every time.

    cvmlab lab kernel build [--series 7.3] [--tree DIR] [--jobs N] [--force]
    python -m orchestrator.lab.kernel_build [same options]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from orchestrator.errors import CvmlabError, LabError
from orchestrator.image.builder import apt_for_suite, cache_root
from orchestrator.image.debian import extract_deb, sha256_file
from orchestrator.image.kernel import bzimage_release

Progress = Callable[[str], None]

#: Bumped when the build recipe changes in a way the other inputs do not capture.
RECIPE = 1
#: The series the sw-protected kernel is built from (the lab's `--kernel sw-protected`).
SW_PROTECTED_SERIES = "7.3"
#: The release suffix (`uname -r` = `7.3.4-cvmlab-sw-protected`): says what the lab booted.
LOCALVERSION = "-cvmlab-sw-protected"
CACHE_ENV = "CVMLAB_KERNEL_CACHE"
#: Suites searched for `linux-source-<series>`, first hit wins (6.12 is bookworm-backports').
SOURCE_SUITES = ("bookworm-backports", "trixie-backports", "trixie", "bookworm")
BUILD_TOOLS = ("make", "gcc", "ld", "flex", "bison", "bc", "nice", "tar")
SETUP_FIX = "run ci/setup-host.sh (it installs flex, bison, libelf-dev, bc, libssl-dev)"
BASE_TARGETS = ("defconfig", "kvm_guest.config")
#: Seconds between progress lines while make runs.
PROGRESS_EVERY_S = 30.0
#: A build that takes longer than this is stopped (a 2-core machine took 12 min untrimmed).
BUILD_TIMEOUT_S = 3 * 3600.0
LOG_TAIL_LINES = 25

#: Kconfig symbols the lab needs built in ("y") and what it never uses ("n"), in the order
#: `scripts/config` applies them. Checked after `olddefconfig`.
FRAGMENT: tuple[tuple[str, str], ...] = (
    # KVM with private memory for plain VMs (KVM_X86_SW_PROTECTED_VM needs EXPERT).
    ("EXPERT", "y"),
    ("VIRTUALIZATION", "y"),
    ("KVM", "y"),
    ("KVM_AMD", "y"),
    ("KVM_SW_PROTECTED_VM", "y"),
    # The lab's machine: virtio devices, 9p for the host's root and the checkout.
    ("VIRTIO_PCI", "y"),
    ("VIRTIO_CONSOLE", "y"),
    ("VIRTIO_NET", "y"),
    ("VIRTIO_BLK", "y"),
    ("VIRTIO_BALLOON", "y"),
    ("MEMORY_HOTPLUG", "y"),
    ("MEMORY_HOTREMOVE", "y"),
    ("VIRTIO_MEM", "y"),
    ("VSOCKETS", "y"),
    ("VIRTIO_VSOCKETS", "y"),
    ("NET_9P", "y"),
    ("NET_9P_VIRTIO", "y"),
    ("9P_FS", "y"),
    ("9P_FS_POSIX_ACL", "y"),
    ("OVERLAY_FS", "y"),
    # What the scenarios and the selftests use inside.
    ("NUMA", "y"),
    ("CGROUPS", "y"),
    ("MEMCG", "y"),
    ("IO_URING", "y"),
    ("EVENTFD", "y"),
    ("USERFAULTFD", "y"),
    ("TRANSPARENT_HUGEPAGE", "y"),
    ("HUGETLBFS", "y"),
    ("KSM", "y"),
    ("IDLE_PAGE_TRACKING", "y"),
    ("DEVTMPFS", "y"),
    ("DEVTMPFS_MOUNT", "y"),
    ("TMPFS", "y"),
    ("TMPFS_POSIX_ACL", "y"),
    ("BLK_DEV_INITRD", "y"),
    ("SERIAL_8250", "y"),
    ("SERIAL_8250_CONSOLE", "y"),
    ("PVPANIC", "y"),
    ("PVPANIC_PCI", "y"),
    # /proc/config.gz: the kernel says itself how it was built.
    ("IKCONFIG", "y"),
    ("IKCONFIG_PROC", "y"),
    ("DEBUG_INFO_NONE", "y"),
    # One file to boot: no modules.
    ("MODULES", "n"),
    # Never used by the lab (its guest has no display, sound, USB, radio or disks).
    ("DRM", "n"),
    ("FB", "n"),
    ("SOUND", "n"),
    ("USB_SUPPORT", "n"),
    ("WLAN", "n"),
    ("WIRELESS", "n"),
    ("CFG80211", "n"),
    ("RFKILL", "n"),
    ("ETHERNET", "n"),
    ("NETFILTER", "n"),
    ("NFS_FS", "n"),
    ("NFSD", "n"),
    ("ATA", "n"),
    ("MD", "n"),
    ("AGP", "n"),
    ("INPUT_JOYSTICK", "n"),
    ("INPUT_TABLET", "n"),
    ("INPUT_TOUCHSCREEN", "n"),
    ("HIBERNATION", "n"),
    ("SECURITY_SELINUX", "n"),
    ("AUDIT", "n"),
)


class KernelBuildError(LabError):
    """A kernel (or its selftests) could not be fetched, configured or built."""


# --------------------------------------------------------------------------- the config


def fragment_text(fragment: Sequence[tuple[str, str]] | None = None) -> str:
    """The fragment as `.config` lines: part of the cache key and written beside the kernel."""
    fragment = FRAGMENT if fragment is None else fragment
    lines = [f'CONFIG_LOCALVERSION="{LOCALVERSION}"']
    for symbol, value in fragment:
        lines.append(
            f"# CONFIG_{symbol} is not set" if value == "n" else f"CONFIG_{symbol}={value}"
        )
    return "\n".join(lines) + "\n"


def scripts_config_argv(
    source: Path, config: Path, fragment: Sequence[tuple[str, str]] | None = None
) -> list[str]:
    """`scripts/config` applying the fragment to `config` (argv, no shell)."""
    fragment = FRAGMENT if fragment is None else fragment
    argv = [str(source / "scripts" / "config"), "--file", str(config)]
    argv += ["--set-str", "LOCALVERSION", LOCALVERSION, "-d", "LOCALVERSION_AUTO"]
    for symbol, value in fragment:
        if value == "y":
            argv += ["-e", symbol]
        elif value == "n":
            argv += ["-d", symbol]
        elif value == "m":
            argv += ["-m", symbol]
        else:
            argv += ["--set-val", symbol, value]
    return argv


def parse_config(text: str) -> dict[str, str]:
    """A `.config` as {symbol: value}; `# CONFIG_X is not set` is "n", quotes are kept."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        unset = re.fullmatch(r"# CONFIG_(\w+) is not set", line.strip())
        if unset:
            values[unset.group(1)] = "n"
            continue
        match = re.fullmatch(r"CONFIG_(\w+)=(.*)", line.strip())
        if match:
            values[match.group(1)] = match.group(2)
    return values


def config_mismatches(
    config_text: str, fragment: Sequence[tuple[str, str]] | None = None
) -> list[str]:
    """Symbols of the fragment the final `.config` does not have as asked ("KVM_AMD=n, wanted y").

    A symbol absent from `.config` is "n" to Kconfig: right for "n", wrong for anything else.
    """
    values = parse_config(config_text)
    wrong = []
    for symbol, wanted in FRAGMENT if fragment is None else fragment:
        seen = values.get(symbol, "n")
        if seen != wanted:
            shown = "absent" if symbol not in values else seen
            wrong.append(f"{symbol}={shown}, wanted {wanted}")
    return wrong


# --------------------------------------------------------------------------- where things live


def kernel_cache() -> Path:
    """`$CVMLAB_KERNEL_CACHE`, or `kernels/` in the cvmlab cache; created 0700."""
    override = os.environ.get(CACHE_ENV, "")
    path = Path(override) if override else cache_root() / "kernels"
    if override and not path.is_absolute():
        raise KernelBuildError(
            f"{CACHE_ENV}={override} is not an absolute path",
            f"set {CACHE_ENV} to one, or unset it",
        )
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str, progress: Progress) -> Iterator[None]:
    """An exclusive flock on `locks/<name>`: two builders of one thing build it once."""
    locks = kernel_cache() / "locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    with (locks / f"{name}.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another cvmlab building {name}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def digest(inputs: dict[str, Any]) -> str:
    """A short, stable hash of a JSON-able dict of inputs (the cache key)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def tool_versions() -> dict[str, str]:
    """First line of `gcc --version` and `ld --version`: a new compiler is a new kernel."""
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        raise KernelBuildError(f"building a kernel needs {', '.join(missing)}", SETUP_FIX)
    versions = {}
    for tool in ("gcc", "ld"):
        out = subprocess.run(
            [tool, "--version"], capture_output=True, text=True, check=False, timeout=30
        )
        versions[tool] = (out.stdout.splitlines() or ["unknown"])[0].strip()
    return versions


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class KernelSource:
    """An unpacked kernel tree and what identifies it for the cache."""

    tree: Path
    series: str
    #: {"package", "version", "sha256", "suite"} for the archive; {"tree", "kernelversion"}.
    identity: dict[str, str]

    @property
    def from_archive(self) -> bool:
        return "sha256" in self.identity


def check_series(series: str) -> None:
    """A series is "<major>.<minor>" (what follows `linux-source-`)."""
    if not re.fullmatch(r"\d+\.\d+", series):
        raise KernelBuildError(
            f"{series!r} is not a kernel series", "give <major>.<minor>, e.g. --series 7.3"
        )


def archive_series(progress: Progress) -> dict[str, str]:
    """Every `linux-source-<series>` the searched suites carry: {series: suite}."""
    found: dict[str, str] = {}
    for suite in SOURCE_SUITES:
        apt = apt_for_suite(suite)
        apt.ensure_lists(False, progress)
        for name in apt.package_names("linux-source-"):
            series = name.removeprefix("linux-source-")
            if re.fullmatch(r"\d+\.\d+", series):
                found.setdefault(series, suite)
    return found


def _series_key(series: str) -> tuple[int, ...]:
    return tuple(int(part) for part in series.split("."))


def unknown_series_error(series: str, available: dict[str, str]) -> KernelBuildError:
    """The error for a series no suite carries, listing the ones that exist."""
    listed = ", ".join(f"{name} ({available[name]})" for name in sorted(available, key=_series_key))
    return KernelBuildError(
        f"no suite of the archive has linux-source-{series}",
        f"choose one of: {listed or 'none found (is the archive reachable?)'}",
    )


def fetch_source(series: str, progress: Progress) -> KernelSource:
    """Download and unpack `linux-source-<series>` (once; later calls reuse the tree)."""
    check_series(series)
    name = f"linux-source-{series}"
    for suite in SOURCE_SUITES:
        apt = apt_for_suite(suite)
        apt.ensure_lists(False, progress)
        package = apt.show(name)
        if package is None:
            continue
        identity = {
            "package": package.name,
            "version": package.version,
            "sha256": package.sha256,
            "suite": suite,
        }
        root = kernel_cache() / "src" / f"{package.name}_{package.version}"
        tree = root / name
        stamp = root / "unpacked.json"
        with cache_lock(f"src-{package.name}", progress):
            if not _stamp_matches(stamp, identity):
                deb = apt.download(package, cache_root() / "debs", progress)
                _unpack_source(deb, root, name, progress)
                stamp.write_text(json.dumps(identity, indent=2) + "\n")
        return KernelSource(tree, series, identity)
    raise unknown_series_error(series, archive_series(progress))


def _stamp_matches(stamp: Path, identity: dict[str, str]) -> bool:
    try:
        return bool(json.loads(stamp.read_text()) == identity)
    except (OSError, ValueError):
        return False


def _unpack_source(deb: Path, root: Path, name: str, progress: Progress) -> None:
    """The .deb holds `usr/src/<name>.tar.xz`: unpack that tarball to `root/<name>`."""
    started = time.monotonic()
    progress(f"unpacking {deb.name}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(mode=0o700, parents=True)
    with tempfile.TemporaryDirectory(prefix="deb-", dir=root) as scratch:
        extract_deb(deb, Path(scratch))
        tarball = Path(scratch) / "usr" / "src" / f"{name}.tar.xz"
        if not tarball.exists():
            raise KernelBuildError(
                f"{deb.name} has no usr/src/{name}.tar.xz", f"delete {deb} and try again"
            )
        result = subprocess.run(
            ["tar", "-xf", str(tarball), "-C", str(root)],
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        if result.returncode != 0 or not (root / name / "Makefile").exists():
            raise KernelBuildError(
                f"cannot unpack {tarball.name}: {result.stderr.strip() or 'no Makefile in it'}",
                f"delete {deb} and try again",
            )
    progress(f"unpacked {name} in {_elapsed(time.monotonic() - started)}")


def kernelversion(tree: Path) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL[EXTRAVERSION] from a tree's top Makefile."""
    try:
        head = (tree / "Makefile").read_text(errors="replace")[:4096]
    except OSError:
        head = ""
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION) *= *(\S*)", head, re.M))
    if not {"VERSION", "PATCHLEVEL"} <= fields.keys():
        return ""
    return (
        f"{fields['VERSION']}.{fields['PATCHLEVEL']}.{fields.get('SUBLEVEL') or 0}"
        f"{fields.get('EXTRAVERSION', '')}"
    )


def user_tree(path: Path) -> KernelSource:
    """A user's kernel tree, checked: a top Makefile with a version, Kconfig, arch/x86, clean."""
    tree = path.expanduser().resolve()
    if not tree.is_dir():
        raise KernelBuildError(f"{path} is not a directory", "give --tree a kernel source tree")
    version = kernelversion(tree)
    if not version or not (tree / "Kconfig").exists() or not (tree / "arch" / "x86").is_dir():
        raise KernelBuildError(
            f"{path} is not a Linux kernel source tree (no top Makefile with VERSION and "
            "PATCHLEVEL, Kconfig and arch/x86/)",
            "give --tree the top directory of a kernel checkout",
        )
    if (tree / ".config").exists() or (tree / "include" / "config").is_dir():
        # kbuild refuses an O= build over a tree configured in place.
        raise KernelBuildError(
            f"{path} has an in-tree build (.config or include/config)",
            f"run `make -C {tree} mrproper` (cvmlab builds in its own object directory)",
        )
    series = ".".join(version.split(".")[:2])
    return KernelSource(tree, series, {"tree": str(tree), "kernelversion": version})


# --------------------------------------------------------------------------- running make


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a build log (what a failure shows)."""
    try:
        with log.open("rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 64 * 1024))
            text = stream.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _count_compiled(stream: IO[bytes]) -> int:
    """Compile steps in the log since the last call: kbuild's "  CC "/"  AS " lines, and
    the full `gcc ... -c` commands that the selftests' Makefiles echo."""
    return sum(
        1
        for line in stream.read().splitlines()
        if line.startswith((b"  CC ", b"  AS ")) or (line.startswith(b"gcc ") and b" -c " in line)
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End make and everything it started (its own process group), by its pid."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_logged(
    argv: list[str],
    log: Path,
    phase: str,
    progress: Progress,
    *,
    timeout: float = BUILD_TIMEOUT_S,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> float:
    """Run `argv` (niced) appending its output to `log`; progress lines every 30 s.

    Returns the seconds it took. A non-zero exit is a KernelBuildError whose detail is the
    log's tail; a timeout, an exception or Ctrl-C stops the whole process group first.
    """
    started = time.monotonic()
    progress(f"{phase}: started (log: {log})")
    with log.open("ab") as out, log.open("rb") as reader:
        out.write(f"\n### {phase}: {' '.join(argv)}\n".encode())
        out.flush()
        reader.seek(0, os.SEEK_END)
        proc = subprocess.Popen(
            ["nice", "-n", "19", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,  # one group: make's children are stopped with it
        )
        compiled = 0
        try:
            while True:
                spent = time.monotonic() - started
                if spent > timeout:
                    _stop(proc)
                    raise KernelBuildError(
                        f"{phase} did not finish in {_elapsed(timeout)}",
                        f"see {log}; a loaded machine may need more time",
                        detail=log_tail(log),
                    )
                try:
                    proc.wait(timeout=min(PROGRESS_EVERY_S, max(1.0, timeout - spent)))
                    break
                except subprocess.TimeoutExpired:
                    compiled += _count_compiled(reader)
                    progress(
                        f"{phase}: {_elapsed(time.monotonic() - started)}, "
                        f"{compiled} files compiled"
                    )
        finally:
            _stop(proc)
    took = time.monotonic() - started
    if proc.returncode != 0:
        raise KernelBuildError(
            f"{phase} failed (exit status {proc.returncode}) after {_elapsed(took)}",
            f"the full log is {log}",
            detail=log_tail(log),
        )
    progress(f"{phase}: done in {_elapsed(took)}")
    return took


# --------------------------------------------------------------------------- the build


@dataclass(frozen=True)
class BuiltKernel:
    """A built kernel in the cache: its bzImage, `.config`, log and manifest."""

    directory: Path

    @property
    def bzimage(self) -> Path:
        return self.directory / "bzImage"

    @property
    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.directory / "manifest.json").read_text())
        return data


def build_inputs(source: KernelSource, tools: dict[str, str]) -> dict[str, Any]:
    """What the kernel depends on (the cache key's contents)."""
    return {
        "recipe": RECIPE,
        "source": source.identity,
        "base": list(BASE_TARGETS),
        "fragment": fragment_text(),
        "tools": tools,
    }


def _children_cpu() -> float:
    """User + system seconds of every child process this one has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def configure(source: KernelSource, objects: Path, log: Path, progress: Progress) -> str:
    """Write `objects/.config`: the base targets, FRAGMENT, olddefconfig; return its text.

    Raises KernelBuildError naming every symbol of FRAGMENT that Kconfig did not keep.
    """
    make = ["make", "-C", str(source.tree), f"O={objects}"]
    run_logged([*make, *BASE_TARGETS], log, "configure (defconfig + kvm_guest.config)", progress)
    run_logged(scripts_config_argv(source.tree, objects / ".config"), log, "fragment", progress)
    run_logged([*make, "olddefconfig"], log, "olddefconfig", progress)
    config_text = (objects / ".config").read_text()
    wrong = config_mismatches(config_text)
    if wrong:
        raise KernelBuildError(
            f"the kernel config lost what the lab needs: {'; '.join(wrong)}",
            f"this source lacks those symbols or their dependencies; see {objects / '.config'}",
        )
    return config_text


def build_kernel(
    source: KernelSource, progress: Progress, jobs: int | None = None, force: bool = False
) -> BuiltKernel:
    """Configure and build `source` with the lab's fragment; return the cached result."""
    inputs = build_inputs(source, tool_versions())
    key = digest(inputs)
    label = f"linux-{source.identity.get('version') or source.identity['kernelversion']}"
    name = f"sw-protected-{source.series}-{key}"
    final = kernel_cache() / name
    jobs = jobs or os.cpu_count() or 1
    with cache_lock(name, progress):
        if force:
            shutil.rmtree(final, ignore_errors=True)
        if source.from_archive and (final / "manifest.json").exists():
            progress(f"kernel {label} (sw-protected) is cached: {final / 'bzImage'}")
            return BuiltKernel(final)
        # The object directory of an archive build is dropped after success (its key
        # never changes again); a tree's is kept for incremental rebuilds.
        objects = kernel_cache() / "build" / name
        if force:
            shutil.rmtree(objects, ignore_errors=True)
        objects.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = objects / "build.log"
        log.write_text(f"cvmlab kernel build {name}\n{json.dumps(inputs, indent=2)}\n")
        timings: dict[str, float] = {}
        progress(f"building {label} (sw-protected) with {jobs} jobs in {objects}")
        started = time.monotonic()
        config_text = configure(source, objects, log, progress)
        timings["configure"] = time.monotonic() - started
        make = ["make", "-C", str(source.tree), f"O={objects}", f"-j{jobs}", "bzImage"]
        cpu_before = _children_cpu()
        timings["bzImage"] = run_logged(make, log, "build bzImage", progress)
        # CPU time as well as wall: on a shared machine the wall time says more about the
        # neighbours than about the kernel.
        timings["bzImage_cpu"] = _children_cpu() - cpu_before
        bzimage = objects / "arch" / "x86" / "boot" / "bzImage"
        return _publish(final, objects, bzimage, config_text, log, inputs, timings, source)


def _publish(
    final: Path,
    objects: Path,
    bzimage: Path,
    config_text: str,
    log: Path,
    inputs: dict[str, Any],
    timings: dict[str, float],
    source: KernelSource,
) -> BuiltKernel:
    """Copy the bzImage, config and log into the cache dir (atomically), with a manifest."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=final.parent))
    try:
        shutil.copy2(bzimage, staging / "bzImage")
        (staging / "config").write_text(config_text)
        (staging / "fragment.config").write_text(fragment_text())
        shutil.copy2(log, staging / "build.log")
        manifest = {
            "release": bzimage_release(staging / "bzImage"),
            "series": source.series,
            "inputs": inputs,
            "seconds": {phase: round(took, 1) for phase, took in timings.items()},
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "bzimage_sha256": sha256_file(staging / "bzImage"),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if source.from_archive:
        shutil.rmtree(objects, ignore_errors=True)
    return BuiltKernel(final)


def ensure_sw_protected_kernel(progress: Progress) -> Path:
    """The lab's sw-protected bzImage (`linux-source-7.3` + FRAGMENT), built if absent."""
    source = fetch_source(SW_PROTECTED_SERIES, progress)
    return build_kernel(source, progress).bzimage


# --------------------------------------------------------------------------- command line


def _printer(prefix: str) -> Progress:
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"{prefix} [{_elapsed(time.monotonic() - started)}] {line}", flush=True)

    return say


def parser() -> argparse.ArgumentParser:
    """`cvmlab lab kernel build`'s options."""
    cli = argparse.ArgumentParser(
        prog="cvmlab lab kernel build",
        description="Build the lab's sw-protected kernel (CONFIG_KVM_SW_PROTECTED_VM, what the "
        "lab needs built in, no modules) from Debian's linux-source-<series> or from your "
        "tree, and print its bzImage. Cached by the hash of its inputs.",
    )
    cli.add_argument(
        "--series",
        default=SW_PROTECTED_SERIES,
        help=f"linux-source-<series> from the archive [{SW_PROTECTED_SERIES}]",
    )
    cli.add_argument("--tree", type=Path, help="build this kernel source tree instead")
    cli.add_argument("--jobs", "-j", type=int, help="parallel make jobs [number of CPUs]")
    cli.add_argument("--force", action="store_true", help="rebuild even if cached")
    return cli


def chosen_source(
    tree: Path | None, series: str, jobs: int | None, progress: Progress
) -> KernelSource:
    """The source the options name (`--tree` or `--series`), after checking `--jobs`."""
    if jobs is not None and jobs < 1:
        raise KernelBuildError(f"--jobs {jobs} is not a positive number", "e.g. --jobs 2")
    return user_tree(tree) if tree else fetch_source(series, progress)


def print_error(error: CvmlabError) -> int:
    """Print a user's error as cvmlab does (one line, then its evidence); exit status 2."""
    print(f"cvmlab: error: {error}", file=sys.stderr)
    if error.detail:
        print(error.detail.rstrip(), file=sys.stderr)
    return 2


def kernel_build_main(argv: list[str]) -> int:
    """`cvmlab lab kernel build [--series S] [--tree DIR] [--jobs N] [--force]`: 0 when built."""
    args = parser().parse_args(argv)
    progress = _printer("kernel build")
    try:
        source = chosen_source(args.tree, args.series, args.jobs, progress)
        built = build_kernel(source, progress, jobs=args.jobs, force=args.force)
    except CvmlabError as error:
        return print_error(error)
    manifest = built.manifest
    seconds = manifest.get("seconds", {})
    took = ""
    if "bzImage" in seconds:
        took = f" (bzImage built in {_elapsed(seconds['bzImage'])} wall"
        if "bzImage_cpu" in seconds:
            took += f", {_elapsed(seconds['bzImage_cpu'])} CPU"
        took += ")"
    progress(f"kernel {manifest['release']}{took}")
    print(built.bzimage)
    return 0


if __name__ == "__main__":
    sys.exit(kernel_build_main(sys.argv[1:]))
