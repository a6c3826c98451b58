"""`cvmlab image build|show`: the image builder on the command line.

`add_parser(subparsers)` adds the `image` command to cvmlab's parser; each subcommand sets
`func` to a handler taking the parsed arguments and returning an exit status. Run on its
own with `python -m orchestrator.image.cli build`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import CvmlabError
from orchestrator.image.builder import build_image, default_image
from orchestrator.image.manifest import ImageManifest


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `image` (with `build` and `show`) to an argparse subparsers object."""
    image: argparse.ArgumentParser = subparsers.add_parser(
        "image", help="build or show the guest image"
    )
    commands = image.add_subparsers(dest="image_command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="build an image (or reuse the cached one) and print its directory",
        description="Build a guest image from a recipe in images/. A build with the same "
        "inputs is a cache hit that downloads nothing.",
    )
    build.add_argument("--recipe", default="minimal", help="recipe name or directory [minimal]")
    build.add_argument(
        "--kernel-suite", help="Debian suite of the kernel [the recipe's: bookworm-backports]"
    )
    build.add_argument(
        "--kernel-version", help="kernel release or version in the suite [the newest]"
    )
    build.add_argument("--vmlinuz", type=Path, help="use this kernel image instead of a package")
    build.add_argument(
        "--modules-dir", type=Path, help="the /lib/modules/<release> directory of --vmlinuz"
    )
    build.add_argument(
        "--refresh", action="store_true", help="re-read the archive's index now (else daily)"
    )
    build.add_argument("--json", action="store_true", help="print the manifest as JSON")
    build.set_defaults(handler=run_build)

    show = commands.add_parser("show", help="print the manifest of the default image")
    show.add_argument("--json", action="store_true", help="print the manifest as JSON")
    show.set_defaults(handler=run_show)
    return image


def _print_manifest(manifest: ImageManifest, as_json: bool) -> None:
    if as_json:
        data = manifest.to_json()
        data["directory"] = str(manifest.directory)
        print(json.dumps(data, indent=2))
        return
    rows = [
        ("name", manifest.name),
        ("kernel", f"{manifest.kernel} ({manifest.kernel_release})"),
        ("initrd", str(manifest.initrd)),
        ("cmdline", manifest.cmdline),
        ("ssh", f"{manifest.ssh_user} with {manifest.ssh_key}"),
        ("host key", manifest.host_key),
        ("ready marker", manifest.ready_marker),
    ]
    rows += [(f"package {name}", version) for name, version in sorted(manifest.packages.items())]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(manifest.directory)


def run_build(args: argparse.Namespace) -> int:
    manifest = build_image(
        args.recipe,
        kernel_suite=args.kernel_suite,
        kernel_version=args.kernel_version,
        vmlinuz=args.vmlinuz,
        modules_dir=args.modules_dir,
        refresh=args.refresh,
    )
    if args.json:
        _print_manifest(manifest, True)
    else:
        print(manifest.directory)
    return 0


def run_show(args: argparse.Namespace) -> int:
    _print_manifest(default_image(), args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (`python -m orchestrator.image.cli build`)."""
    parser = argparse.ArgumentParser(prog="cvmlab")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["image", *(sys.argv[1:] if argv is None else argv)])
    try:
        status: int = args.handler(args)
    except CvmlabError as exc:
        print(f"cvmlab: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
