"""`cvmlab`: probe | image | report | profile | bench | repro | lab.

Each subcommand lives with its layer (`orchestrator.host.probe_cli`,
`orchestrator.image.cli`, `orchestrator.bench`) and registers itself through
`add_parser(subparsers)`; its handler returns the exit status. A
`CvmlabError` is printed as one line (plus its evidence, if any) with exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

from orchestrator import __version__
from orchestrator.errors import CvmlabError

# Modules that contribute subcommands, in the order `cvmlab --help` lists them.
SUBCOMMAND_MODULES = (
    "orchestrator.host.probe_cli",
    "orchestrator.image.cli",
    "orchestrator.report.cli",
    "orchestrator.profiles",
    "orchestrator.bench",
    "orchestrator.repro.cli",
    "orchestrator.lab.cli",
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvmlab",
        description="End-to-end tests of confidential-guest memory on KVM and QEMU.",
    )
    parser.add_argument("--version", action="version", version=f"cvmlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CvmlabError as error:
        print(f"cvmlab: error: {error}", file=sys.stderr)
        if error.detail:
            print(error.detail.rstrip(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvmlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
