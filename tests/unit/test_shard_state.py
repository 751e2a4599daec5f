"""The shard's pure part: tables, keyed and whole-table apply, sync over keyed pushes."""

import numpy as np
import pytest

from psctl.cluster.shard import ShardState
from psctl.core.optim import SGD
from psctl.core.tables import TableSpec
from psctl.errors import RequestError


def state(mode: str, workers=(0, 1)) -> ShardState:
    tables = [TableSpec("w", 10), TableSpec("f", 100, dim=2)]
    return ShardState("j", tables, {"w": (0, 10), "f": (50, 100)}, mode, 0, list(workers), SGD(lr=0.5), seed=0)


def test_keyed_push_updates_only_those_rows_async():
    s = state("async")
    s.push(0, 0, {"f": (np.array([50, 77]), np.ones((2, 2), np.float32))}, 4)
    f = s.tables["f"].values
    np.testing.assert_allclose(f[[0, 27]], -0.5)
    assert np.count_nonzero(f) == 4
    np.testing.assert_allclose(s.read(["f"], [np.array([77])])[0], [[-0.5, -0.5]])


@pytest.mark.parametrize(
    ("keys", "match"),
    [(np.array([10, 60]), "outside this shard's range"), (np.array([60, 60]), "sorted and unique"),
     (np.array([70, 60]), "sorted and unique"), (np.array([60.0]), "integer array")],
)
def test_bad_keys_are_refused_before_anything_changes(keys, match):
    s = state("async")
    with pytest.raises(RequestError, match=match):
        s.push(0, 0, {"f": (keys, np.ones((len(keys), 2), np.float32))}, 1)
    assert not s.tables["f"].values.any() and s.gate.clocks[0] == 0


def test_sync_keyed_mean_over_the_union_of_batches():
    s = state("sync")
    s.push(0, 0, {"f": (np.array([60]), np.full((1, 2), 1.0, np.float32))}, 1)
    assert not s.tables["f"].values.any()  # waits for worker 1
    s.push(1, 0, {"f": (np.array([60, 61]), np.full((2, 2), 3.0, np.float32))}, 3)
    f = s.tables["f"].values
    np.testing.assert_allclose(f[10], -0.5 * (1 * 1 + 3 * 3) / 4)
    np.testing.assert_allclose(f[11], -0.5 * (3 * 3) / 4)
    assert s.updates == 1


def test_wrong_gradient_shape_and_clock():
    s = state("async")
    with pytest.raises(RequestError, match="expected"):
        s.push(0, 0, {"w": (None, np.ones(3, np.float32))}, 1)
    with pytest.raises(RequestError, match="expected 0"):
        s.push(0, 1, {"w": (None, np.ones(10, np.float32))}, 1)
