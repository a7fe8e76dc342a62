"""What every ``stepflow`` command shares: exit statuses and the one way to report bad input."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print an error for the user (no traceback) and exit (status 2: bad input, by default)."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)
