"""Every ``kiln`` subcommand prints its help (argparse formats help strings with %, so a setting's
description with a literal "%" once broke ``--help`` of every command that lists settings)."""

from __future__ import annotations

import argparse

import pytest

from kiln.cli import build_parser


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_help_of_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kiln {command}")


def test_subcommands_are_registered() -> None:
    assert {"run", "validate", "serve", "worker", "up", "make-test-checkpoint"} <= set(_subcommands())
