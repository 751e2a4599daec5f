"""Matrix factorization: the loss and its gradient on sparse rows, tables, keys, predictions."""

import numpy as np
import pytest

from psctl.core.tables import init_values, shard_ranges
from psctl.data.vocab import Vocab
from psctl.errors import PsctlError
from psctl.models import MODELS
from psctl.models.mf import MF

RNG = np.random.default_rng(5)


def batch(n=40, users=6, items=9):
    X = np.stack([RNG.integers(0, users, n), RNG.integers(0, items, n)], axis=1)
    return X, RNG.uniform(0.5, 5, n)


def full_tables(model, scale=0.5):
    return {t.name: RNG.normal(0, scale, t.shape(t.rows)) for t in model.tables()}


def pulled(tables, keys):
    return {name: tables[name][k] for name, k in keys.items()}


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_gradient_matches_finite_differences(rank, l2):
    model = MF(2, [], l2=l2, rank=rank, users=6, items=9, mean=3.2)
    X, y = batch()
    keys = model.keys(X)
    params = pulled(full_tables(model), keys)
    loss, grads, _ = model.loss_grad(params, X, y)
    eps = 1e-6
    for name, P in params.items():
        numeric = np.zeros_like(P)
        for i in np.ndindex(P.shape):
            d = np.zeros_like(P)
            d[i] = eps
            up = model.loss_grad({**params, name: P + d}, X, y)[0]
            down = model.loss_grad({**params, name: P - d}, X, y)[0]
            numeric[i] = (up - down) / (2 * eps)
        assert grads[name].shape == P.shape
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)
    assert isinstance(loss, float)


def test_loss_is_the_mean_of_the_per_rating_terms():
    model = MF(2, [], l2=0.5, rank=2, users=2, items=2, mean=3.0)
    t = {"user_factors": np.array([[1.0, 0.0], [0.0, 2.0]]), "item_factors": np.array([[1.0, 1.0], [0.0, 0.0]]),
         "user_bias": np.array([0.5, 0.0]), "item_bias": np.array([0.0, -1.0])}
    X = np.array([[0, 0], [1, 1]])
    loss, _, pred = model.loss_grad(t, X, np.array([4.0, 2.0]))
    np.testing.assert_allclose(pred, [3.0 + 0.5 + 1.0, 3.0 - 1.0])
    first = 0.5 * 0.5**2 + 0.25 * (1 + 2 + 0.25)
    second = 0.5 * 0.0 + 0.25 * (4 + 0 + 1)
    assert loss == pytest.approx((first + second) / 2)


def test_keys_are_the_batch_rows_only():
    model = MF(2, [], rank=2, users=100, items=100)
    keys = model.keys(np.array([[7, 3], [2, 3], [7, 50]]))
    assert keys["user_factors"].tolist() == keys["user_bias"].tolist() == [2, 7]
    assert keys["item_factors"].tolist() == keys["item_bias"].tolist() == [3, 50]


def test_predict_agrees_with_the_training_outputs():
    model = MF(2, [], rank=4, users=6, items=9, mean=3.5)
    tables = full_tables(model)
    X, y = batch()
    _, _, outputs = model.loss_grad(pulled(tables, model.keys(X)), X, y)
    np.testing.assert_allclose(model.predict(tables, X), outputs)


def test_float32_tables_get_float32_gradients():
    model = MF(2, [], rank=3, users=6, items=9, mean=3.0)
    tables = {k: v.astype(np.float32) for k, v in full_tables(model).items()}
    X, y = batch()
    _, grads, _ = model.loss_grad(pulled(tables, model.keys(X)), X, y.astype(np.float32))
    assert all(g.dtype == np.float32 for g in grads.values())


def test_tables_factors_random_normal_biases_zero_and_independent_of_sharding():
    model = MF(2, [], rank=5, users=9000, items=30, init_scale=0.1)
    specs = {t.name: t for t in model.tables()}
    assert specs["user_factors"].init == "normal" and specs["user_factors"].shape(9000) == (9000, 5)
    assert specs["user_bias"].init == "zeros" and specs["item_bias"].rows == 30
    spec = specs["user_factors"]
    whole = init_values(spec, 0, spec.rows, seed=3)
    for n_shards in (2, 3, 7):
        parts = [init_values(spec, lo, hi, seed=3) for lo, hi in shard_ranges(spec.rows, n_shards)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert abs(whole.std() - 0.1) < 0.005


def test_sizes_and_mean_come_from_the_statistics_pass():
    stats = {
        "stats": [{"count": 2, "mean": [3.0], "m2": [0.5]}, {"count": 2, "mean": [4.0], "m2": [0.0]}],
        "labels": [],
        "vocab": {"user": Vocab.from_strings(["a", "b", "c"]), "item": Vocab.from_strings(["1"])},
    }
    # statistics without the rating range (workers of an older psctl): no range, no clipping
    assert MF.data_params(stats) == {"users": 3, "items": 1, "mean": pytest.approx(3.5), "rating_min": None, "rating_max": None}
    stats["stats"][0].update(min=2.5, max=3.5)
    stats["stats"][1].update(min=4.0, max=4.0)
    assert MF.data_params(stats)["rating_min"] == 2.5 and MF.data_params(stats)["rating_max"] == 4.0
    assert MODELS["mf"] is MF and MF.data_format == "ratings"


def test_bad_rank():
    with pytest.raises(PsctlError, match="--rank must be at least 1"):
        MF(2, [], rank=0)


def test_each_shard_holds_only_its_share_of_the_rows():
    from psctl.cluster.shard import ShardState
    from psctl.core.optim import SGD

    model = MF(2, [], rank=10, users=610, items=9000)
    tables = model.tables()
    n_shards = 4
    ranges = {t.name: shard_ranges(t.rows, n_shards) for t in tables}
    held = []
    for i in range(n_shards):
        state = ShardState("j", tables, {n: r[i] for n, r in ranges.items()}, "sync", 0, [0], SGD(lr=1.0), seed=0)
        held.append(state.status()["bytes"])
        assert state.status()["bytes"] == sum((r[i][1] - r[i][0]) * t.dim * 4 for t, r in zip(tables, ranges.values()))
    total = sum(t.rows * t.dim * 4 for t in tables)
    assert sum(held) == total and max(held) <= total / n_shards + 2 * (10 + 1) * 4  # at most a row more per table
