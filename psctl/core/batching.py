"""Mini-batches of a partition: a seeded shuffle cut into the same number of steps on every worker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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


def batch_sizes(n_rows: int, batch_size: int, max_rows: int | None = None) -> list[int]:
    """The sizes of :func:`batch_indices`' batches of one epoch, in order (``np.array_split``'s)."""
    steps = epoch_steps(n_rows, batch_size, max_rows) if n_rows else 0
    if not steps:
        return []
    q, r = divmod(n_rows, steps)
    return [q + 1] * r + [q] * (steps - r)


@dataclass(frozen=True)
class Window:
    """One window of a streamed epoch. Its rows are the rows the previous window carried (in
    that window's ``carry`` order) followed by the rows of ``slices`` (ascending), in order;
    ``batches`` and ``carry`` are positions into them."""

    slices: list[int]
    batches: list[np.ndarray]
    carry: np.ndarray  # the rows left for the next window


def stream_windows(
    slice_rows: list[int], batch_size: int, seed: int, partition: int, epoch: int, max_rows: int | None, window_rows: int
) -> Iterator[Window]:
    """One epoch of a partition read slice by slice (``slice_rows[j]`` rows in slice j) through a
    shuffle window of about ``window_rows`` rows (at least one batch's).

    The batches have :func:`batch_sizes`' sizes, so every worker takes the same number of steps
    per epoch in either mode. The order is a function of (seed, partition, epoch): the slices come
    in an order shuffled by ``default_rng([seed, partition, epoch, 1])`` and each window's rows
    are permuted by ``default_rng([seed, partition, epoch])``. A window that holds every slice is
    the whole partition in file order, so its batches are exactly :func:`batch_indices`'.
    """
    sizes = batch_sizes(sum(slice_rows), batch_size, max_rows)
    if not sizes:
        return
    n_slices = len(slice_rows)
    if sum(slice_rows) <= window_rows:
        order = list(range(n_slices))
    else:
        order = [int(j) for j in np.random.default_rng([seed, partition, epoch, 1]).permutation(n_slices)]
    rng = np.random.default_rng([seed, partition, epoch])
    step, carry, at = 0, 0, 0
    while step < len(sizes):
        chosen, rows = [], carry
        while at < n_slices and (rows < window_rows or rows < sizes[step]):
            rows += slice_rows[order[at]]
            chosen.append(order[at])
            at += 1
        perm = rng.permutation(rows)
        batches, used = [], 0
        while step < len(sizes) and used + sizes[step] <= rows:
            batches.append(perm[used : used + sizes[step]])
            used += sizes[step]
            step += 1
        # The rows not taken open the next window, in the order of their positions here.
        carry = rows - used
        yield Window(sorted(chosen), batches, perm[used:])
