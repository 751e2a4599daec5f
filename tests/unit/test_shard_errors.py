"""The shard core refuses bad requests with its own typed errors, each with its wire code, no sockets involved."""

import numpy as np
import pytest

from psctl.core import shard_errors as e
from psctl.core.optim import SGD
from psctl.core.shard_state import ShardState
from psctl.core.sparse import key_owner
from psctl.core.sparse_table import SparseTable
from psctl.core.tables import TableSpec
from psctl.errors import RequestError


def state(mode: str = "async", workers=(0, 1)) -> ShardState:
    tables = [TableSpec("w", 10), TableSpec("f", 100, dim=2)]
    return ShardState("j", tables, {"w": (0, 10), "f": (50, 100)}, mode, 0, list(workers), SGD(lr=0.5), seed=0)


def test_every_error_is_a_request_error_with_its_own_code():
    classes = [e.BadKeys, e.BadGradient, e.UnknownTable, e.NotLive, e.BadClock, e.TableFull]
    codes = {cls.code for cls in classes}
    assert len(codes) == len(classes) and "bad_request" not in codes
    for cls in classes:
        exc = cls("a sentence")
        assert isinstance(exc, e.ShardError) and isinstance(exc, RequestError)
        assert exc.code == cls.code and str(exc) == "a sentence"


@pytest.mark.parametrize(
    ("keys", "match"),
    [(np.array([10, 60]), "outside"), (np.array([60, 60]), "sorted and unique"), (np.array([[60]]), "1-d integer")],
)
def test_bad_keys_on_a_dense_table(keys, match):
    with pytest.raises(e.BadKeys, match=match) as info:
        state().locate(["f"], [keys])
    assert info.value.code == "bad_keys"


def test_bad_keys_on_a_sparse_table_include_another_shards_keys():
    t = SparseTable(TableSpec("s", 2**20, sparse=True), 0, 2, 0, SGD(lr=0.1))
    keys = np.arange(64)
    theirs = keys[key_owner(keys, 2) == 1][:3]
    with pytest.raises(e.BadKeys, match="another shard owns"):
        t.locate(theirs)
    with pytest.raises(e.BadKeys, match="key space"):
        t.locate(np.array([2**20]))


def test_unknown_tables():
    with pytest.raises(e.UnknownTable, match="unknown table 'nope'") as info:
        state().check_tables(["w", "nope"])
    assert info.value.code == "unknown_table"
    with pytest.raises(e.UnknownTable, match="list of 1 to"):
        state().check_tables("w")


def test_a_gradient_of_the_wrong_shape():
    with pytest.raises(e.BadGradient, match="shape") as info:
        state().push(0, 0, {"w": (None, np.ones(3, np.float32))}, 1)
    assert info.value.code == "bad_gradient"
    sparse = SparseTable(TableSpec("s", 100, sparse=True), 0, 1, 0, SGD(lr=0.1))
    with pytest.raises(e.BadKeys, match="pushes must carry keys"):
        sparse.check_grad(None, np.ones(100, np.float32))
    with pytest.raises(e.BadKeys, match="pull its rows by key"):
        sparse.read(None)


def test_a_worker_outside_the_live_set_and_a_wrong_clock():
    s = state(workers=(0,))
    with pytest.raises(e.NotLive) as info:
        s.push(7, 0, {"w": (None, np.ones(10, np.float32))}, 1)
    assert info.value.code == "not_live"
    with pytest.raises(e.BadClock, match="pushed clock 3, expected 0") as info2:
        s.push(0, 3, {"w": (None, np.ones(10, np.float32))}, 1)
    assert info2.value.code == "bad_clock"
    s.leave(0)
    with pytest.raises(e.NotLive):
        s.push(0, 0, {"w": (None, np.ones(10, np.float32))}, 1)


