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


def input_schema(mf: MFModel, path: str, need_rating: bool = False, delimiter: str | None = None) -> csvfile.CsvSchema:
    """The model's user and item columns (and the rating, if present) in ``path``, a CSV
    separated by ``delimiter`` (by default as the training file was)."""
    s = mf.schema
    rating = _column_ref(s, s.label_index) if s.label_index is not None else "rating"
    return ratings.read_schema(
        path, _column_ref(s, s.feature_indices[0]), _column_ref(s, s.feature_indices[1]), rating, s.has_header, need_rating,
        delimiter=s.delimiter if delimiter is None else delimiter,
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
    check_cold_start(cold_start)
    schema = input_schema(mf, data_path)
    ids, truth = ratings.read_ratings(data_path, schema)
    part = rate_rows(mf, ids, truth if schema.label_index is not None else None, cold_start)
    return combine_parts(mf, [part], cold_start, schema.label_index is not None)


def check_cold_start(cold_start: str) -> None:
    if cold_start not in COLD_START:
        raise DataError(f"--cold-start must be one of {', '.join(COLD_START)}")


@dataclass
class RatedRows:
    """One batch of rows rated by :func:`rate_rows`: what :func:`combine_parts` needs, all of it
    arrays or counts, so batches rated apart (by worker processes) combine exactly."""

    ids: np.ndarray  # (n, 2) str: user, item of each kept row
    outputs: np.ndarray  # predicted ratings of the kept rows
    truth: np.ndarray | None  # the file's ratings of the kept rows
    counts: dict[str, int]  # rows, cold_rows, unknown_users, unknown_items (before dropping)


def rating_outputs(mf: MFModel, ids: np.ndarray, cold_start: str = "nan") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted ratings of (user id, item id) rows, clipped to the training range when the
    model has one; rows with an unknown side by ``cold_start`` (NaN under nan and drop).
    Returns (predictions, known user, known item)."""
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
        pred[cold] = mf.model.clip(pred[cold])
    return pred, u >= 0, i >= 0


def rate_rows(mf: MFModel, ids: np.ndarray, truth: np.ndarray | None, cold_start: str = "nan") -> RatedRows:
    """Rate one batch of rows (pure: no file is read or written)."""
    pred, known_u, known_i = rating_outputs(mf, ids, cold_start)
    known = known_u & known_i
    keep = known if cold_start == "drop" else np.ones(len(ids), dtype=bool)
    counts = {
        "rows": int(len(ids)),
        "cold_rows": int((~known).sum()),
        "unknown_users": int((~known_u).sum()),
        "unknown_items": int((~known_i).sum()),
    }
    return RatedRows(ids[keep], pred[keep], None if truth is None else truth[keep], counts)


def combine_parts(mf: MFModel, parts: list[RatedRows], cold_start: str, has_truth: bool, scored: bool = True) -> RatingsPrediction:
    """The prediction of a whole file from its batches in file order: counts summed, metrics
    (``scored``) computed once over every kept row (so they equal those of one batch holding them all)."""
    outputs = np.concatenate([p.outputs for p in parts])
    ids = np.concatenate([p.ids for p in parts]) if parts else np.empty((0, 2), str)
    summary: dict[str, Any] = {"strategy": cold_start}
    for key in ("rows", "cold_rows", "unknown_users", "unknown_items"):
        summary[key] = sum(p.counts[key] for p in parts)
    truth, scores = None, None
    if has_truth:
        truth = np.concatenate([p.truth for p in parts if p.truth is not None])
    if has_truth and scored:
        finite = np.isfinite(outputs)
        summary["scored_rows"] = int(finite.sum())
        y, p = truth[finite], outputs[finite]
        scores = {"rows": int(finite.sum())}
        if len(y):
            scores.update(rmse=metrics.rmse(y, p), mae=metrics.mae(y, p))
    names = (mf.user_col, mf.item_col, mf.rating_col if has_truth else None)
    return RatingsPrediction(mf.meta, ids, outputs, truth, scores, summary, names)


def predict_pairs(mf: MFModel, users: Any, items: Any, cold_start: str = "nan") -> np.ndarray:
    """Predicted ratings of (user, item) pairs of ids (two equal-length sequences or arrays);
    an unknown user or item is NaN, or under ``cold_start`` "mean" the global mean plus the
    known side's bias. Clipped to the training ratings' range when the model has one."""
    check_cold_start(cold_start)
    users, items = np.asarray(users).astype(str).reshape(-1), np.asarray(items).astype(str).reshape(-1)
    if len(users) != len(items):
        raise DataError(f"got {len(users)} users and {len(items)} items; give one item per user")
    pred, _, _ = rating_outputs(mf, np.stack([users, items], axis=1) if len(users) else np.empty((0, 2), str), cold_start)
    return pred


def predict_one(mf: MFModel, user: str, item: str, cold_start: str = "nan") -> float:
    """The predicted rating of one (user, item); DataError (one sentence) when either is not in
    the model, unless ``cold_start`` is "mean"."""
    check_cold_start(cold_start)
    if cold_start != "mean":
        missing = [f"{what} '{value}'" for what, value, vocab in (("user", user, mf.users), ("item", item, mf.items)) if vocab.rows(np.array([value]))[0] < 0]
        if missing:
            raise DataError(
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in the model "
                "(no ratings in its training data); --cold-start mean predicts the global mean plus the known side's bias"
            )
    return float(predict_pairs(mf, [user], [item], cold_start)[0])


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
            csv.writer(fh).writerow([user, item, *([rating] if rating else []), "predicted"])
            write_rating_rows(pred, fh)
    except OSError as exc:
        raise DataError(f"cannot write predictions to '{out}': {exc.strerror or exc}") from None


def write_rating_rows(pred: RatingsPrediction, fh: Any) -> None:
    """The rows of a ratings predictions file, without its header, to the text file ``fh``."""
    writer = csv.writer(fh)
    values = [f"{v:.6g}" for v in pred.outputs.tolist()]
    if pred.columns[2] and pred.truth is not None:
        truth = [repr(v) for v in pred.truth.tolist()]
        writer.writerows(zip(pred.ids[:, 0].tolist(), pred.ids[:, 1].tolist(), truth, values))
    else:
        writer.writerows(zip(pred.ids[:, 0].tolist(), pred.ids[:, 1].tolist(), values))


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
    """Predicted rating of every item for each user row: (len(user_rows), items), unclipped
    (items rank by these; the ratings shown are clipped with ``mf.model.clip``)."""
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
    return list(zip(mf.items.labels(items[0][finite]), mf.model.clip(scores[0][finite]).tolist()))


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
                score_col = [f"{s:.4f}" for s in mf.model.clip(scores[finite]).tolist()]
                writer.writerows(zip(user_col.tolist(), ranks[finite].tolist(), item_col.tolist(), score_col))
                written += int(finite.sum())
    except OSError as exc:
        raise DataError(f"cannot write recommendations to '{out}': {exc.strerror or exc}") from None
    return written


def check_top(k: int) -> None:
    if k < 1:
        raise DataError("--top must be at least 1")
