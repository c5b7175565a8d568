"""Every `trl-mig` command prints its help and exits 0 (`--help` is what the docs tell users to run first)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trl_mig.cli.main import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as stop:  # argparse exits after printing the help
        code = stop.code
    out = capsys.readouterr().out
    assert code == 0
    assert "usage" in out and command in out


def test_top_level_help_lists_every_command_and_the_module_runs():
    result = subprocess.run([sys.executable, "-m", "trl_mig", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert f"  {command} " in result.stdout
