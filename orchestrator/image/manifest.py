"""An image's manifest: what it is, how to boot it and log in, and the hash of every file.

`manifest.json` lives in the image directory. File names in it are relative to that
directory, so an image directory can be copied or moved and still load; the dataclass
holds absolute paths.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ImageError
from orchestrator.image.debian import sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
#: Who sets a restored guest's clock (`ImageManifest.restored_clock`).
RESTORED_CLOCKS = ("ssh", "rtc")
# A private key readable by anyone but its owner is refused (as ssh itself would).
_PRIVATE_MODE_MASK = 0o077


@dataclass(frozen=True)
class ImageManifest:
    """A built guest image.

    `kernel`, `initrd` and `ssh_key` are absolute paths inside `directory`. `host_key` is
    the guest's SSH host public key ("ssh-ed25519 AAAA...") for pinning. `ready_marker`
    starts the one console line the guest prints when SSH is up. `packages` maps package
    names to exact versions; `inputs` and `outputs` map names to sha256 (outputs are file
    names in `directory`; inputs are 'recipe/<file>', 'deb/<file>' or 'host/<path>').
    """

    name: str
    directory: Path
    kernel: Path
    initrd: Path
    cmdline: str
    ssh_user: str
    ssh_key: Path
    host_key: str
    ready_marker: str
    kernel_release: str
    packages: dict[str, str]
    inputs: dict[str, str]
    outputs: dict[str, str]
    #: Who sets a restored guest's clock (recipe `restored_clock`): "ssh", cvmlab over
    #: SSH (images built before the field existed), or "rtc", the guest's SSH server.
    restored_clock: str = "ssh"

    def to_json(self) -> dict[str, Any]:
        """The manifest.json form: paths relative to the image directory."""

        def rel(path: Path) -> str:
            return str(path.relative_to(self.directory))

        return {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "kernel": rel(self.kernel),
            "initrd": rel(self.initrd),
            "cmdline": self.cmdline,
            "ssh_user": self.ssh_user,
            "ssh_key": rel(self.ssh_key),
            "host_key": self.host_key,
            "ready_marker": self.ready_marker,
            "restored_clock": self.restored_clock,
            "kernel_release": self.kernel_release,
            "packages": dict(sorted(self.packages.items())),
            "inputs": dict(sorted(self.inputs.items())),
            "outputs": dict(sorted(self.outputs.items())),
        }

    def write(self, build_notes: dict[str, Any] | None = None) -> Path:
        """Write `manifest.json` into the image directory; return its path.

        `build_notes` (what the build found: modules loaded, built in or absent, step
        results) is kept under "build" for people reading the file; loading ignores it.
        """
        path = self.directory / MANIFEST_NAME
        data = self.to_json()
        if build_notes:
            data["build"] = build_notes
        path.write_text(json.dumps(data, indent=2) + "\n")
        path.chmod(0o644)
        return path


def _string_map(data: dict[str, Any], key: str, path: Path) -> dict[str, str]:
    value = data.get(key)
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ImageError(f"{path}: '{key}' is not a map of strings", "rebuild the image")
    return dict(value)


def load_manifest(path: Path) -> ImageManifest:
    """Read an image's manifest; `path` is the image directory or its manifest.json."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path
    directory = manifest_path.parent.resolve()
    try:
        data = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise ImageError(
            f"no image manifest at {manifest_path}", "build the image with `cvmlab image build`"
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ImageError(f"cannot read {manifest_path}: {exc}", "rebuild the image") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ImageError(
            f"{manifest_path} is not a cvmlab image manifest (format {MANIFEST_FORMAT})",
            "rebuild the image with this version of cvmlab",
        )
    text_fields = (
        "name",
        "kernel",
        "initrd",
        "cmdline",
        "ssh_user",
        "ssh_key",
        "host_key",
        "ready_marker",
        "kernel_release",
    )
    for key in text_fields:
        if not isinstance(data.get(key), str) or not data[key]:
            raise ImageError(f"{manifest_path}: '{key}' is missing", "rebuild the image")
    restored_clock = data.get("restored_clock", "ssh")
    if restored_clock not in RESTORED_CLOCKS:
        raise ImageError(
            f"{manifest_path}: restored_clock {restored_clock!r} unknown", "rebuild the image"
        )

    def inside(name: str) -> Path:
        resolved = (directory / name).resolve()
        if resolved.parent != directory:
            raise ImageError(f"{manifest_path}: {name!r} is outside the image", "rebuild it")
        return resolved

    return ImageManifest(
        name=data["name"],
        directory=directory,
        kernel=inside(data["kernel"]),
        initrd=inside(data["initrd"]),
        cmdline=data["cmdline"],
        ssh_user=data["ssh_user"],
        ssh_key=inside(data["ssh_key"]),
        host_key=data["host_key"],
        ready_marker=data["ready_marker"],
        kernel_release=data["kernel_release"],
        packages=_string_map(data, "packages", manifest_path),
        inputs=_string_map(data, "inputs", manifest_path),
        outputs=_string_map(data, "outputs", manifest_path),
        restored_clock=restored_clock,
    )


def verify_image(manifest: ImageManifest) -> None:
    """Check every output file against its sha256 and the private key's permissions.

    Raises ImageError naming the first file that is missing or changed, or a private key
    (or the image directory) that others can read.
    """
    fix = f"delete {manifest.directory} and build the image again"
    for name, expected in sorted(manifest.outputs.items()):
        path = manifest.directory / name
        try:
            actual = sha256_file(path)
        except FileNotFoundError as exc:
            raise ImageError(f"image file {path} is missing", fix) from exc
        if actual != expected:
            raise ImageError(f"image file {path} changed (sha256 {actual[:12]}...)", fix)
    for private in (manifest.ssh_key,):
        mode = stat.S_IMODE(private.stat().st_mode)
        if mode & _PRIVATE_MODE_MASK:
            raise ImageError(
                f"SSH key {private} has mode {mode:04o}, wider than 0600",
                f"run `chmod 600 {private}`",
            )
    mode = stat.S_IMODE(manifest.directory.stat().st_mode)
    if mode & _PRIVATE_MODE_MASK:
        raise ImageError(
            f"image directory {manifest.directory} has mode {mode:04o}, wider than 0700",
            f"run `chmod 700 {manifest.directory}`",
        )
