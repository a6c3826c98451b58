"""A newer QEMU from Debian's archive, unpacked into a private prefix: nothing installed.

QEMU >= 10.1 (which has `tdx-guest`) is not built for Debian 12, but trixie-backports'
`qemu-system-x86` runs here through its own dynamic loader. This module resolves the
package's closure with apt-get pointed at a private sources list, lists, cache and an
*empty* dpkg status (so every dependency is resolved and nothing on the host is touched),
downloads it (`install --download-only`, apt verifying the Release signature and every
hash), unpacks each .deb with `dpkg-deb -x` into one prefix, and returns the argv prefix
that runs it:

    env QEMU_MODULE_DIR=P/usr/lib/x86_64-linux-gnu/qemu \\
        P/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \\
        --library-path P/usr/lib/x86_64-linux-gnu P/usr/bin/qemu-system-x86_64

QEMU_MODULE_DIR matters: Debian's QEMU also looks for its loadable modules (audio, usb,
virtio-gpu ...) in the compiled-in /usr/lib/x86_64-linux-gnu/qemu, where the host's
QEMU 10.0 keeps its own; loading one of those aborts 11.1 ("Only modules from the same
build can be loaded", then an assertion). The variable puts the prefix's modules first.
(A module the prefix lacks but the host has would still be found there; the two sets are
the same today.) Firmware is not relocated: a guest started this way uses the host's
/usr/share/qemu. The prefix is for introspection and command-line validation; it cannot
run a TD here anyway.

Signatures: trixie's Release files are signed with the "13/trixie" archive keys, which
Debian 12's debian-archive-keyring (2023.3+deb12u2) already ships in
/usr/share/keyrings/debian-archive-keyring.gpg; the sources list names that keyring with
`signed-by`, and signature checking is never turned off.

Layout under `$XDG_CACHE_HOME/cvmlab/qemu/`: `apt-<suite>/` (private apt state),
`<version>/` (a complete prefix with `cvmlab-prefix.json`), `<suite>.json` (which version
the suite resolved to, and when). A second call within a day reads that file and stats
the prefix: no apt, no network. A lock file serialises concurrent callers.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.archive_mirror import archive_mirror
from orchestrator.errors import QemuError

DEFAULT_SUITE = "trixie-backports"
DEFAULT_PACKAGE = "qemu-system-x86"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Re-resolve (and refresh the index) at most once a day unless asked.
RESOLVE_MAX_AGE_S = 24 * 3600
PREFIX_MANIFEST = "cvmlab-prefix.json"
LIBDIR = "usr/lib/x86_64-linux-gnu"
_APT_TIMEOUT_S = 900.0
# apt's own retries of a failed download (with growing delays between them).
APT_RETRIES = 3

Progress = Callable[[str], None]

# apt's words for "the network or the mirror is not there" (as opposed to a bad suite
# name or a signature problem, which must fail rather than skip).
_UNREACHABLE = re.compile(
    r"Could not resolve|Temporary failure resolving|Could not connect|Connection failed|"
    r"Connection timed out|Network is unreachable|No route to host|Unable to connect|"
    r"Connection refused|Something wicked happened resolving"
)
_SIGNATURE = re.compile(r"NO_PUBKEY|EXPKEYSIG|is not signed|signatures couldn't be verified")
_URI_LINE = re.compile(r"^'(?P<url>[^']+)' (?P<file>\S+) (?P<size>\d+)(?: (?P<hash>\S+))?\s*$")


class ArchiveUnreachable(QemuError):
    """Debian's archive cannot be reached (and no earlier download can stand in)."""


