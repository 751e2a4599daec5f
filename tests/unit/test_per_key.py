"""Per-key summed gradients (``Model.key_sums``): a key's update reflects the rows that
touched it, not the batch size or the worker count.

The worker's step (``step_figures``, which turns a key_sums model's mean gradient into
per-key sums) feeds a shard's state (``ShardState``: sync accumulation, the optimizer), as
the worker and shard services do, without sockets; the wire's ``sums`` field is checked on
the shard service with in-memory peers."""

from __future__ import annotations

import numpy as np
import pytest

from psctl.cluster.worker import step_figures
from psctl.core.optim import FTRL, SGD, AdaGrad, Adam
from psctl.core.shard_errors import MixedPush
from psctl.core.shard_state import ShardState
from psctl.core.sparse import SparseRows
from psctl.core.tables import TableSpec
from psctl.models.base import LinearModel
from psctl.models.logreg import _sigmoid
from psctl.models.mf import MF
from psctl.models.registry import model_class
from psctl.protocol.wire import Message, MsgType

from .test_shard_pulls import service

pytestmark = pytest.mark.timeout(10)

KEYS = 192  # each block of 64 rows uses every key once: 3 per row
PER_ROW = 3
BLOCK = KEYS // PER_ROW


class NoBiasLogReg(LinearModel):
    """Sparse logistic regression without a bias (ps-lite's): every key of the data set is a
    feature key, so "each key once per batch" holds for every key the batch pushes."""

    kind = "nobias"
    task = "binary"

    def keys(self, X):
        return {"w": X.keys}

    def loss_grad(self, params, X, y):
        z = X @ params["w"]
        p = _sigmoid(z)
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
        return loss, {"w": X.T @ ((p - y) / len(y))}, p


