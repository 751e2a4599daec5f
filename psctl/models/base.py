"""What a model is to psctl, and the task-level pieces every model shares.

A model is a small class over pure numpy functions. psctl calls:

- ``tables()``: the parameter tables it needs (created on the shards);
- ``keys(X)``: per table, the sorted unique keys a batch touches, or None for
  the whole table (dense models);
- ``loss_grad(params, X, y)``: mean loss, gradient per table (aligned with the
  keys, or whole-table), and the batch's outputs (reused for metrics);
- ``key_sums``: whether the worker pushes the gradient of the batch's summed loss
  (per key: the sum over the rows that touched it) instead of its mean, so that a
  key's update reflects the examples that touched it, not the batch size (sparse
  and hashed linear models, mf);
- ``predict(params, X)``: outputs for new rows;
- ``data_params(stats)`` (a classmethod): parameters that come from the
  statistics pass, such as table sizes from an id vocabulary.

Outputs by ``task``: "binary" -> P(class 1), shape (n,); "classes" -> a score
or probability per class, shape (n, k); "regression" -> values, shape (n,).
Adding a model means writing such a class; the wire, shards and coordinator
never change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from psctl.core.sparse import SparseRows
from psctl.core.tables import TableSpec
from psctl.data import csvfile
from psctl.errors import DataError, PsctlError
from psctl.models import metrics

TASKS = ("binary", "classes", "regression")


class Model:
    """Base class: override ``tables``, ``loss_grad`` and ``predict`` (and ``keys`` for sparse models)."""

    kind: ClassVar[str] = "model"
    task: ClassVar[str] = "regression"
    #: Extra constructor parameters a user may set (name -> default), beside l2.
    params: ClassVar[dict[str, Any]] = {}
    #: The input format the model reads: "csv" (numeric features) or "ratings" (user, item, rating).
    data_format: ClassVar[str] = "csv"
    #: The training options a job takes when its command sets none of the optimizer's (no
    #: --optimizer, --lr or --lr-decay): each left out option is this value. ``converge``:
    #: without --epochs, stop before ``epochs`` once the training loss stops falling
    #: (psctl.apps.train.resolve_defaults). A model without its own keeps psctl's first defaults.
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "lr": 0.1, "batch_size": 32, "epochs": 10, "l2": 0.0, "converge": False,
    }  # fmt: skip

    #: The options that replace ``defaults`` for sparse input (LIBSVM, hashed CSV), or None.
    sparse_defaults: ClassVar[dict[str, Any] | None] = None

    def __init__(self, n_features: int, classes: Sequence[str] = (), l2: float = 0.0, **params: Any):
        unknown = set(params) - set(self.params)
        if unknown:
            raise PsctlError(f"model {self.kind} has no parameter {', '.join(sorted(unknown))}")
        self.n_features = n_features
        self.classes = list(classes)
        self.l2 = l2
        self.options = {**self.params, **params}

    @classmethod
    def data_params(cls, stats: dict[str, Any]) -> dict[str, Any]:
        """Constructor parameters taken from the statistics pass (the STATS reply: ``stats``,
        ``labels``, ``vocab``), e.g. table sizes; the driver and every worker derive the same."""
        return {}

    @property
    def key_sums(self) -> bool:
        """True: the worker pushes ``len(y)`` times ``loss_grad``'s mean gradient, i.e. per key
        the gradient summed over the batch's rows, and the shards apply it as it is (a sync
        clock adds the workers' sums). A per-key optimizer then steps a key by what its own
        examples say, whatever the batch size and the number of workers (docs/DEFAULTS.md)."""
        return False

    def tables(self) -> list[TableSpec]:
        raise NotImplementedError

    def keys(self, X: Any) -> dict[str, np.ndarray | None]:
        return {t.name: None for t in self.tables()}

    def loss_grad(self, params: dict[str, np.ndarray], X: Any, y: np.ndarray) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
        raise NotImplementedError

    def predict(self, params: dict[str, np.ndarray], X: Any) -> np.ndarray:
        raise NotImplementedError


def row_scores(W: np.ndarray, X: Any) -> np.ndarray:
    """``X @ W[:-1] + W[-1]`` with each row's score independent of the other rows of ``X``.

    BLAS's gemv and gemm sum a row's products in an order that depends on how many rows
    they are given (numpy 2.4's OpenBLAS: one ulp between a row scored in a 3-row call and
    alone), so prediction spread over workers would differ in the last bit from one
    process's. ``einsum`` sums each row in feature order whatever the partition: as fast
    as gemv for one column, slower for many, which prediction can afford and training,
    which uses ``@``, need not pay. SparseRows score row by row already.
    """
    if isinstance(X, np.ndarray):
        return np.einsum("ij,j...->i...", X, W[:-1]) + W[-1]
    return X @ W[:-1] + W[-1]


class LinearModel(Model):
    """A linear model on one table ``w`` of n_features + 1 rows, the bias row last.

    With ``sparse=True`` (set by the driver for LIBSVM and hashed input) the table
    is sparse (hash-routed, rows created on first touch), batches are
    :class:`~psctl.core.sparse.SparseRows`, and each batch pulls only its unique
    feature keys plus the bias key ``n_features``. The dense loss code runs on
    those rows unchanged: ``X @ w[:-1]`` and ``X.T @ err`` work on SparseRows.
    L2 then applies to the keys a batch touches (lazy regularization).
    """

    params: ClassVar[dict[str, Any]] = {"sparse": False}
    # AdaGrad's per-key step is the same whether a key's gradient is a mean over 16 rows
    # (async, ssp) or over every worker's (sync), so one step size serves all three modes;
    # batch 16 gives a sync job on a few thousand rows enough updates per epoch.
    # Chosen in docs/DEFAULTS.md against scikit-learn on digits, breast cancer, a9a and MNIST.
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adagrad", "lr": 0.1, "batch_size": 16, "epochs": 20, "l2": 1e-3, "converge": True,
    }  # fmt: skip
    # Sparse input pushes per-key sums (key_sums), which FTRL-Proximal steps per coordinate as
    # McMahan et al. do. Alpha 0.1, not the 0.2 that is best for one pass over hashed clicks:
    # a9a's optimum is at 0.850 and a frequent key's last steps (alpha / sqrt(n)) scatter the
    # weights about it, at 0.2 below 0.848 in some async runs (docs/DEFAULTS.md). FTRL takes
    # L2 in its proximal step.
    sparse_defaults: ClassVar[dict[str, Any] | None] = {
        "optimizer": "ftrl", "lr": 0.1, "batch_size": 16, "epochs": 20, "l2": 1e-3, "converge": True,
    }  # fmt: skip

    @property
    def key_sums(self) -> bool:
        return bool(self.options["sparse"])

    def dim(self) -> int:
        """Columns of ``w``: 1, or one per class."""
        return 1

    def tables(self) -> list[TableSpec]:
        return [TableSpec("w", self.n_features + 1, dim=self.dim(), sparse=bool(self.options["sparse"]))]

    def keys(self, X: Any) -> dict[str, np.ndarray | None]:
        if isinstance(X, SparseRows):
            return {"w": np.append(X.keys, self.n_features)}
        return {"w": None}


# -- labels and targets -----------------------------------------------------------
def classes_for(task: str, distinct: Sequence[str], kind: str = "model") -> list[str]:
    """The class list a task derives from the distinct label values of the whole data."""
    if task == "binary":
        try:
            return list(csvfile.binary_classes(distinct))
        except DataError as exc:
            raise DataError(str(exc).replace("logreg", kind)) from None
    if task == "classes":
        values = sorted({csvfile.normalize_label(v) for v in distinct}, key=_label_order)
        if len(values) < 2:
            raise DataError(f"{kind} needs at least two label values; found {len(values)}")
        return values
    return []


def _label_order(value: str) -> tuple[int, float, str]:
    try:
        number = float(value)
    except ValueError:
        return (1, 0.0, value)
    return (0, number, value) if math.isfinite(number) else (1, 0.0, value)


def encode_targets(task: str, labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Labels as the numbers a model trains on: 0/1, a class index, or the value itself."""
    if task == "binary":
        return csvfile.encode_labels(labels, classes)
    if task == "classes":
        return csvfile.encode_labels(labels, classes).astype(np.int64)
    try:
        y = labels.astype(np.float64)
    except ValueError:
        bad = next(v for v in labels.tolist() if not _is_number(v))
        raise DataError(f"regression needs numeric labels; found '{bad[:40]}'") from None
    if not np.isfinite(y).all():
        raise DataError("regression labels must be finite numbers")
    return y


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def class_values(names: list[str]) -> np.ndarray:
    """A model's class labels (normalized text, as its meta keeps them) as values: integers or
    numbers when every label is one, else text."""
    for kind in (int, float):
        try:
            return np.array([kind(n) for n in names])
        except ValueError:
            pass
    return np.array(names)


