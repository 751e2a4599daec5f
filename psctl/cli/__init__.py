"""The ``psctl`` command: typer and rich only; it builds a config, calls :mod:`psctl.apps`
and renders the result."""

from psctl.cli.main import main

__all__ = ["main"]