def stderr_progress(message: str) -> None:
    """Default progress sink: one `qemu: ...` line on stderr."""
    print(f"qemu: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/cvmlab/qemu` (default `~/.cache/cvmlab/qemu`), created 0700."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    path = root / "cvmlab" / "qemu"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class PrivateQemu:
    """An unpacked QEMU: where it is, which Debian version, and how to run it."""

    prefix: Path
    version: str  # Debian version of the package, e.g. "1:11.1.3+ds-1~bpo13+1"
    suite: str
    packages: dict[str, str]  # every unpacked package -> its version

    @property
    def libdir(self) -> Path:
        return self.prefix / LIBDIR

    @property
    def loader(self) -> Path:
        return self.libdir / "ld-linux-x86-64.so.2"

    @property
    def binary(self) -> Path:
        return self.prefix / "usr" / "bin" / "qemu-system-x86_64"

    @property
    def module_dir(self) -> Path:
        return self.libdir / "qemu"

    def command(self) -> list[str]:
        """The argv prefix that runs this QEMU (its last element is the QEMU binary)."""
        env = shutil.which("env") or "/usr/bin/env"
        return [
            env,
            f"QEMU_MODULE_DIR={self.module_dir}",
            str(self.loader),
            "--library-path",
            str(self.libdir),
            str(self.binary),
        ]

    def complete(self) -> bool:
        """The prefix is fully unpacked (its manifest is written last) and runnable."""
        return (self.prefix / PREFIX_MANIFEST).is_file() and all(
            path.is_file() for path in (self.loader, self.binary)
        )


def _dir_name(version: str) -> str:
    """A directory name for a Debian version: the epoch dropped ("11.1.3+ds-1~bpo13+1")."""
    name = version.split(":", 1)[-1]
    if not re.fullmatch(r"[A-Za-z0-9.+~-]+", name):
        raise QemuError(f"unexpected package version {version!r}", "report this")
    return name


def _load_prefix(directory: Path) -> PrivateQemu | None:
    try:
        data = json.loads((directory / PREFIX_MANIFEST).read_text())
        found = PrivateQemu(
            prefix=directory,
            version=str(data["version"]),
            suite=str(data["suite"]),
            packages={str(k): str(v) for k, v in data["packages"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return found if found.complete() else None


# --------------------------------------------------------------------------- private apt


class _PrivateApt:
    """apt-get confined to `root`, with the base suite and `suite` as sources."""

    def __init__(self, root: Path, suite: str, mirror: str) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", suite):
            raise QemuError(f"{suite!r} is not a Debian suite name", "e.g. trixie-backports")
        self.root = root
        self.suite = suite
        self.mirror = mirror
        self.stamp = root / "lists.updated"

    def suites(self) -> list[str]:
        """trixie-backports needs trixie for its dependencies; trixie needs nothing else."""
        base = self.suite.split("-", 1)[0]
        return [base] if base == self.suite else [base, self.suite]

    def prepare(self) -> None:
        for directory in ("lists/partial", "cache/archives/partial", "preferences.d", "sources.d"):
            (self.root / directory).mkdir(mode=0o700, parents=True, exist_ok=True)
        if not KEYRING.is_file():
            raise QemuError(
                f"{KEYRING} is missing: apt cannot check the archive's signatures",
                "install debian-archive-keyring (Debian 12's 2023.3+deb12u2 has trixie's keys)",
            )
        text = "".join(
            f"deb [signed-by={KEYRING}] {self.mirror} {suite} main\n" for suite in self.suites()
        )
        sources = self.root / "sources.list"
        if not sources.exists() or sources.read_text() != text:
            sources.write_text(text)
        (self.root / "status").touch()

    def options(self) -> list[str]:
        root = self.root
        settings = {
            "Dir::Etc::SourceList": root / "sources.list",
            "Dir::Etc::SourceParts": root / "sources.d",
            "Dir::Etc::Preferences": root / "preferences",
            "Dir::Etc::PreferencesParts": root / "preferences.d",
            "Dir::State::Lists": root / "lists",
            # Empty: apt believes nothing is installed, so it resolves the whole closure.
            "Dir::State::status": root / "status",
            "Dir::Cache": root / "cache",
            "Acquire::Languages": "none",
            "APT::Architectures": "amd64",
            "APT::Architecture": "amd64",
            "APT::Install-Recommends": "false",
            "APT::Install-Suggests": "false",
            "Acquire::Retries": APT_RETRIES,
        }
        options: list[str] = []
        for key, value in settings.items():
            options += ["-o", f"{key}={value}"]
        if os.geteuid() == 0:
            # Downloads land in a 0700 directory that apt's _apt user could not write.
            options += ["-o", "APT::Sandbox::User=root"]
        return options

    def run(self, args: list[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                ["apt-get", *self.options(), *args],
                capture_output=True,
                text=True,
                timeout=_APT_TIMEOUT_S,
                check=False,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"},
            )
        except FileNotFoundError as exc:
            raise QemuError(f"{what}: apt-get is missing", "run on a Debian host") from exc
        except subprocess.TimeoutExpired as exc:
            raise ArchiveUnreachable(
                f"{what} did not finish within {_APT_TIMEOUT_S:.0f} s",
                "check the network access to the Debian mirror and try again (another mirror: "
                "set CVMLAB_DEBIAN_MIRROR)",
            ) from exc

    def lists_age(self) -> float | None:
        try:
            return time.time() - self.stamp.stat().st_mtime
        except FileNotFoundError:
            return None

    def update(self, progress: Progress) -> None:
        """Refresh the index; ArchiveUnreachable or QemuError (signatures, bad suite)."""
        self.prepare()
        progress(f"refreshing the package index of {' + '.join(self.suites())}")
        result = self.run(["--error-on=any", "update"], f"apt-get update for {self.suite}")
        if result.returncode == 0:
            self.stamp.touch()
            return
        raise _apt_failure(result, f"cannot fetch the index of {self.suite} from {self.mirror}")


def _apt_failure(result: subprocess.CompletedProcess[str], what: str) -> QemuError:
    output = result.stdout + "\n" + result.stderr
    lines = [line.strip() for line in output.splitlines() if line.startswith(("E:", "W:", "Err:"))]
    reason = "; ".join(lines[:3]) or f"exit status {result.returncode}"
    if _SIGNATURE.search(output):
        return QemuError(
            f"{what}: the archive's signature does not verify ({reason})",
            f"update debian-archive-keyring so that {KEYRING} holds the suite's keys; "
            "signature checking stays on",
        )
    if _UNREACHABLE.search(output):
        return ArchiveUnreachable(
            f"{what}: the archive is unreachable ({reason})",
            "check the network access to the Debian mirror and try again (another mirror: "
                "set CVMLAB_DEBIAN_MIRROR)",
        )
    return QemuError(f"{what}: {reason}", "check the suite name, or run again with refresh")


@dataclass(frozen=True)
class _Deb:
    package: str
    version: str
    file: str
    size: int


def _parse_uris(text: str) -> list[_Deb]:
    """`apt-get install --print-uris` lines: 'URL' name_version_arch.deb size hash."""
    debs = []
    for line in text.splitlines():
        match = _URI_LINE.match(line.strip())
        if match is None:
            continue
        file_name = match.group("file")
        parts = urllib.parse.unquote(file_name).removesuffix(".deb").split("_")
        if len(parts) != 3:
            continue
        debs.append(_Deb(parts[0], parts[1], file_name, int(match.group("size"))))
    return debs


# --------------------------------------------------------------------------- the prefix


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    with (root / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pointer(root: Path, suite: str) -> Path:
    return root / f"{suite}.json"


def _read_pointer(root: Path, suite: str) -> tuple[PrivateQemu | None, float | None]:
    """The prefix the suite last resolved to (if still complete), and the age of that."""
    path = _pointer(root, suite)
    try:
        data = json.loads(path.read_text())
        found = _load_prefix(root / str(data["directory"]))
        return found, time.time() - float(data["resolved"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _write_pointer(root: Path, suite: str, qemu: PrivateQemu) -> None:
    path = _pointer(root, suite)
    tmp = path.with_suffix(".json.tmp")
    data = {"directory": qemu.prefix.name, "version": qemu.version, "resolved": time.time()}
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def _check_runs(command: list[str], version: str) -> str:
    """`qemu --version` through the loader; QemuError with its stderr if it does not run."""
    try:
        result = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuError(
            f"the unpacked QEMU {version} does not start: {exc}", "report this"
        ) from exc
    first = (result.stdout.splitlines() or [""])[0]
    if result.returncode != 0 or "QEMU emulator version" not in first:
        raise QemuError(
            f"the unpacked QEMU {version} does not start (status {result.returncode})",
            "run again with refresh; if it persists, a library is missing from the closure",
            detail=result.stderr.strip()[-2000:],
        )
    return first


def _unpack(
    root: Path, apt: _PrivateApt, debs: list[_Deb], version: str, progress: Progress
) -> PrivateQemu:
    target = root / _dir_name(version)
    if target.exists():
        shutil.rmtree(target)  # incomplete: we hold the lock, nobody else is writing it
    archives = apt.root / "cache" / "archives"
    scratch = Path(tempfile.mkdtemp(prefix=f".unpack-{_dir_name(version)}-", dir=root))
    try:
        progress(f"unpacking {len(debs)} packages into {target}")
        for deb in debs:
            path = archives / deb.file
            result = subprocess.run(
                ["dpkg-deb", "-x", str(path), str(scratch)],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if result.returncode != 0:
                raise QemuError(
                    f"cannot unpack {deb.file}: {result.stderr.strip()}",
                    "run again with refresh (the download may be damaged)",
                )
        scratch.chmod(0o755)
        unpacked = PrivateQemu(
            scratch, version, apt.suite, {deb.package: deb.version for deb in debs}
        )
        version_line = _check_runs(unpacked.command(), version)
        manifest = {
            "version": version,
            "suite": apt.suite,
            "packages": unpacked.packages,
            "version_line": version_line,
            "unpacked": time.time(),
        }
        (scratch / PREFIX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    for deb in debs:
        # The prefix is the cache now; the .debs would only double the disk use.
        (archives / deb.file).unlink(missing_ok=True)
    found = _load_prefix(target)
    if found is None:
        raise QemuError(f"{target} is incomplete after unpacking", "run again with refresh")
    progress(f"ready: {version_line} in {target}")
    return found


def _resolve(apt: _PrivateApt, package: str) -> list[_Deb]:
    result = apt.run(
        ["-q", "-y", "-t", apt.suite, "install", "--print-uris", package],
        f"resolving {package} in {apt.suite}",
    )
    if result.returncode != 0:
        raise _apt_failure(result, f"cannot resolve {package} in {apt.suite}")
    debs = _parse_uris(result.stdout)
    if not any(deb.package == package for deb in debs):
        raise QemuError(f"{apt.suite} has no installable {package}", "choose another suite")
    return debs


def _download(apt: _PrivateApt, package: str, debs: list[_Deb], progress: Progress) -> None:
    megabytes = sum(deb.size for deb in debs) / 1e6
    progress(f"downloading {len(debs)} packages ({megabytes:.0f} MB)")
    result = apt.run(
        ["-q", "-y", "-t", apt.suite, "install", "--download-only", package],
        f"downloading {package}",
    )
    if result.returncode != 0:
        raise _apt_failure(result, f"cannot download {package} from {apt.suite}")


def private_qemu(
    suite: str = DEFAULT_SUITE,
    *,
    refresh: bool = False,
    mirror: str | None = None,
    progress: Progress = stderr_progress,
) -> PrivateQemu:
    """QEMU from `suite` (default trixie-backports) in a private prefix, fetched if needed.

    Within a day of the last resolution (and unless `refresh`), this only reads a small
    JSON file and stats the prefix. Otherwise it refreshes the index, resolves the newest
    `qemu-system-x86`, and downloads and unpacks it unless that version is already there.
    When the archive cannot be reached but an earlier prefix is complete, that prefix is
    used (and said so); with none, ArchiveUnreachable. Other failures are QemuError.
    """
    root = cache_root()
    with _locked(root):
        cached, age = _read_pointer(root, suite)
        if cached is not None and age is not None and age < RESOLVE_MAX_AGE_S and not refresh:
            return cached
        chosen = archive_mirror(mirror)
        tag = hashlib.sha256(chosen.encode()).hexdigest()[:8]
        apt = _PrivateApt(root / f"apt-{suite}-{tag}", suite, chosen)
        try:
            lists_age = apt.lists_age()
            if refresh or lists_age is None or lists_age >= RESOLVE_MAX_AGE_S:
                apt.update(progress)
            debs = _resolve(apt, DEFAULT_PACKAGE)
        except ArchiveUnreachable as error:
            if cached is None:
                raise
            progress(f"{error.problem}; using the cached QEMU {cached.version}")
            return cached
        version = next(deb.version for deb in debs if deb.package == DEFAULT_PACKAGE)
        found = _load_prefix(root / _dir_name(version))
        if found is None:
            progress(f"{apt.suite} has {DEFAULT_PACKAGE} {version}")
            _download(apt, DEFAULT_PACKAGE, debs, progress)
            found = _unpack(root, apt, debs, version, progress)
        _write_pointer(root, suite, found)
        return found


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m orchestrator.qemu.private_build`: print the argv prefix as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.qemu.private_build",
        description="Fetch QEMU from a newer Debian suite into a private prefix (cached) "
        "and print the command that runs it, as a JSON list.",
    )
    parser.add_argument("--suite", default=DEFAULT_SUITE, help=f"[{DEFAULT_SUITE}]")
    parser.add_argument("--refresh", action="store_true", help="re-resolve now (else daily)")
    args = parser.parse_args(argv)
    try:
        qemu = private_qemu(args.suite, refresh=args.refresh)
    except QemuError as error:
        print(f"cvmlab: {error}", file=sys.stderr)
        return 2
    print(json.dumps(qemu.command()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