def data(blocks: int = 6, seed: int = 0) -> tuple[SparseRows, np.ndarray]:
    """``blocks`` x 64 rows; within each block of 64 consecutive rows every key appears once."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=KEYS)
    indptr = np.arange(0, blocks * KEYS + 1, PER_ROW, dtype=np.int64)
    indices = np.concatenate([rng.permutation(KEYS) for _ in range(blocks)]).reshape(-1, PER_ROW)
    indices = np.sort(indices, axis=1).reshape(-1).astype(np.int64)
    values = rng.normal(size=len(indices)).astype(np.float32)
    X = SparseRows(indptr, indices, values, KEYS)
    y = (X @ truth + rng.normal(0, 0.3, size=len(X)) > 0).astype(np.float32)
    return X, y


def train(model, X, y, rule, batch: int, workers: int = 1, sums: bool | None = None, mode: str = "sync") -> np.ndarray:
    """Training on one shard: each clock, worker j takes the j-th slice of the next
    ``workers * batch`` rows; returns the weights of every key."""
    spec = TableSpec("w", KEYS, sparse=True)
    state = ShardState("j", [spec], {"w": (0, KEYS)}, mode, 0, list(range(workers)), rule, seed=0)
    sums = model.key_sums if sums is None else sums
    for clock, start in enumerate(range(0, len(X), batch * workers)):
        params_all = {}
        for w in range(workers):  # every pull of a clock sees the weights before it
            idx = np.arange(start + w * batch, min(start + (w + 1) * batch, len(X)))
            keys = model.keys(X[idx])["w"]
            params_all[w] = (idx, keys, {"w": state.read(["w"], [keys])[0]})
        for w, (idx, keys, params) in params_all.items():
            _, grads, _ = step_figures(model, params, X[idx], y[idx], epoch=0)
            if not sums:  # the old rule: the batch's mean
                grads = {"w": grads["w"] / (len(idx) if model.key_sums else 1)}
            state.push(w, clock, {"w": (keys, grads["w"])}, len(idx), sums=sums)
    keys = np.arange(KEYS, dtype=np.int64)
    return state.read(["w"], [keys])[0].astype(np.float64)


def test_sgd_learns_the_same_weights_at_batch_1_and_64_with_per_key_sums():
    X, y = data()
    model = NoBiasLogReg(KEYS, ["0", "1"], sparse=True)
    one = train(model, X, y, SGD(lr=0.5), batch=1)
    sixty_four = train(model, X, y, SGD(lr=0.5), batch=64)
    assert np.abs(one).max() > 0.5  # it learned something
    np.testing.assert_allclose(sixty_four, one, rtol=1e-5, atol=1e-6)
    # The batch mean shrinks each key's step 64-fold: far from batch 1's weights.
    means = train(model, X, y, SGD(lr=0.5), batch=64, sums=False)
    assert np.abs(means).max() < np.abs(one).max() / 10


@pytest.mark.parametrize("rule", [SGD(lr=0.5), AdaGrad(lr=0.3), Adam(lr=0.05), FTRL(lr=0.2, l2=0.01)], ids=type)
def test_sync_adds_the_workers_sums_as_one_process_pushes_the_union_batch(rule):
    """The sync rule: a clock's update is the sum of the workers' per-key sums, which is what
    one process pushes for the union of their batches (keys shared by two workers here). The
    one process: a lone worker in async mode, whose pushes the shard applies as they come."""
    X, y = data(blocks=4, seed=1)
    model = NoBiasLogReg(KEYS, ["0", "1"], sparse=True)
    union = train(model, X, y, rule, batch=32, workers=1, mode="async")
    apart = train(model, X, y, rule, batch=8, workers=4)
    np.testing.assert_allclose(apart, union, rtol=1e-5, atol=1e-6)


def test_linear_models_on_sparse_input_and_mf_push_sums_and_dense_models_means():
    X, y = data(blocks=1)
    logreg = model_class("logreg")(KEYS, ["0", "1"], sparse=True)
    params = {"w": np.full(KEYS + 1, 0.1, np.float32)[np.append(np.unique(X.keys), KEYS)]}
    _, mean, _ = logreg.loss_grad(params, X, y)
    _, pushed, _ = step_figures(logreg, params, X, y, epoch=0)
    np.testing.assert_allclose(pushed["w"], mean["w"] * len(y), rtol=1e-6)
    assert not model_class("logreg")(KEYS, ["0", "1"]).key_sums
    assert MF(2, users=3, items=3, rank=2).key_sums


def test_a_sync_clock_never_mixes_sums_and_means():
    spec = TableSpec("w", KEYS, sparse=True)
    state = ShardState("j", [spec], {"w": (0, KEYS)}, "sync", 0, [0, 1], SGD(lr=1.0), seed=0)
    keys = np.array([1, 2], np.int64)
    state.push(0, 0, {"w": (keys, np.ones(2, np.float32))}, 4, sums=True)
    with pytest.raises(MixedPush, match="clock 0 holds per-key sums"):
        state.push(1, 0, {"w": (keys, np.ones(2, np.float32))}, 4)
    assert state.gate.clocks[1] == 0  # refused whole: the clock did not move
    state.push(1, 0, {"w": (keys, np.ones(2, np.float32))}, 4, sums=True)
    np.testing.assert_allclose(state.read(["w"], [keys])[0], [-2.0, -2.0])  # added, not averaged


def test_the_push_frame_carries_sums_as_a_boolean():
    s, (a, b, c) = service()

    def push(peer, sums):
        body = {"job_id": "j", "tables": ["w"], "clock": 0, "count": 2, "sums": sums}
        return s.handle(peer, Message(MsgType.PUSH, body, [np.ones(8, np.float32)]))

    with pytest.raises(Exception, match="'sums' must be true or false"):
        push(a, 1)
    for peer in (a, b, c):
        push(peer, True)
    np.testing.assert_allclose(s.state.read(["w"])[0], -0.5 * 3)  # lr 0.5, three sums added