def predicted_index(task: str, outputs: np.ndarray) -> np.ndarray:
    """Class index per row for classifiers."""
    if task == "binary":
        return (outputs >= 0.5).astype(np.int64)
    return np.argmax(outputs, axis=1)


def batch_sums(task: str, outputs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Additive per-batch figures for progress reports (summed over workers, divided by rows)."""
    if task == "regression":
        err = outputs - y
        return {"sq_err": float(err @ err), "abs_err": float(np.abs(err).sum())}
    return {"correct": float(np.count_nonzero(predicted_index(task, outputs) == y))}


def summarize(task: str, sums: dict[str, float], n: int) -> dict[str, float]:
    """Per-row figures from summed batch_sums: accuracy, or RMSE and MAE."""
    n = max(n, 1)
    if task == "regression":
        return {"rmse": math.sqrt(sums.get("sq_err", 0.0) / n), "mae": sums.get("abs_err", 0.0) / n}
    return {"accuracy": sums.get("correct", 0.0) / n}


def evaluate(task: str, y: np.ndarray, outputs: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Full metrics for predict: per task, the figures people compare models by."""
    if task == "regression":
        return {"rmse": metrics.rmse(y, outputs), "mae": metrics.mae(y, outputs), "r2": metrics.r2(y, outputs)}
    pred = predicted_index(task, outputs)
    out: dict[str, Any] = {"accuracy": metrics.accuracy(y, pred), "macro_f1": metrics.macro_f1(y, pred, n_classes)}
    if task == "binary":
        out["log_loss"] = metrics.log_loss(y, outputs)
        out["roc_auc"] = metrics.roc_auc(y, outputs)
    out["confusion"] = metrics.confusion_matrix(y, pred, n_classes)
    return out
