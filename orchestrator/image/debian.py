"""Debian packages for the image: the archive (through a private apt) and the host's dpkg.

Kernel packages come from the Debian archive with `apt-get download` pointed at a private
sources list, lists dir, cache dir and an empty dpkg status, all under cvmlab's cache:
nothing is installed and the host's apt state is never touched. The lists are refreshed at
most once a day (or on request), so resolving "the newest kernel" on a cache hit needs no
network. Userland binaries (busybox, dropbear, sftp-server) come from packages installed on
the host; dpkg tells their exact versions.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.archive_mirror import archive_mirror
from orchestrator.errors import ImageError

DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Refresh the private apt lists when they are older than this (or on --refresh).
LISTS_MAX_AGE_S = 24 * 3600
SETUP_FIX = "run ci/setup-host.sh"
_HOST_TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query", "dpkg")
_APT_TIMEOUT_S = 600

Progress = Callable[[str], None]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's contents, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_debian_host() -> None:
    """Raise ImageError unless this host has dpkg and apt (the image is built from .debs)."""
    missing = [tool for tool in _HOST_TOOLS if shutil.which(tool) is None]
    if missing or not Path("/etc/debian_version").exists():
        what = f"missing {', '.join(missing)}" if missing else "no /etc/debian_version"
        raise ImageError(
            f"the image builder needs a Debian host with apt and dpkg ({what})",
            "build images on Debian 12 after running ci/setup-host.sh, or copy a built image "
            "directory from such a host",
        )


def _run(argv: list[str], what: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a host tool, capturing its output; ImageError if it cannot start or times out."""
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: {argv[0]} not found", SETUP_FIX) from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageError(
            f"{what}: {argv[0]} did not finish in {timeout:.0f} s", "try again"
        ) from exc


# --------------------------------------------------------------------------- host packages


def host_package_versions(packages: Iterable[str]) -> dict[str, str]:
    """Installed versions of host packages; ImageError naming the first one not installed."""
    wanted = sorted(set(packages))
    if not wanted:
        return {}
    result = _run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Status}\t${Version}\n", *wanted],
        "querying host packages",
    )
    versions: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, _, rest = line.partition("\t")
        status, _, version = rest.partition("\t")
        if status == "install ok installed" and version:
            versions[name.split(":")[0]] = version
    for package in wanted:
        if package.split(":")[0] not in versions:
            raise ImageError(f"host package {package} is not installed", SETUP_FIX)
    return {package: versions[package.split(":")[0]] for package in wanted}


def _usrmerge_aliases(path: Path) -> list[str]:
    """dpkg may have registered /lib/x or /usr/lib/x: the same file on a merged-/usr host."""
    text = str(path)
    aliases = [text]
    for short in ("/lib/", "/lib64/", "/bin/", "/sbin/"):
        if text.startswith(short):
            aliases.append("/usr" + text)
        if text.startswith("/usr" + short):
            aliases.append(text[len("/usr") :])
    return aliases


def host_packages_owning(paths: Iterable[Path]) -> dict[Path, str]:
    """Map each host file to the package that ships it (without ':arch'), via `dpkg -S`."""
    wanted = {alias: path for path in paths for alias in _usrmerge_aliases(path)}
    result = _run(["dpkg", "-S", *wanted], "finding the packages of the image's libraries")
    owners: dict[Path, str] = {}
    for line in result.stdout.splitlines():
        # "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6"; diversions start with "diversion by".
        packages, sep, file_name = line.partition(": ")
        if not sep or file_name not in wanted or packages.startswith("diversion"):
            continue
        first = packages.split(",")[0].strip()
        owners.setdefault(wanted[file_name], first.split(":")[0])
    missing = sorted(str(p) for p in set(wanted.values()) - owners.keys())
    if missing:
        raise ImageError(
            f"no installed package owns {', '.join(missing)}",
            f"reinstall the packages that ship them, or {SETUP_FIX}",
        )
    return owners


_LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(/\S+) \(0x[0-9a-f]+\)$")


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries and the dynamic loader `ldd` names for `binary` (empty if static)."""
    result = _run(["ldd", str(binary)], f"listing the libraries of {binary}")
    if result.returncode != 0:
        # ldd says "not a dynamic executable" (exit 1) for static binaries.
        if "not a dynamic executable" in result.stdout + result.stderr:
            return []
        raise ImageError(f"ldd failed on {binary}: {result.stderr.strip()}", SETUP_FIX)
    libraries: list[Path] = []
    for line in result.stdout.splitlines():
        if "not found" in line:
            raise ImageError(f"{binary} needs a library that is missing: {line.strip()}", SETUP_FIX)
        match = _LDD_LINE.match(line)
        if match:
            libraries.append(Path(match.group(2)))
    return libraries


# --------------------------------------------------------------------------- the archive


@dataclass(frozen=True)
class ArchivePackage:
    """One version of a package in the archive, as its Packages index describes it."""

    name: str
    version: str
    sha256: str
    size: int
    filename: str
    depends: str

    @property
    def deb_name(self) -> str:
        return Path(self.filename).name


def _parse_stanza(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith((" ", "\t")) and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


class PrivateApt:
    """apt-get/apt-cache confined to `root`: its own sources list, lists, cache and status.

    `root` holds `sources.list`, `lists/`, `cache/`, an empty `status` and a `lock` file;
    every operation that writes there holds an exclusive flock on `lock`, so concurrent
    builders share one set of lists and one download of each .deb.
    """

    def __init__(self, root: Path, suite: str, mirror: str | None = None) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", suite):
            raise ImageError(f"{suite!r} is not a Debian suite name", "e.g. bookworm-backports")
        self.root = root
        self.suite = suite
        # None: the mirror the host's apt uses ($CVMLAB_DEBIAN_MIRROR overrides).
        self.mirror = archive_mirror(mirror)
        self._lists = root / "lists"
        self._stamp = root / "lists.updated"

    def _prepare(self) -> None:
        for directory in (
            self.root,
            self._lists / "partial",
            self.root / "cache" / "archives" / "partial",
            self.root / "preferences.d",
            self.root / "sources.list.d",
        ):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        signed = f"[signed-by={DEBIAN_KEYRING}] " if DEBIAN_KEYRING.exists() else ""
        line = f"deb {signed}{self.mirror} {self.suite} main\n"
        sources = self.root / "sources.list"
        if not sources.exists() or sources.read_text() != line:
            sources.write_text(line)
        (self.root / "status").touch()

    def _options(self) -> list[str]:
        root = self.root
        settings = {
            "Dir::Etc::SourceList": root / "sources.list",
            "Dir::Etc::SourceParts": root / "sources.list.d",
            "Dir::Etc::Preferences": root / "preferences",
            "Dir::Etc::PreferencesParts": root / "preferences.d",
            "Dir::State::Lists": self._lists,
            "Dir::State::status": root / "status",
            "Dir::Cache": root / "cache",
            # Downloads go to a directory only root can read; apt's _apt user could not.
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
            "Acquire::Languages": "none",
            # apt's default (3 retries with backoff) turns "archive unreachable" into 7 s.
            "Acquire::Retries": "1",
            "APT::Architectures": "amd64",
            "APT::Architecture": "amd64",
        }
        options: list[str] = []
        for key, value in settings.items():
            if value != "":
                options += ["-o", f"{key}={value}"]
        return options

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (self.root / "lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def lists_age(self) -> float | None:
        """Seconds since the lists were last refreshed, or None if they never were."""
        try:
            return time.time() - self._stamp.stat().st_mtime
        except FileNotFoundError:
            return None

    def ensure_lists(self, refresh: bool, progress: Progress) -> None:
        """Fetch the suite's index if asked, missing, or older than a day.

        If a routine (not requested) refresh fails but older lists exist, keep using them
        and say so: a cached image must stay usable without the network.
        """
        with self._locked():
            age = self.lists_age()
            if not refresh and age is not None and age < LISTS_MAX_AGE_S:
                return
            self._prepare()
            progress(f"refreshing the package index of {self.suite} from {self.mirror}")
            result = _run(
                ["apt-get", *self._options(), "--error-on=any", "update"],
                f"apt-get update for {self.suite}",
                timeout=_APT_TIMEOUT_S,
            )
            if result.returncode == 0:
                self._stamp.touch()
                return
            reason = _apt_error(result)
            if age is None:
                # Never worked (a misspelt suite, no network): leave no empty state behind.
                shutil.rmtree(self.root, ignore_errors=True)
            elif not refresh:
                days = age / 86400
                progress(f"cannot refresh {self.suite} ({reason}); using lists {days:.1f} days old")
                return
            raise ImageError(
                f"cannot fetch the package index of {self.suite} from {self.mirror}: {reason}",
                f"check the network access to {self.mirror} and that the suite exists, "
                f"then try again (another mirror: set CVMLAB_DEBIAN_MIRROR)",
            )

    def show(self, package: str) -> ArchivePackage | None:
        """The candidate version of `package` in the suite, or None if the suite lacks it."""
        result = _run(
            ["apt-cache", *self._options(), "show", "--no-all-versions", package],
            f"looking up {package}",
        )
        if result.returncode != 0 or not result.stdout.strip():
            return None
        fields = _parse_stanza(result.stdout.split("\n\n")[0])
        try:
            return ArchivePackage(
                name=fields["Package"],
                version=fields["Version"],
                sha256=fields["SHA256"],
                size=int(fields["Size"]),
                filename=fields["Filename"],
                depends=fields.get("Depends", ""),
            )
        except (KeyError, ValueError) as exc:
            raise ImageError(
                f"apt-cache show {package} gave an incomplete record ({exc})",
                "run the build again with --refresh",
            ) from exc

    def package_names(self, prefix: str) -> list[str]:
        """Names of the packages in the suite that start with `prefix`."""
        result = _run(["apt-cache", *self._options(), "pkgnames", prefix], "listing packages")
        return sorted(result.stdout.split())

    def download(self, package: ArchivePackage, debs: Path, progress: Progress) -> Path:
        """Return `debs/<file>.deb`, downloading it first unless a verified copy is there."""
        target = debs / package.deb_name
        if target.exists() and sha256_file(target) == package.sha256:
            return target
        with self._locked():
            if target.exists() and sha256_file(target) == package.sha256:
                return target
            self._prepare()
            debs.mkdir(mode=0o700, parents=True, exist_ok=True)
            progress(f"downloading {package.name} {package.version} ({package.size / 1e6:.0f} MB)")
            with tempfile.TemporaryDirectory(prefix="download-", dir=self.root) as scratch:
                result = subprocess.run(
                    ["apt-get", *self._options(), "download", f"{package.name}={package.version}"],
                    cwd=scratch,
                    capture_output=True,
                    text=True,
                    timeout=_APT_TIMEOUT_S,
                    check=False,
                    stdin=subprocess.DEVNULL,
                )
                fetched = Path(scratch) / package.deb_name
                if result.returncode != 0 or not fetched.exists():
                    raise ImageError(
                        f"cannot download {package.name} {package.version}: {_apt_error(result)}",
                        f"check the network access to {self.mirror}, or run the build "
                        "again with --refresh if the package was superseded",
                    )
                if sha256_file(fetched) != package.sha256:
                    raise ImageError(
                        f"{package.deb_name} does not match the archive's sha256",
                        "run the build again with --refresh",
                    )
                os.replace(fetched, target)
        return target


def _apt_error(result: subprocess.CompletedProcess[str]) -> str:
    """The most telling line of apt's output ("E: ..." or "W: ..."), for a one-line error."""
    lines = (result.stderr + "\n" + result.stdout).splitlines()
    for prefix in ("E: ", "W: ", "Err:"):
        for line in lines:
            if line.startswith(prefix):
                return line.strip()
    return f"exit status {result.returncode}"


def extract_deb(deb: Path, destination: Path) -> None:
    """Unpack a .deb's files (not its maintainer scripts) under `destination`."""
    result = _run(["dpkg-deb", "-x", str(deb), str(destination)], f"unpacking {deb.name}", 300)
    if result.returncode != 0:
        raise ImageError(
            f"cannot unpack {deb.name}: {result.stderr.strip()}",
            f"delete {deb} and build again",
        )
