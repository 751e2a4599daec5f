"""Mini-batches of a partition: a seeded shuffle cut into the same number of steps on every worker."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def batch_indices(
    n_rows: int, batch_size: int, seed: int, partition: int, epoch: int, max_rows: int | None = None
) -> Iterator[np.ndarray]:
    """Row indices of each mini-batch of one epoch of a partition: a seeded shuffle cut into
    :func:`epoch_steps` batches of near-equal size (at most ``batch_size``).

    Seeded by the partition, not the worker, so a replacement replays the same batches.
    ``max_rows`` is the row count of the job's largest partition: every worker
    then takes the same number of steps per epoch, so no clock has only a few
    workers training (which in sync mode would scale up the step of every
    row those few touch) and no batch is a small remainder.
    """
    order = np.random.default_rng([seed, partition, epoch]).permutation(n_rows)
    for part in np.array_split(order, epoch_steps(n_rows, batch_size, max_rows)) if n_rows else ():
        yield part


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return -(-n_rows // batch_size)


def epoch_steps(n_rows: int, batch_size: int, max_rows: int | None = None) -> int:
    """Steps per epoch of a partition of ``n_rows``: those of the largest partition
    (``max_rows``, default this one) at ``batch_size``, but never empty batches."""
    return min(n_rows, steps_per_epoch(max(n_rows, max_rows or 0), batch_size))