def test_a_sparse_table_that_would_outgrow_a_shard(monkeypatch):
    from psctl.core import sparse_table

    monkeypatch.setattr(sparse_table, "MAX_KEYS", 4)
    rule = SGD(lr=0.1)
    t = SparseTable(TableSpec("s", 100, dim=2, sparse=True), 0, 1, 0, rule)
    with pytest.raises(e.TableFull, match="more than 4 keys") as info:
        t.apply(rule, np.arange(5), np.ones((5, 2), np.float32))
    assert info.value.code == "table_full"


def test_state_refuses_before_changing_anything():
    s = state()
    before = s.tables["f"].values.copy()
    with pytest.raises(e.BadKeys):
        s.push(0, 0, {"f": (np.array([60, 40]), np.ones((2, 2), np.float32))}, 1)
    np.testing.assert_array_equal(s.tables["f"].values, before)
    assert s.pushes == 0 and s.gate.clocks[0] == 0


def test_uint64_keys_past_int64_are_out_of_range_not_wrapped():
    keys = np.array([3, 2**63 + 1], np.uint64)  # as int64: [3, -9223372036854775807]
    dense = ShardState("j", [TableSpec("w", 10)], {"w": (0, 10)}, "async", 0, [0], SGD(lr=0.1), seed=0)
    with pytest.raises(e.BadKeys, match="outside"):
        dense.push(0, 0, {"w": (keys, np.ones(2, np.float32))}, 1)
    assert not dense.tables["w"].values.any() and dense.pushes == 0
    sparse = ShardState("j", [TableSpec("s", 2**32, sparse=True)], {"s": (0, 2**32)}, "async", 0, [0], SGD(lr=0.1), seed=0)
    with pytest.raises(e.BadKeys, match="key space"):
        sparse.push(0, 0, {"s": (keys, np.ones(2, np.float32))}, 1)
    assert len(sparse.tables["s"]) == 0
    with pytest.raises(e.BadKeys, match="sorted and unique"):  # unsigned, so no wrap-around in the order check
        sparse.tables["s"].locate(np.array([5, 3], np.uint64))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_non_finite_gradient_is_refused_counted_and_nothing_applied(bad, mode):
    s = state(mode, workers=(0, 1))
    grad = np.ones((2, 2), np.float32)
    grad[1, 0] = bad
    with pytest.raises(e.BadGradient, match=r"worker 1 pushed a non-finite gradient \(NaN/Inf\) for 'f'") as info:
        s.push(1, 0, {"w": (None, np.ones(10, np.float32)), "f": (np.array([50, 60]), grad)}, 1)
    assert info.value.code == "non_finite_gradient"
    assert s.gate.clocks[1] == 0 and s.pushes == 0 and s.samples == 0
    assert not s.tables["w"].values.any() and not s.tables["f"].values.any()
    assert s.status()["nonfinite_pushes"] == {"1": 1}
    # the honest worker's push is still applied (async) or accumulated (sync)
    s.push(0, 0, {"f": (np.array([50]), np.ones((1, 2), np.float32))}, 1)
    s.push(1, 0, {"f": (np.array([50]), np.ones((1, 2), np.float32))}, 1)
    assert np.isfinite(s.tables["f"].values).all() and s.tables["f"].values.any()
    assert s.status()["nonfinite_pushes"] == {"1": 1}


def test_a_pull_past_a_push_refused_as_non_finite_is_refused_not_left_waiting_for_itself():
    s = state("sync", workers=(0, 1))
    with pytest.raises(e.NonFiniteGradient):
        s.push(0, 0, {"w": (None, np.full(10, np.inf, np.float32))}, 1)
    s.check_pull_clock(0, 0)  # the clock it is at: fine
    s.check_pull_clock(1, 1)  # another worker: not its business
    with pytest.raises(e.NonFiniteGradient, match="worker 0 pulled at clock 1, but its push of clock 0 was refused") as info:
        s.check_pull_clock(0, 1)
    assert info.value.code == "non_finite_gradient"
    s.push(0, 0, {"w": (None, np.ones(10, np.float32))}, 1)  # a finite push of that clock is applied
    s.check_pull_clock(0, 1)
