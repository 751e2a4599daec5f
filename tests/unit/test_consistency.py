import numpy as np
import pytest

from psctl.core.consistency import ClockGate, SyncAccumulator, staleness_for
from psctl.core.tables import TableSpec, init_values, shard_ranges, split_keys


def test_staleness_per_mode():
    assert staleness_for("sync", 5) == 0
    assert staleness_for("ssp", 3) == 3
    assert staleness_for("async", 3) is None
    with pytest.raises(ValueError, match="unknown mode"):
        staleness_for("bsp", 0)


def test_ssp_gate_releases_waiters_when_slowest_catches_up():
    gate = ClockGate([0, 1], staleness=1)
    assert gate.wait(1, "a")  # min 0 >= 1 - 1
    assert not gate.wait(2, "b")  # needs min >= 1
    assert not gate.wait(3, "c")  # needs min >= 2
    assert gate.advance(0, 3) == []  # worker 1 still at 0
    assert gate.advance(1, 1) == ["b"]
    assert gate.advance(1, 2) == ["c"]
    assert gate.waiting() == 0


def test_removed_worker_never_blocks():
    gate = ClockGate([0, 1], staleness=0)
    gate.advance(0, 5)
    assert not gate.wait(5, "x")
    assert gate.remove(1) == ["x"]
    assert gate.min_clock() == 5
    gate.remove(0)
    assert gate.min_clock() is None and gate.can_read(10**9)


def test_async_never_waits():
    gate = ClockGate([0, 1], staleness=None)
    assert gate.wait(10**6, "x")


def test_clock_cannot_go_back():
    gate = ClockGate([0], staleness=0)
    gate.advance(0, 3)
    with pytest.raises(ValueError):
        gate.advance(0, 2)


def test_sync_accumulator_weights_by_samples():
    acc = SyncAccumulator()
    acc.add(0, {"w": (None, np.array([1.0, 1.0]))}, 1)
    acc.add(0, {"w": (None, np.array([4.0, 0.0]))}, 3)
    assert acc.complete(0) == []
    ((clock, means),) = acc.complete(1)
    assert clock == 0 and means["w"][0] is None
    np.testing.assert_allclose(means["w"][1], [(1 + 12) / 4, 1 / 4])
    assert len(acc) == 0


def test_sync_accumulator_merges_keyed_rows_by_key():
    acc = SyncAccumulator()
    acc.add(0, {"f": (np.array([1, 5]), np.array([[1.0, 1.0], [2.0, 2.0]]))}, 2)
    acc.add(0, {"f": (np.array([5, 9]), np.array([[4.0, 0.0], [1.0, 3.0]]))}, 2)
    ((_, means),) = acc.complete(None)
    keys, rows = means["f"]
    assert keys.tolist() == [1, 5, 9]
    np.testing.assert_allclose(rows, np.array([[2, 2], [4 + 8, 4], [2, 6]]) / 4)


def test_shard_ranges_cover_keys_once():
    for rows in (1, 7, 100):
        for n in (1, 3, 8):
            ranges = shard_ranges(rows, n)
            assert ranges[0][0] == 0 and ranges[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_split_keys_at_range_edges():
    ranges = [(0, 10), (10, 20), (20, 30)]
    keys = np.array([0, 9, 10, 19, 20, 29])
    parts = split_keys(keys, ranges)
    assert [keys[p].tolist() for p in parts] == [[0, 9], [10, 19], [20, 29]]
    few = np.array([3, 25])
    assert [few[p].tolist() for p in split_keys(few, ranges)] == [[3], [], [25]]


def test_init_values_independent_of_sharding():
    spec = TableSpec("f", rows=10_000, dim=3, init="normal")
    whole = init_values(spec, 0, 10_000, seed=5)
    parts = np.concatenate([init_values(spec, lo, hi, seed=5) for lo, hi in shard_ranges(10_000, 3)])
    np.testing.assert_array_equal(whole, parts)


def test_discarded_tokens_are_never_released():
    gate = ClockGate([0], staleness=0)
    assert not gate.wait(1, "a") and not gate.wait(1, "b") and not gate.wait(2, "c")
    gate.discard({"a", "c"})
    assert gate.waiting() == 1
    assert gate.advance(0, 2) == ["b"]


def test_two_float32_pushes_give_the_same_mean_in_either_order():
    """A seeded sync job with two workers is the same bit for bit whichever push arrives
    first: each push is weighted in float64 (a float32 product would round one of them)."""
    rng = np.random.default_rng(4)
    a, b = (rng.normal(size=50).astype(np.float32) for _ in range(2))
    results = []
    for first, second in (((a, 32), (b, 31)), ((b, 31), (a, 32))):
        acc = SyncAccumulator()
        acc.add(0, {"w": (None, first[0])}, first[1])
        acc.add(0, {"w": (None, second[0])}, second[1])
        [(_, means)] = acc.complete(None)
        results.append(means["w"][1])
    np.testing.assert_array_equal(results[0], results[1])
