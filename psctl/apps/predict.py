"""``psctl predict``: apply a model file to a CSV, with metrics when labels are present."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from psctl.apps import recommend
from psctl.apps.results import json_safe
from psctl.core.sparse import SparseRows
from psctl.data import csvfile, formats
from psctl.errors import DataError, ModelFileError, UsageError
from psctl.files import loading
from psctl.models.base import Model, encode_targets, evaluate, predicted_index


@dataclass
class Prediction:
    meta: dict[str, Any]
    outputs: np.ndarray  # P(class 1), per-class scores, or values: see models.base
    predicted: list[str] | np.ndarray  # class labels, or values for regression
    metrics: dict[str, Any] | None  # None when the file has no label column
    unknown: dict[str, int] | None = None  # sparse input: feature occurrences / features without a weight


def schema_for(meta: dict[str, Any], path: str) -> csvfile.CsvSchema:
    """Find the model's feature columns (and the label, if present) in ``path``."""
    if meta.get("schema") is None:
        raise ModelFileError("the model file has no training schema, so its feature columns cannot be found")
    trained = csvfile.CsvSchema.from_dict(meta["schema"])
    if not trained.has_header:
        columns = csvfile.read_columns(path, has_header=False)
        if len(columns) == len(trained.columns):
            return trained
        if len(columns) == len(trained.feature_indices):
            return csvfile.CsvSchema(columns, None, tuple(range(len(columns))), False)
        raise DataError(
            f"'{path}' has {len(columns)} columns; the model expects {len(trained.columns)} (with label) "
            f"or {len(trained.feature_indices)} (without)"
        )
    header = csvfile.read_columns(path)
    index = {name: i for i, name in enumerate(header)}
    missing = [n for n in trained.feature_names if n not in index]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"'{path}' lacks {len(missing)} column(s) the model was trained on: {shown}")
    label = meta.get("label")
    return csvfile.CsvSchema(
        tuple(header), index.get(label) if label is not None else None, tuple(index[n] for n in trained.feature_names), True
    )


def predict(model_path: str, data_path: str, model_class_path: str | None = None, cold_start: str | None = None) -> Any:
    """A :class:`Prediction`, or for an mf model a recommend.RatingsPrediction
    (``cold_start``: what to do with users and items the model has not seen; mf only, default nan)."""
    model, params, meta = loading.load(model_path, model_class_path)
    if meta.get("data_format") == "ratings":
        mf = recommend.from_loaded(model_path, model, params, meta)
        return recommend.predict_ratings(mf, data_path, cold_start or "nan")
    if cold_start is not None:
        raise UsageError(f"--cold-start is for mf models; {model_path} is a {meta.get('kind')} model")
    return predict_loaded(model, params, meta, data_path)


def predict_loaded(
    model: Model, params: dict[str, np.ndarray] | Callable[[Any], dict[str, np.ndarray]], meta: dict[str, Any], data_path: str
) -> Prediction:
    """A model that is not mf applied to ``data_path``. ``params``: the model's arrays as a model
    file holds them, or a function of the rows read that returns the part of them those rows
    use (a sparse model read from the parameter server: apps/kept.py)."""
    if meta.get("input", {}).get("format", "csv") in formats.SPARSE_FORMATS:
        return _predict_sparse(model, params, meta, data_path)
    schema = schema_for(meta, data_path)
    X, labels = csvfile.read_csv(data_path, schema)
    if meta.get("standardize"):
        X = (X - np.asarray(meta["standardize"]["mean"])) / np.asarray(meta["standardize"]["std"])
    if callable(params):
        params = params(X)
    outputs = model.predict({k: v.astype(np.float64, copy=False) for k, v in params.items()}, X)
    return _finish(model, meta, outputs, labels if schema.label_index is not None else None)


def _finish(model: Model, meta: dict[str, Any], outputs: np.ndarray, labels: np.ndarray | None, unknown: dict[str, int] | None = None) -> Prediction:
    task, classes = model.task, model.classes
    predicted: list[str] | np.ndarray = (
        outputs if task == "regression" else [classes[i] for i in predicted_index(task, outputs)]
    )
    scores = None
    if labels is not None:
        y = encode_targets(task, labels, classes)
        scores = {"rows": len(y), **evaluate(task, y, outputs, len(classes))}
    return Prediction(meta, outputs, predicted, scores, unknown)


