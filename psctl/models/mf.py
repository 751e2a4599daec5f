"""Matrix factorization with biases, trained by SGD on sparse rows.

A rating r of user u for item i is predicted as

    mean + b_u + b_i + p_u . q_i

with the global mean from the statistics pass, and the mini-batch loss is the
mean over its ratings of

    0.5 (prediction - r)^2 + 0.5 l2 (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2)

(regularization per rating, as in Funk's SGD, so each step touches only the
rows of its batch). Tables: ``user_factors`` and ``item_factors`` (rank
columns, random normal init), ``user_bias`` and ``item_bias`` (zeros). ``X``
is an (n, 2) int64 array of table rows (user, item); ``keys(X)`` asks only
for those rows.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from psctl.core.tables import TableSpec
from psctl.data import ratings
from psctl.errors import PsctlError
from psctl.models.base import Model

TABLES = ("user_factors", "item_factors", "user_bias", "item_bias")


def _index(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted unique users and items of a batch, and each rating's position in them."""
    users, u = np.unique(X[:, 0], return_inverse=True)
    items, i = np.unique(X[:, 1], return_inverse=True)
    return users, u.reshape(-1), items, i.reshape(-1)


def _sum_rows(index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Row sums of ``values`` grouped by ``index`` (n groups)."""
    out = np.zeros((n, *values.shape[1:]), dtype=values.dtype)
    np.add.at(out, index, values)
    return out


def loss_grad(
    P: np.ndarray, Q: np.ndarray, bu: np.ndarray, bi: np.ndarray, u: np.ndarray, i: np.ndarray, y: np.ndarray, mean: float, l2: float
) -> tuple[float, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Mean loss, gradients for the rows P, Q, bu, bi, and the predictions.

    ``u`` and ``i`` index each rating's row in P/bu and Q/bi.
    """
    pu, qi = P[u], Q[i]
    pred = mean + bu[u] + bi[i] + np.einsum("nk,nk->n", pu, qi)
    err = pred - y
    n = max(len(y), 1)
    reg = (pu * pu).sum(1) + (qi * qi).sum(1) + bu[u] ** 2 + bi[i] ** 2
    loss = float(np.mean(0.5 * err * err + 0.5 * l2 * reg)) if len(y) else 0.0
    e = err[:, None]
    gP = _sum_rows(u, e * qi + l2 * pu, len(P)) / n
    gQ = _sum_rows(i, e * pu + l2 * qi, len(Q)) / n
    gbu = np.bincount(u, err + l2 * bu[u], minlength=len(bu)) / n
    gbi = np.bincount(i, err + l2 * bi[i], minlength=len(bi)) / n
    return loss, (gP, gQ, gbu, gbi), pred


class MF(Model):
    """Biased matrix factorization; ``users``, ``items`` and ``mean`` come from the statistics pass."""

    kind = "mf"
    task = "regression"
    data_format = "ratings"
    # Each user's and item's rows get the sum of their ratings' gradients (key_sums), so the
    # step a rating makes does not shrink with the batch or the workers; AdaGrad then needs
    # no tuning per mode (docs/DEFAULTS.md, MovieLens small).
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adagrad", "lr": 0.1, "batch_size": 512, "epochs": 10, "l2": 0.1, "converge": True,
    }  # fmt: skip
    #: ``rating_min``/``rating_max``: the range of the training ratings (from the statistics
    #: pass); predictions are clipped to it. None in model files written before it was kept:
    #: those predict unclipped.
    params = {"rank": 10, "init_scale": 0.05, "users": 0, "items": 0, "mean": 0.0, "rating_min": None, "rating_max": None}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if int(self.options["rank"]) < 1:
            raise PsctlError("mf --rank must be at least 1")
        if not float(self.options["init_scale"]) > 0:
            raise PsctlError("mf init_scale must be positive")
        self.rank = int(self.options["rank"])
        self.mean = float(self.options["mean"])
        low, high = self.options["rating_min"], self.options["rating_max"]
        if (low is None) != (high is None) or (low is not None and not float(low) <= float(high)):
            raise PsctlError("mf rating_min and rating_max must both be given, with rating_min <= rating_max")
        self.rating_range = None if low is None else (float(low), float(high))

    @classmethod
    def data_params(cls, stats: dict[str, Any]) -> dict[str, Any]:
        vocabs = stats["vocab"]
        low, high = ratings.rating_range(stats["stats"])
        return {
            "users": len(vocabs[ratings.USER]),
            "items": len(vocabs[ratings.ITEM]),
            "mean": ratings.global_mean(stats["stats"]),
            "rating_min": low,
            "rating_max": high,
        }

    def clip(self, pred: np.ndarray) -> np.ndarray:
        """``pred`` clipped to the training ratings' range (unchanged for models without one; NaN stays NaN)."""
        if self.rating_range is None:
            return pred
        return np.clip(pred, *self.rating_range)

    @property
    def key_sums(self) -> bool:
        return True

    def tables(self) -> list[TableSpec]:
        users, items = int(self.options["users"]), int(self.options["items"])
        scale = float(self.options["init_scale"])
        return [
            TableSpec("user_factors", users, self.rank, init="normal", init_scale=scale),
            TableSpec("item_factors", items, self.rank, init="normal", init_scale=scale),
            TableSpec("user_bias", users),
            TableSpec("item_bias", items),
        ]

    def keys(self, X: np.ndarray) -> dict[str, np.ndarray | None]:
        users, _, items, _ = _index(X)
        return {"user_factors": users, "item_factors": items, "user_bias": users, "item_bias": items}

    def _factors(self, table: np.ndarray) -> np.ndarray:
        # A rank-1 table is stored 1-d (TableSpec.shape); compute on columns anyway.
        return table.reshape(len(table), self.rank)

    def loss_grad(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray):
        _, u, _, i = _index(X)
        P, Q = self._factors(params["user_factors"]), self._factors(params["item_factors"])
        loss, (gP, gQ, gbu, gbi), pred = loss_grad(
            P, Q, params["user_bias"], params["item_bias"], u, i, y, self.mean, self.l2
        )
        grads = {
            "user_factors": gP.reshape(params["user_factors"].shape),
            "item_factors": gQ.reshape(params["item_factors"].shape),
            "user_bias": gbu,
            "item_bias": gbi,
        }
        return loss, {k: v.astype(params[k].dtype, copy=False) for k, v in grads.items()}, pred

    def predict(self, params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        """Predictions for (user row, item row) pairs that are all in the tables, clipped to
        the training ratings' range (see :meth:`clip`)."""
        P, Q = self._factors(params["user_factors"]), self._factors(params["item_factors"])
        u, i = X[:, 0], X[:, 1]
        return self.clip(self.mean + params["user_bias"][u] + params["item_bias"][i] + np.einsum("nk,nk->n", P[u], Q[i]))
