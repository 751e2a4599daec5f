"""What a front end may start before it imports itself: the fork server of the embedded
cluster a ``psctl train`` is about to start (psctl/cluster/prestart.py), so that its
imports overlap the front end's. Cheap to import: the standard library only."""

from __future__ import annotations

from psctl.cluster import prestart


def start_cluster_early() -> None:
    """Start the embedded cluster's fork server now; the cluster takes it over when it starts,
    and one it does not take is killed when this process exits."""
    prestart.start_early()
