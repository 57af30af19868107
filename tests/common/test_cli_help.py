"""`loraplex --help` says what each command does (it listed only the bare choices before), and
`loraplex health --help` names the command typed, not the module behind it."""

from __future__ import annotations

import pytest

from services.cli import main

COMMANDS = ("up", "demo", "health", "adapter upload", "adapter list", "model tiny", "proto")


def test_help_lists_every_command_with_what_it_does(capsys):
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for command in COMMANDS:
        (line,) = [line for line in lines if line.strip().startswith(f"loraplex {command} ")]
        usage, _, description = line.strip().partition("   ")  # columns: usage, then what it does
        assert description.strip(), f"`loraplex {command}` has no description: {line!r}"


def test_health_help_names_the_command_the_user_typed(capsys):
    with pytest.raises(SystemExit) as exit:  # argparse's --help
        main(["health", "--help"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("usage: loraplex health ")
