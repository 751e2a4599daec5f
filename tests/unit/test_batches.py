"""Mini-batches: every row once per epoch, and every worker of a job the same number of steps."""

import numpy as np
import pytest

from psctl.core.batching import batch_indices, epoch_steps


@pytest.mark.parametrize(("rows", "largest", "batch"), [(100, 100, 32), (90, 100, 32), (5, 100, 32), (64, 64, 32)])
def test_each_row_once_in_near_equal_batches(rows, largest, batch):
    batches = list(batch_indices(rows, batch, seed=1, partition=2, epoch=3, max_rows=largest))
    assert sorted(np.concatenate(batches).tolist()) == list(range(rows))
    sizes = [len(b) for b in batches]
    assert max(sizes) <= batch and max(sizes) - min(sizes) <= 1
    assert len(batches) == epoch_steps(rows, batch, largest)


def test_partitions_of_a_job_take_the_same_steps():
    # 100 rows at batch 32 is 4 steps; a 90-row partition would be 3 at full batches.
    assert epoch_steps(100, 32, 100) == epoch_steps(90, 32, 100) == 4
    assert epoch_steps(3, 32, 100) == 3  # never an empty batch
    assert epoch_steps(0, 32, 100) == 0
    assert list(batch_indices(0, 32, 0, 0, 0, 100)) == []


def test_shuffle_is_seeded_per_partition_and_epoch():
    a = np.concatenate(list(batch_indices(50, 8, 0, 0, 0)))
    assert np.array_equal(a, np.concatenate(list(batch_indices(50, 8, 0, 0, 0))))
    assert not np.array_equal(a, np.concatenate(list(batch_indices(50, 8, 0, 0, 1))))
    assert not np.array_equal(a, np.concatenate(list(batch_indices(50, 8, 0, 1, 0))))
