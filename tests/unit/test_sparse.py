"""Sparse rows, key routing and sparse tables: the pure parts of the sparse path."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psctl.cluster.shard import ShardState
from psctl.core import sparse_table
from psctl.core.optim import FTRL, SGD
from psctl.core.sparse import (
    SparseRows,
    distinct,
    key_owner,
    keyed_normal,
    mix64,
    narrow_keys,
    route_keys,
)
from psctl.core.sparse_table import SparseTable
from psctl.core.tables import TableSpec, table_ranges
from psctl.errors import RequestError
from psctl.models import MODELS

RNG = np.random.default_rng(5)


def random_rows(n=25, n_cols=15, per_row=6, duplicates=True) -> SparseRows:
    lengths = RNG.integers(0, per_row, size=n)
    rows = np.repeat(np.arange(n), lengths)
    keys = RNG.integers(0, n_cols, size=len(rows))  # duplicate keys within a row happen
    if not duplicates:
        keep = np.unique(rows * n_cols + keys, return_index=True)[1]
        rows, keys = rows[keep], keys[keep]
    return SparseRows.from_coo(n, rows, keys, RNG.normal(size=len(rows)), n_cols)


# -- SparseRows --------------------------------------------------------------------------
def test_products_match_dense_including_duplicate_keys():
    X = random_rows()
    D = X.to_dense()
    keys = X.keys
    for shape in [(15,), (15, 3)]:
        W = RNG.normal(size=shape)
        np.testing.assert_allclose(X @ W[keys], D @ W, atol=1e-5)
        err = RNG.normal(size=(len(X), *shape[1:]))
        np.testing.assert_allclose(X.T @ err, (D.T @ err)[keys], atol=1e-5)


def test_duplicate_keys_in_one_batch_sum_into_one_gradient_row():
    # key 7 twice in row 0 (hash collision) and once in row 1; key 2 once
    X = SparseRows(np.array([0, 3, 4]), np.array([7, 2, 7, 7]), np.array([1.0, 1.0, 0.5, 2.0]))
    assert X.keys.tolist() == [2, 7]
    np.testing.assert_allclose(X @ np.array([10.0, 1.0]), [10 + 1.5, 2.0])
    np.testing.assert_allclose(X.T @ np.array([1.0, -1.0]), [1.0, 1.5 - 2.0])


def test_row_selection_and_empty_rows():
    X = SparseRows.from_rows([{1: 1.0}, {}, {3: 2.0, 4: 3.0}, {}])
    sub = X[np.array([2, 1, 0])]
    assert len(sub) == 3 and sub.indptr.tolist() == [0, 2, 2, 3]
    assert sub.indices.tolist() == [3, 4, 1] and sub.values.tolist() == [2.0, 3.0, 1.0]
    np.testing.assert_array_equal(X[np.array([1, 3])].to_dense(5), np.zeros((2, 5)))
    assert (X[np.array([1])] @ np.zeros(0)).tolist() == [0.0]


@pytest.mark.parametrize(("kind", "classes"), [("logreg", ["0", "1"]), ("softmax", ["a", "b", "c"]), ("svm", ["a", "b"]), ("svm", list("abcd"))])
def test_sparse_models_equal_dense_on_the_keys_they_touch(kind, classes):
    X = random_rows(n_cols=12)
    sparse = MODELS[kind](12, classes, l2=0.1, sparse=True)
    dense = MODELS[kind](12, classes, l2=0.1)
    (spec,) = sparse.tables()
    assert spec.sparse and spec.rows == 13
    W = RNG.normal(size=spec.shape(13))
    y = RNG.integers(0, len(classes), size=len(X)).astype(float if kind == "logreg" else int)
    keys = sparse.keys(X)["w"]
    assert keys[-1] == 12 and keys[:-1].tolist() == X.keys.tolist()  # the bias key last
    _, g_dense, out_dense = dense.loss_grad({"w": W}, X.to_dense(12), y)
    _, g_sparse, out_sparse = sparse.loss_grad({"w": W[keys]}, X, y)
    np.testing.assert_allclose(g_sparse["w"], g_dense["w"][keys], atol=1e-6)
    np.testing.assert_allclose(out_sparse, out_dense, atol=1e-6)


# -- keys and routing ---------------------------------------------------------------------------
def test_mix64_is_a_bijection_on_a_sample_and_spreads_neighbours():
    keys = np.arange(100_000, dtype=np.uint64)
    assert len(np.unique(mix64(keys))) == len(keys)
    counts = np.bincount(key_owner(keys, 4), minlength=4)
    assert counts.min() > 0.97 * len(keys) / 4  # sequential (hot) ranges spread evenly


@pytest.mark.parametrize("n_shards", [1, 2, 3, 8])
def test_route_keys_partitions_sorted_keys_at_the_edges_of_the_key_space(n_shards):
    rows = 2**32
    keys = np.unique(np.concatenate([[0, 1, rows - 2, rows - 1], RNG.integers(0, rows, 1000)]))
    parts = route_keys(keys, n_shards)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(keys)))
    spec = TableSpec("w", rows, sparse=True)
    for i, part in enumerate(parts):
        assert (np.diff(keys[part]) > 0).all()
        table = SparseTable(spec, i, n_shards, 0, SGD(0.1))
        table.locate(keys[part])  # the owner accepts its keys ...
        for j in range(n_shards):
            if j != i and len(part):
                with pytest.raises(RequestError, match="another shard owns"):
                    SparseTable(spec, j, n_shards, 0, SGD(0.1)).locate(keys[part])  # ... nobody else does
    assert table_ranges(spec, n_shards) == [(0, rows)] * n_shards


def test_narrow_keys_picks_the_smallest_wire_type():
    keys = np.array([0, 5, 123])
    assert narrow_keys(keys, 124).dtype == np.uint8
    assert narrow_keys(keys, 257).dtype == np.uint32
    assert narrow_keys(keys, 2**32).dtype == np.uint32
    assert narrow_keys(keys, 2**32 + 1).dtype == np.int64


def test_keyed_normal_depends_only_on_the_key():
    a = keyed_normal(np.array([5, 9, 2**40]), seed=3, salt=1, scale=0.01, dim=2)
    b = keyed_normal(np.array([2**40, 5]), seed=3, salt=1, scale=0.01, dim=2)
    np.testing.assert_array_equal(a[[2, 0]], b)
    big = keyed_normal(np.arange(20_000), seed=0, salt=0, scale=1.0, dim=1)
    assert abs(big.mean()) < 0.05 and abs(big.std() - 1) < 0.05


# -- SparseTable ------------------------------------------------------------------------------------
def test_rows_exist_only_after_a_push():
    t = SparseTable(TableSpec("w", 2**32, dim=2, sparse=True), 0, 1, 0, SGD(0.5))
    keys = np.array([3, 2**32 - 1])
    np.testing.assert_array_equal(t.read(keys), np.zeros((2, 2)))
    assert len(t) == 0  # a pull does not store anything
    t.apply(SGD(0.5), keys, np.ones((2, 2), np.float32))
    assert len(t) == 2
    np.testing.assert_allclose(t.read(np.array([2, 3, 2**32 - 1])), [[0, 0], [-0.5, -0.5], [-0.5, -0.5]])


def test_normal_init_is_seeded_per_key_whatever_the_shard_count():
    spec = TableSpec("e", 10**12, dim=3, init="normal", sparse=True)
    keys = np.unique(RNG.integers(0, 10**12, 50))
    one = SparseTable(spec, 0, 1, 7, SGD(0.1)).read(keys)
    parts = route_keys(keys, 3)
    three = np.empty_like(one)
    for i, part in enumerate(parts):
        three[part] = SparseTable(spec, i, 3, 7, SGD(0.1)).read(keys[part])
    np.testing.assert_array_equal(one, three)
    assert 0.005 < one.std() < 0.02


def test_matches_a_dict_through_many_inserts_and_index_merges(monkeypatch):
    monkeypatch.setattr(sparse_table, "DELTA_MIN_KEYS", 64)  # merge the delta index often
    rule = FTRL(lr=0.5, l1=0.01)
    spec = TableSpec("w", 2**40, sparse=True)
    t = SparseTable(spec, 0, 1, 0, rule)
    ref: dict[int, list[float]] = {}  # key -> gradients seen
    for step in range(60):
        keys = np.unique(np.concatenate([RNG.integers(0, 2**40, 40), RNG.integers(0, 200, 20)]))
        grads = RNG.normal(size=len(keys)).astype(np.float32)
        t.apply(rule, keys, grads)
        for k, g in zip(keys.tolist(), grads.tolist()):
            ref.setdefault(k, []).append(g)
    keys, values, state = t.dump(with_state=True)
    assert keys.tolist() == sorted(ref) and len(t) == len(ref)
    expected = []
    for k in keys.tolist():
        w = np.zeros(1, np.float32)
        st = rule.init_state(w)
        for g in ref[k]:
            rule.apply(w, np.array([g], np.float32), st, None, 0)
        expected.append(w[0])
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-7)
    assert set(state) == {"z", "n"} and state["n"].shape == values.shape


def test_memory_grows_with_touched_keys_not_the_key_space():
    t = SparseTable(TableSpec("w", 2**62, sparse=True), 0, 1, 0, SGD(0.1))
    for _ in range(10):
        keys = np.unique(RNG.integers(0, 2**62, 20_000))
        t.apply(SGD(0.1), keys, np.ones(len(keys), np.float32))
    # 12 bytes of index + 4 of value per key, plus at most half again of spare rows
    assert t.nbytes / len(t) < 12 + 4 * 1.5 + 1


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        (np.array([5, 5]), "sorted and unique"),
        (np.array([9, 5]), "sorted and unique"),
        (np.array([0, 2**20]), "outside its key space"),
        (np.array([2**63 + 5], dtype=np.uint64), "outside its key space"),
        (np.array([1.0]), "integer array"),
    ],
)
def test_bad_keys_are_refused(keys, match):
    t = SparseTable(TableSpec("w", 2**20, sparse=True), 0, 1, 0, SGD(0.1))
    with pytest.raises(RequestError, match=match):
        t.locate(keys)


def test_whole_table_pulls_and_pushes_are_refused():
    t = SparseTable(TableSpec("w", 100, sparse=True), 0, 1, 0, SGD(0.1))
    with pytest.raises(RequestError, match="pushes must carry keys"):
        t.check_grad(None, np.zeros(100, np.float32))
    with pytest.raises(RequestError, match="pull its rows by key"):
        t.read(None)


# -- on a shard ----------------------------------------------------------------------------------
def test_sync_mean_over_workers_with_the_same_keys_on_a_sparse_table():
    spec = TableSpec("w", 2**32, sparse=True)
    s = ShardState("j", [spec], {"w": (0, 2**32)}, "sync", 0, [0, 1], SGD(lr=1.0), seed=0)
    s.push(0, 0, {"w": (np.array([7, 2**32 - 1], np.uint32), np.array([1.0, 2.0], np.float32))}, 1)
    assert len(s.tables["w"]) == 0  # waits for worker 1
    s.push(1, 0, {"w": (np.array([7]), np.array([4.0], np.float32))}, 3)
    np.testing.assert_allclose(s.read(["w"], [np.array([7, 2**32 - 1])])[0], [-(1 + 12) / 4, -2 / 4])
    status = s.status()
    assert status["keys"] == 2 and status["bytes"] > 0  # memory figures come from the service, not the pure state


def test_rows_found_before_a_push_still_read_the_pushed_values():
    # A pull locates its keys when it arrives and reads when the gate opens; a push in
    # between may store keys that were missing, and must be seen.
    t = SparseTable(TableSpec("w", 2**32, sparse=True, init="normal"), 0, 1, 0, SGD(0.5))
    t.apply(SGD(0.5), np.array([5], np.int64), np.ones(1, np.float32))
    keys = np.array([3, 5, 9], np.int64)
    rows = t.locate(keys)
    assert (rows[[0, 2]] == -1).all() and rows[1] >= 0
    t.apply(SGD(0.5), np.array([3, 9], np.int64), np.ones(2, np.float32))
    np.testing.assert_array_equal(t.read(keys, rows), t.read(keys))
    assert (t.locate(keys) >= 0).all()


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(-2**62, 2**62), max_size=60), small=st.booleans())
def test_distinct_is_what_np_unique_gives(values, small):
    a = np.array(values, dtype=np.int64) % (7 if small else 2**62)
    got = distinct(a)
    np.testing.assert_array_equal(got, np.unique(a))
    assert got.dtype == a.dtype
    texts = a.astype(str)
    np.testing.assert_array_equal(distinct(texts), np.unique(texts))


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.integers(0, 30), min_size=0, max_size=40), asked=st.lists(st.integers(0, 35), max_size=10))
def test_occurrences_counts_the_entries_with_those_keys(keys, asked):
    X = SparseRows(np.array([0, len(keys)]), np.array(keys, np.int64), np.ones(len(keys), np.float32), 40)
    wanted = np.unique(np.array(asked, np.int64))
    assert X.occurrences(wanted) == int(np.isin(np.array(keys, np.int64), wanted).sum())
