"""The error type of bad user input (recipes, flags, datasets, models), shared by the CLI and the modules it drives."""

from __future__ import annotations


class CLIError(Exception):
    """An input error: printed as one line, without a traceback (set TRL_MIG_DEBUG=1 for the traceback)."""
