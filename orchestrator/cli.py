"""`cvmlab`: probe | image | report | profile | bench | repro | lab.

Each subcommand lives with its layer (`orchestrator.host.probe_cli`,
`orchestrator.image.cli`, `orchestrator.bench`) and registers itself through
`add_parser(subparsers)`; its handler returns the exit status. A
`CvmlabError` is printed as one line (plus its evidence, if any) with exit
status 2; anything else is a bug and keeps its traceback.

Only the named subcommand's module is imported (all of them for `--help` or a
name we do not know): importing every layer cost 15 s of the 16 s a
`cvmlab profile run --inside-lab` took under TCG in the lab.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

from orchestrator import __version__
from orchestrator.errors import CvmlabError

# Each subcommand and the module that contributes it, in the order `cvmlab --help`
# lists them.
SUBCOMMANDS = {
    "probe": "orchestrator.host.probe_cli",
    "image": "orchestrator.image.cli",
    "report": "orchestrator.report.cli",
    "profile": "orchestrator.profiles",
    "bench": "orchestrator.bench",
    "repro": "orchestrator.repro.cli",
    "lab": "orchestrator.lab.cli",
}

Handler = Callable[[argparse.Namespace], int]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with `only` that one (when it is known)."""
    parser = argparse.ArgumentParser(
        prog="cvmlab",
        description="End-to-end tests of confidential-guest memory on KVM and QEMU.",
    )
    parser.add_argument("--version", action="version", version=f"cvmlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [only] if only in SUBCOMMANDS else list(SUBCOMMANDS)
    for name in names:
        import_module(SUBCOMMANDS[name]).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words[0] if words else None)
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