def _predict_sparse(
    model: Model, params: dict[str, np.ndarray] | Callable[[Any], dict[str, np.ndarray]], meta: dict[str, Any], path: str
) -> Prediction:
    """LIBSVM or hashed CSV, read as in training. Features the model has no weight for
    (never seen in training, or past a LIBSVM model's feature count) weigh 0 and are counted."""
    spec, n_features = meta["input"], meta["n_features"]
    has_labels = True
    if spec["format"] == "libsvm":
        X, labels = formats.read_whole(spec, path)
        keys = X.indices - int(spec["index_base"])
        inside = keys < n_features
        outside = X.indices[~inside]
        X = X.with_indices(keys, inside)
    else:
        schema = schema_for(meta, path)
        has_labels = schema.label_index is not None
        X, labels = formats.read_whole(spec, path, schema)
        outside = np.empty(0, np.int64)
    if callable(params):
        params = params(X)
    weights, missing = aligned_weights(model, params, X)
    unknown = {
        "occurrences": len(outside) + int(np.isin(X.indices, missing).sum()),
        "features": len(np.unique(outside)) + len(missing),
    }
    outputs = model.predict(weights, X)
    return _finish(model, meta, outputs, labels if has_labels else None, unknown)


def aligned_weights(model: Model, params: dict[str, np.ndarray], X: SparseRows) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per table, the stored rows for the keys ``X`` touches (zeros where the model has none),
    and the keys without a stored row."""
    out, missing = {}, []
    for name, keys in model.keys(X).items():
        stored = params[f"{name}.keys"]
        values = params[name]
        rows = np.zeros((len(keys), *values.shape[1:]))
        found = np.zeros(len(keys), bool)
        if len(stored):
            pos = np.minimum(np.searchsorted(stored, keys), len(stored) - 1)
            found = stored[pos] == keys
            rows[found] = values[pos[found]]
        missing.append(keys[~found & (keys < model.n_features)])  # the bias key is no feature
        out[name] = rows
    return out, np.concatenate(missing)


def check_predictions_path(out: str) -> None:
    """Refuse an ``--out`` that cannot take the predictions, before the model is applied."""
    if Path(out).is_dir():
        raise UsageError(f"--out names the folder '{out}'; give the predictions file's path, e.g. {Path(out) / 'predictions.csv'}")


def write_predictions(pred: Any, out: str) -> None:
    if pred.meta.get("data_format") == "ratings":
        return recommend.write_rating_predictions(pred, out)
    task = pred.meta.get("task", "binary")
    classes = pred.meta.get("classes") or []
    try:
        with open(out, "w", newline="") as fh:
            writer = csv.writer(fh)
            if task == "regression":
                writer.writerow(["predicted"])
                writer.writerows([f"{v:.6g}"] for v in pred.outputs)
            elif task == "binary":
                writer.writerow(["probability", "predicted"])
                writer.writerows([f"{p:.6f}", label] for p, label in zip(pred.outputs, pred.predicted))
            else:
                writer.writerow([*(f"score_{c}" for c in classes), "predicted"])
                writer.writerows([*(f"{v:.6f}" for v in row), label] for row, label in zip(pred.outputs, pred.predicted))
    except OSError as exc:
        raise DataError(f"cannot write predictions to '{out}': {exc.strerror or exc}") from None


def prediction_summary(pred: Any, model_path: str, data_path: str, out_path: str | None = None) -> dict[str, Any]:
    """A prediction's result as plain JSON values (``psctl predict --json``): rows, metrics, what was left out."""
    summary: dict[str, Any] = {
        "model_path": model_path,
        "data": data_path,
        "model": pred.meta.get("kind"),
        "rows": len(pred.predicted),
        "metrics": pred.metrics,
        "classes": pred.meta.get("classes"),
        "predictions_path": out_path,
    }
    if getattr(pred, "unknown", None) is not None:
        summary["unknown_features"] = pred.unknown
    if getattr(pred, "cold_start", None) is not None:
        summary["cold_start"] = pred.cold_start
    return json_safe(summary)
