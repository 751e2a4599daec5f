"""Using a matrix factorization model: rating predictions with a cold-start
strategy, and top-k recommendations per user (vectorized over users).

The model file holds the tables, the global mean (in meta) and the id
vocabularies (``vocab_user``, ``vocab_item``), so nothing else is needed.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from psctl.data import csvfile, ratings
from psctl.errors import DataError
from psctl.files.loading import MFModel, from_loaded, load_mf  # noqa: F401  (part of this module's API)
from psctl.models import metrics

#: Spark's coldStartStrategy ("nan", "drop") plus "mean": global mean + the known side's bias.
COLD_START = ("nan", "drop", "mean")
#: Scores computed per block of users when recommending for everyone (bounds memory: 8 bytes each).
BLOCK_SCORES = 16 << 20


def _column_ref(schema: csvfile.CsvSchema, index: int) -> str:
    return schema.columns[index] if schema.has_header else str(index)


def input_schema(mf: MFModel, path: str, need_rating: bool = False) -> csvfile.CsvSchema:
    """The model's user and item columns (and the rating, if present) in ``path``."""
    s = mf.schema
    rating = _column_ref(s, s.label_index) if s.label_index is not None else "rating"
    return ratings.read_schema(
        path, _column_ref(s, s.feature_indices[0]), _column_ref(s, s.feature_indices[1]), rating, s.has_header, need_rating
    )


# -- predictions ------------------------------------------------------------------------
@dataclass
class RatingsPrediction:
    """Predictions for the rows of a ratings file (the rows kept by the cold-start strategy)."""

    meta: dict[str, Any]
    ids: np.ndarray  # (n, 2) str: user, item of each kept row
    outputs: np.ndarray  # predicted ratings (NaN for cold-start rows under "nan")
    truth: np.ndarray | None  # the file's ratings of the kept rows, when it has them
    metrics: dict[str, Any] | None
    cold_start: dict[str, Any]
    columns: tuple[str, str, str | None]  # user, item, rating column names

    @property
    def predicted(self) -> np.ndarray:
        return self.outputs


def predict_ratings(mf: MFModel, data_path: str, cold_start: str = "nan") -> RatingsPrediction:
    """Predict every row of ``data_path``; rows with an unknown user or item are handled
    by ``cold_start`` (see COLD_START). Metrics cover the rows with a prediction."""
    if cold_start not in COLD_START:
        raise DataError(f"--cold-start must be one of {', '.join(COLD_START)}")
    schema = input_schema(mf, data_path)
    ids, truth = ratings.read_ratings(data_path, schema)
    pred, rows = predict_pairs(mf, ids, cold_start)
    u, i = rows[:, 0], rows[:, 1]
    known = (u >= 0) & (i >= 0)
    keep = known if cold_start == "drop" else np.ones(len(rows), dtype=bool)
    has_truth = schema.label_index is not None
    summary = {
        "strategy": cold_start,
        "rows": int(len(rows)),
        "cold_rows": int((~known).sum()),
        "unknown_users": int((u < 0).sum()),
        "unknown_items": int((i < 0).sum()),
    }
    scores = None
    if has_truth:
        scored = np.isfinite(pred)
        summary["scored_rows"] = int(scored.sum())
        y, p = truth[scored], pred[scored]
        scores = {"rows": int(scored.sum())}
        if len(y):
            scores.update(rmse=metrics.rmse(y, p), mae=metrics.mae(y, p))
    names = (mf.user_col, mf.item_col, mf.rating_col if has_truth else None)
    return RatingsPrediction(mf.meta, ids[keep], pred[keep], truth[keep] if has_truth else None, scores, summary, names)


def predict_pairs(mf: MFModel, ids: np.ndarray, cold_start: str = "nan") -> tuple[np.ndarray, np.ndarray]:
    """Predicted ratings for (user id, item id) text pairs, shape (n, 2), and their table rows
    (-1 for an id the model has not seen). Unseen pairs are NaN, or with ``cold_start`` "mean"
    the global mean plus the known side's bias (``psctl predict`` and ``psctl serve`` both call this)."""
    rows = ratings.encode_rows(ids, {ratings.USER: mf.users, ratings.ITEM: mf.items})
    u, i = rows[:, 0], rows[:, 1]
    known = (u >= 0) & (i >= 0)
    pred = np.full(len(rows), np.nan)
    pred[known] = mf.model.predict(mf.params, rows[known])
    if cold_start == "mean":
        cold = ~known
        pred[cold] = mf.model.mean
        pred[cold & (u >= 0)] += mf.params["user_bias"][u[cold & (u >= 0)]]
        pred[cold & (i >= 0)] += mf.params["item_bias"][i[cold & (i >= 0)]]
    return pred, rows


def describe_cold_start(summary: dict[str, Any]) -> str:
    """One line on the cold-start rows and what happened to them."""
    n, cold = summary["rows"], summary["cold_rows"]
    if not cold:
        return f"cold start: none of the {n} rows (every user and item is in the model)"
    what = {
        "nan": "predicted as NaN and left out of RMSE/MAE",
        "drop": "dropped from the predictions and the metrics",
        "mean": "predicted as the global mean plus the known side's bias",
    }[summary["strategy"]]
    return (
        f"cold start: {cold} of {n} rows have a user ({summary['unknown_users']}) or item "
        f"({summary['unknown_items']}) the model has not seen; --cold-start {summary['strategy']}: {what}"
    )


