"""The ``psctl`` command: typer and rich only; it builds a config, calls :mod:`psctl.apps`
and renders the result.

:func:`main` is the entry point. Before it imports the commands (typer, rich and the
driver: about 0.3 s of a core), a ``psctl train`` that will start an embedded cluster has
the cluster's fork server started, so that the server's imports run on another core
meanwhile (psctl/cluster/prestart.py). Importing the commands' module, ``psctl.cli.main``,
makes that name this package's attribute, as for any submodule.
"""

from __future__ import annotations

import sys


def starts_embedded_cluster(args: list[str]) -> bool:
    """Whether the command line ``args`` (without the program) is a ``psctl train`` that
    starts a cluster of its own: no ``--server``, and not a request for help."""
    if not args or args[0] != "train":
        return False
    flags = {a.split("=", 1)[0] for a in args[1:] if a.startswith("-")}
    return not flags & {"--server", "--help", "-h"}


def main() -> None:
    """Run the ``psctl`` command line (``sys.argv``)."""
    if starts_embedded_cluster(sys.argv[1:]):
        from psctl.apps.prestart import start_cluster_early

        start_cluster_early()
    from psctl.cli.main import main as run

    run()


__all__ = ["main", "starts_embedded_cluster"]
