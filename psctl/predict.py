"""``psctl predict``: apply a model file to a CSV, with metrics when labels are present."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any

import numpy as np

from psctl import data, metrics, modelfile
from psctl.errors import DataError, ModelFileError
from psctl.models import get_model


@dataclass
class Prediction:
    meta: dict[str, Any]
    proba: np.ndarray
    predicted: list[str]
    metrics: dict[str, float] | None  # None when the file has no label column


def schema_for(meta: dict[str, Any], path: str) -> data.CsvSchema:
    """Find the model's feature columns (and the label, if present) in ``path``."""
    trained = data.CsvSchema.from_dict(meta["schema"])
    if not trained.has_header:
        columns = data.read_schema(path, label="0", has_header=False).columns
        if len(columns) == len(trained.columns):
            return trained
        if len(columns) == len(trained.feature_indices):
            return data.CsvSchema(columns, None, tuple(range(len(columns))), False)
        raise DataError(
            f"'{path}' has {len(columns)} columns; the model expects {len(trained.columns)} (with label) "
            f"or {len(trained.feature_indices)} (without)"
        )
    header = data.read_schema(path, label=None, has_header=True).columns
    index = {name: i for i, name in enumerate(header)}
    missing = [n for n in trained.feature_names if n not in index]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"'{path}' lacks {len(missing)} column(s) the model was trained on: {shown}")
    label = meta.get("label")
    return data.CsvSchema(
        tuple(header), index.get(label) if label is not None else None, tuple(index[n] for n in trained.feature_names), True
    )


def predict(model_path: str, data_path: str) -> Prediction:
    params, meta = modelfile.load_model(model_path)
    kind = meta.get("kind")
    try:
        model = get_model(str(kind))
        w = params["w"]
        classes = list(meta["classes"])
    except (KeyError, TypeError) as exc:
        raise ModelFileError(f"'{model_path}' is a psctl model without the parts a {kind} model needs ({exc})") from None
    schema = schema_for(meta, data_path)
    X, labels = data.read_csv(data_path, schema)
    if meta.get("standardize"):
        X = (X - np.asarray(meta["standardize"]["mean"])) / np.asarray(meta["standardize"]["std"])
    if X.shape[1] + 1 != w.shape[0]:
        raise ModelFileError(f"'{model_path}' holds {w.shape[0] - 1} weights but the data has {X.shape[1]} features")
    proba = model.predict_proba(w.astype(np.float64), X)
    predicted_idx = (proba >= 0.5).astype(int)
    predicted = [classes[i] for i in predicted_idx]
    scores = None
    if schema.label_index is not None:
        y = data.encode_labels(labels, classes)
        scores = {
            "rows": float(len(y)),
            "accuracy": metrics.accuracy(y, predicted_idx),
            "log_loss": metrics.log_loss(y, proba),
            "roc_auc": metrics.roc_auc(y, proba),
        }
    return Prediction(meta, proba, predicted, scores)


def write_predictions(pred: Prediction, out: str) -> None:
    try:
        with open(out, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["probability", "predicted"])
            for p, label in zip(pred.proba, pred.predicted):
                writer.writerow([f"{p:.6f}", label])
    except OSError as exc:
        raise DataError(f"cannot write predictions to '{out}': {exc.strerror or exc}") from None