def write_rating_predictions(pred: RatingsPrediction, out: str) -> None:
    user, item, rating = pred.columns
    try:
        with open(out, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([user, item, *([rating] if rating else []), "predicted"])
            values = [f"{v:.6g}" for v in pred.outputs.tolist()]
            if rating and pred.truth is not None:
                truth = [repr(v) for v in pred.truth.tolist()]
                writer.writerows(zip(pred.ids[:, 0].tolist(), pred.ids[:, 1].tolist(), truth, values))
            else:
                writer.writerows(zip(pred.ids[:, 0].tolist(), pred.ids[:, 1].tolist(), values))
    except OSError as exc:
        raise DataError(f"cannot write predictions to '{out}': {exc.strerror or exc}") from None


# -- recommendations -------------------------------------------------------------------
def read_exclusions(mf: MFModel, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(user rows, item rows) of the pairs in a ratings file that the model knows,
    sorted by user: the items each user has already rated."""
    ids, _ = ratings.read_ratings(path, input_schema(mf, path))
    rows = ratings.encode_rows(ids, {ratings.USER: mf.users, ratings.ITEM: mf.items})
    rows = rows[(rows >= 0).all(axis=1)]
    order = np.argsort(rows[:, 0], kind="stable")
    return rows[order, 0], rows[order, 1]


def rated_count(mf: MFModel, user: str, exclude: tuple[np.ndarray, np.ndarray]) -> int:
    """How many of ``exclude``'s pairs belong to ``user``."""
    [row] = mf.users.rows(np.array([user]))
    return int(np.count_nonzero(exclude[0] == row)) if row >= 0 else 0


def scores_for(mf: MFModel, user_rows: np.ndarray) -> np.ndarray:
    """Predicted rating of every item for each user row: (len(user_rows), items)."""
    P, Q = mf.factors("user_factors"), mf.factors("item_factors")
    return (
        P[user_rows] @ Q.T
        + mf.params["user_bias"][user_rows][:, None]
        + (mf.params["item_bias"] + mf.model.mean)[None, :]
    )


def top_items(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the indices and scores of the k highest finite scores, best first
    (fewer where fewer are finite: -inf marks excluded items)."""
    k = min(k, scores.shape[1])
    if k <= 0:
        return np.empty((len(scores), 0), np.int64), np.empty((len(scores), 0))
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(np.arange(k), (len(scores), 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


def _blocks(mf: MFModel, k: int, exclude: tuple[np.ndarray, np.ndarray] | None, users: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(user rows, top item rows, their scores) for blocks of ``users``."""
    rows = max(1, BLOCK_SCORES // max(len(mf.items), 1))
    for start in range(0, len(users), rows):
        block = users[start : start + rows]
        scores = scores_for(mf, block)
        if exclude is not None and len(block):
            ex_users, ex_items = exclude
            lo, hi = np.searchsorted(ex_users, [block.min(), block.max() + 1])
            local = np.searchsorted(block, ex_users[lo:hi])  # blocks are sorted user rows
            mine = block[np.minimum(local, len(block) - 1)] == ex_users[lo:hi]
            scores[local[mine], ex_items[lo:hi][mine]] = -np.inf
        yield block, *top_items(scores, k)


def recommend_user(mf: MFModel, user: str, k: int, exclude: tuple[np.ndarray, np.ndarray] | None = None) -> list[tuple[str, float]]:
    """The top ``k`` (item id, predicted rating) for one user, best first."""
    [row] = mf.users.rows(np.array([user]))
    if row < 0:
        raise DataError(f"user '{user}' is not in the model (no ratings in its training data)")
    [(_, items, scores)] = list(_blocks(mf, k, exclude, np.array([row])))
    finite = np.isfinite(scores[0])
    return list(zip(mf.items.labels(items[0][finite]), scores[0][finite].tolist()))


def recommend_all(mf: MFModel, k: int, out: str, exclude: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    """Write the top ``k`` items of every user to ``out`` as CSV (user, rank, item, score); return the rows written."""
    written = 0
    try:
        with open(out, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([mf.user_col, "rank", mf.item_col, "score"])
            for block, items, scores in _blocks(mf, k, exclude, np.arange(len(mf.users))):
                finite = np.isfinite(scores)
                ranks = np.broadcast_to(np.arange(1, items.shape[1] + 1), items.shape)
                user_ids = np.array(mf.users.labels(block), dtype=object)
                user_col = np.broadcast_to(user_ids[:, None], items.shape)[finite]
                item_col = np.array(mf.items.labels(items[finite].reshape(-1)), dtype=object)
                score_col = [f"{s:.4f}" for s in scores[finite].tolist()]
                writer.writerows(zip(user_col.tolist(), ranks[finite].tolist(), item_col.tolist(), score_col))
                written += int(finite.sum())
    except OSError as exc:
        raise DataError(f"cannot write recommendations to '{out}': {exc.strerror or exc}") from None
    return written


def check_top(k: int) -> None:
    if k < 1:
        raise DataError("--top must be at least 1")
