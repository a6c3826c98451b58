"""Which Debian mirror to download from: the one the host's apt already uses.

cvmlab fetches kernels, kernel sources and QEMU builds from Debian's archive with a
private apt state. A lab behind its own mirror or proxy must not need a code change for
that, so no archive address is written into the repository: the mirror is, in order,

1. `$CVMLAB_DEBIAN_MIRROR` (or a recipe's `kernel.mirror`, which callers pass first);
2. the host's apt sources (`/etc/apt/sources.list`, `sources.list.d/*.list` one-line
   entries and `*.sources` deb822 stanzas): the URI of the first `deb` entry that
   carries one of the host's own Debian suites (`bookworm`, `bookworm-updates`,
   `bookworm-backports`; security suites live in another archive and are skipped).

Stdlib only: `ci/setup-host.sh` runs `python3 -m orchestrator.archive_mirror` before the
venv exists, so the shell script and the Python code agree on one mirror.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ImageError

MIRROR_ENV = "CVMLAB_DEBIAN_MIRROR"
_SKIPPED_SUITE_SUFFIXES = ("-security",)


@dataclass(frozen=True)
class AptSource:
    """One `deb` entry: where it came from, its URI and its suites."""

    origin: str  # "path:line" for one-line entries, "path" for deb822 stanzas
    uri: str
    suites: tuple[str, ...]


def _one_line_entries(path: Path, text: str) -> list[AptSource]:
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        # deb [opt=val ...] URI suite [component ...]
        match = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
        if match:
            entries.append(AptSource(f"{path}:{number}", match.group(1), (match.group(2),)))
    return entries


def _deb822_entries(path: Path, text: str) -> list[AptSource]:
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:
                fields[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        for uri in fields.get("uris", "").split():
            entries.append(AptSource(str(path), uri, suites))
    return entries


def apt_sources(root: Path = Path("/")) -> list[AptSource]:
    """Every `deb` entry of the host's apt configuration, in apt's reading order."""
    etc = root / "etc/apt"
    files = [etc / "sources.list"]
    try:
        parts = sorted((etc / "sources.list.d").iterdir())
    except OSError:
        parts = []
    files += [p for p in parts if p.suffix in (".list", ".sources")]
    entries: list[AptSource] = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        parse = _deb822_entries if path.suffix == ".sources" else _one_line_entries
        entries += parse(path, text)
    return entries


def host_codename(root: Path = Path("/")) -> str | None:
    """VERSION_CODENAME from os-release ('bookworm'), or None."""
    try:
        text = (root / "etc/os-release").read_text()
    except OSError:
        return None
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.MULTILINE)
    return match.group(1) if match else None


def _is_debian_suite(suite: str, codename: str | None) -> bool:
    if suite.endswith(_SKIPPED_SUITE_SUFFIXES):
        return False
    if codename is None:
        return bool(re.fullmatch(r"[a-z]+(-updates|-backports)?", suite))
    return suite in (codename, f"{codename}-updates", f"{codename}-backports")


def archive_mirror(override: str | None = None, root: Path = Path("/")) -> str:
    """The Debian mirror to use (see the module docstring for the order).

    Raises ImageError naming what was read when nothing qualifies.
    """
    chosen = override or os.environ.get(MIRROR_ENV, "").strip()
    if chosen:
        return chosen.rstrip("/")
    codename = host_codename(root)
    sources = apt_sources(root)
    for entry in sources:
        if entry.uri.startswith(("http://", "https://", "file:/")) and any(
            _is_debian_suite(suite, codename) for suite in entry.suites
        ):
            return entry.uri.rstrip("/")
    seen = ", ".join(sorted({e.uri for e in sources})) or "no deb entries"
    raise ImageError(
        f"no Debian mirror found in the host's apt sources under {root / 'etc/apt'} "
        f"(suite {codename or '?'}; read: {seen})",
        f"set {MIRROR_ENV}=URL (the archive root, e.g. the URI of your bookworm entry)",
    )


def main() -> int:
    """Print the mirror (for ci/setup-host.sh); one error line and exit 2 when there is none."""
    try:
        print(archive_mirror())
    except ImageError as error:
        print(f"cvmlab: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
