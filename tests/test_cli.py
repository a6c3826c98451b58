"""`cvmlab`'s dispatcher: each subcommand from its own module, and only that module."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from orchestrator.cli import SUBCOMMANDS, build_parser


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_module_contributes_the_subcommand_it_is_listed_for(name: str) -> None:
    assert _subcommands(build_parser(name)) == {name}


def test_help_and_unknown_names_get_every_subcommand() -> None:
    assert _subcommands(build_parser()) == set(SUBCOMMANDS)
    assert _subcommands(build_parser("no-such-command")) == set(SUBCOMMANDS)


def test_a_subcommand_imports_no_other_layer() -> None:
    # `profile list` needs no SSH: paramiko and the bench layer stay unimported.
    code = (
        "import sys; from orchestrator.cli import main; status = main(['profile', 'list']); "
        "print(status, 'paramiko' in sys.modules, 'orchestrator.bench' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "0 False False"


def test_an_unknown_subcommand_is_one_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "no-such-command"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "invalid choice: 'no-such-command'" in done.stderr
    assert "Traceback" not in done.stderr
