"""scikit-learn estimators that train on a psctl cluster: ``fit(X, y)`` runs ``psctl train``.

Each estimator's constructor parameters are ``psctl train``'s options (workers, shards,
mode, staleness, optimizer, lr, epochs, batch_size, l1, l2, seed, server, ...); ``fit``
writes the data once as memory-mapped ``.npy`` files in a temporary folder (see
:mod:`psctl.data.arrays` for why not shared memory), runs :func:`psctl.apps.train.train`
on them, and keeps the model file's arrays and metadata: a fitted estimator holds numpy
arrays and JSON-able values, never a connection, so it pickles and clones by
scikit-learn's rules. ``predict`` computes what ``psctl predict`` computes on the same
model file; ``save(path)`` writes that file and ``Class.load(path)`` reads one.

Classifiers: :class:`PSLogisticRegression` (two classes: ``logreg``),
:class:`PSSoftmaxRegression` (``softmax``), :class:`PSLinearSVC` (``svm``, one-vs-rest for
more than two classes). Regression: :class:`PSLinearRegression` (``linreg``, squared or
Huber loss). Ratings: :class:`PSMatrixFactorization` (``mf``; ``recommend(user, k)``).

scikit-learn is the optional extra ``psctl[sklearn]``.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d, validate_data
except ImportError:  # pragma: no cover - the extra's absence is tested in a fresh interpreter
    raise ImportError("psctl.sklearn needs scikit-learn: run pip install 'psctl[sklearn]'") from None
try:
    import scipy.sparse as sp
except ImportError:  # pragma: no cover - scikit-learn requires scipy
    sp = None

from psctl.apps import recommend
from psctl.apps.predict import aligned_weights
from psctl.apps.train import TrainConfig, train
from psctl.core.sparse import SparseRows
from psctl.data import arrays, csvfile, formats, ratings
from psctl.errors import DataError, ModelFileError, PsctlError, UsageError
from psctl.files import loading, modelfile
from psctl.models.base import class_values, predicted_index
from psctl.models.registry import model_class

__all__ = ["PSLinearRegression", "PSLinearSVC", "PSLogisticRegression", "PSMatrixFactorization", "PSSoftmaxRegression"]

T = TypeVar("T")
E = TypeVar("E", bound="_PSEstimator")

# The training options every estimator takes, with psctl train's defaults (TrainConfig).
_TRAINING = ("workers", "shards", "mode", "staleness", "optimizer", "lr", "lr_decay", "epochs", "batch_size",
             "l1", "l2", "seed", "server", "in_process")  # fmt: skip


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from synchronous code, also where an event loop already
    runs in this thread (a Jupyter notebook): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="psctl-fit")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class _PSEstimator(BaseEstimator):
    """Fit through ``psctl train`` on in-memory arrays; keep the model file's contents."""

    _kind: ClassVar[str] = ""
    _model_options: ClassVar[tuple[str, ...]] = ()  # constructor parameters that are model options

    # -- training --------------------------------------------------------------------
    def _config(self, data: str, spec: dict[str, Any], out: str) -> TrainConfig:
        options = {name: getattr(self, name) for name in _TRAINING}
        extra = {"standardize": self.standardize} if hasattr(self, "standardize") else {}
        return TrainConfig(
            self._kind, data, arrays=spec, out=out, model_params={k: getattr(self, k) for k in self._model_options},
            **options, **extra,
        )

    def _train(self, X: Any, labels: np.ndarray, fmt: str, schema: csvfile.CsvSchema | None, **extra: Any) -> None:
        """Write X (an array, or SparseRows) and its labels once, train on them, keep what
        the model file holds. ``extra``: the format's data spec entries (hash_bits, ...)."""
        with tempfile.TemporaryDirectory(prefix="psctl-fit-") as folder:
            try:
                fill = None
                if isinstance(X, SparseRows):
                    features, label_file, layout = arrays.write_csr(folder, X, labels)
                    extra.update(layout)
                else:  # the rows are written while the cluster starts
                    features, label_file, fill = arrays.start(folder, X, labels)
                spec = {**arrays.data_spec(features, label_file, fmt, schema, len(X)), **extra}
                out = str(Path(folder) / "model.npz")
                _run(train(self._config(features, spec, out), write_data=fill))
                model, params, meta = loading.load(out)
            except PsctlError as exc:
                # Bad data or options are a ValueError to scikit-learn (with psctl's sentence);
                # a cluster that cannot be reached or a failed job keep their own type.
                if type(exc) in (PsctlError, DataError, UsageError):
                    raise ValueError(str(exc)) from None
                raise
        self._set_model(params, meta)

    def _set_model(self, params: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.model_params_ = {k: np.asarray(v) for k, v in params.items()}
        self.model_meta_ = meta
        # Per epoch: loss, metric, held-out figures, samples/s, staleness; and the events (psctl.apps.history).
        self.history_ = meta.get("history") or {"epochs": [], "events": []}

    def _model(self) -> Any:
        meta = self.model_meta_
        n_features = meta["n_features"] if meta.get("n_features") is not None else len(meta["feature_names"])
        return model_class(meta["kind"])(n_features, meta.get("classes") or [], **(meta.get("model_params") or {}))

    # -- model files -------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the fitted model as a psctl model file (what ``psctl predict`` reads)."""
        check_is_fitted(self)
        meta = {k: v for k, v in self.model_meta_.items() if k not in ("format", "format_version")}
        modelfile.save_model(path, self.model_params_, meta)

    @classmethod
    def load(cls: type[E], path: str) -> E:
        """An estimator fitted with the model in ``path`` (a psctl model file of this kind),
        its training options taken from the file."""
        model, params, meta = loading.load(path)
        if meta["kind"] != cls._kind:
            raise ModelFileError(f"'{path}' is a {meta['kind']} model; {cls.__name__} loads {cls._kind} models")
        training, options, spec = meta.get("training") or {}, meta.get("model_params") or {}, meta.get("input") or {}
        names = set(cls._get_param_names())
        given = {k: training[k] for k in (*_TRAINING, "standardize") if k in names and k in training and k != "server"}
        given.update({k: options[k] for k in names & set(options)})
        if spec.get("format") == "hashed_csv":
            given.update(categorical=list(spec["categorical"]), hash_bits=int(spec["hash_bits"]))
        est = cls(**given)
        est._set_model(params, meta)
        est._loaded(meta)
        return est

    def _loaded(self, meta: dict[str, Any]) -> None:
        """Set the fitted attributes that fit sets from the data itself."""
        names = meta.get("feature_names") or []
        self.n_features_in_ = len(names)
        if names and not all(n == f"x{i}" for i, n in enumerate(names)):
            self.feature_names_in_ = np.array(names, dtype=object)


class _LinearEstimator(_PSEstimator):
    """Features as psctl train reads them: dense numbers standardized (mean/std of the
    training data), a scipy sparse matrix as LIBSVM rows (0-based columns, not
    standardized), or, with ``categorical`` or ``hash_bits``, a DataFrame's columns hashed
    as a hashed CSV's (the named columns' values as text, the others as numbers)."""

    def _hashed(self) -> bool:
        return self.categorical is not None or self.hash_bits is not None

    def _fit_features(self, X: Any, y: Any, labels_of: Any, y_numeric: bool = False) -> Any:
        """Validate X and y, train; returns the validated y (for classes_)."""
        if self._hashed():
            return self._fit_hashed(X, y, labels_of, y_numeric)
        X, y = validate_data(self, X, y, accept_sparse="csr", dtype=(np.float64, np.float32), y_numeric=y_numeric)
        labels = labels_of(y)
        if sp is not None and sp.issparse(X):
            self._train(_sparse_rows(X), labels, "libsvm", None, index_base=0, n_features=X.shape[1])
            return y
        names = [str(n) for n in getattr(self, "feature_names_in_", [])] or [f"x{i}" for i in range(X.shape[1])]
        self._train(X, labels, "csv", _schema(names))
        return y

    def _fit_hashed(self, X: Any, y: Any, labels_of: Any, y_numeric: bool) -> Any:
        if not hasattr(X, "columns"):
            raise ValueError("categorical and hash_bits hash a DataFrame's columns by name; X has no column names")
        bits = formats.DEFAULT_HASH_BITS if self.hash_bits is None else int(self.hash_bits)
        names = [str(c) for c in X.columns]
        categorical = sorted(set(self.categorical or ()))
        unknown = [c for c in categorical if c not in names]
        if unknown:
            raise ValueError(f"categorical column {unknown[0]!r} is not a column of X")
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        y = column_or_1d(y, warn=True)
        if y_numeric:
            y = np.asarray(y, np.float64)
        labels = labels_of(y)
        self.n_features_in_, self.feature_names_in_ = len(names), np.array(names, dtype=object)
        self._train(self._hash(X), labels, "hashed_csv", _schema(names), hash_bits=bits, categorical=categorical)
        return y

    def _hash(self, X: Any) -> SparseRows:
        if not hasattr(X, "columns"):
            raise ValueError("this model hashes a DataFrame's columns by name; X has no column names")
        names = list(self.feature_names_in_)
        missing = [n for n in names if n not in [str(c) for c in X.columns]]
        if missing:
            raise ValueError(f"X lacks the column {missing[0]!r} the model was trained on")
        by_name = {str(c): c for c in X.columns}
        spec = self.model_meta_["input"] if hasattr(self, "model_meta_") else None
        bits = int(spec["hash_bits"]) if spec else (formats.DEFAULT_HASH_BITS if self.hash_bits is None else int(self.hash_bits))
        categorical = spec["categorical"] if spec else sorted(set(self.categorical or ()))
        try:
            return formats.hash_columns([(n, X[by_name[n]].to_numpy()) for n in names], categorical, bits)
        except DataError as exc:
            raise ValueError(str(exc)) from None

    def _rows(self, X: Any) -> tuple[Any, dict[str, np.ndarray]]:
        """The rows as ``psctl predict`` makes them (dense: scaled by the stored mean and std,
        float64; sparse: SparseRows over model keys) and the weights they need."""
        check_is_fitted(self)
        meta = self.model_meta_
        fmt = (meta.get("input") or {}).get("format", "csv")
        params = {k: v.astype(np.float64, copy=False) for k, v in self.model_params_.items()}
        if fmt == "csv":
            X = validate_data(self, X, reset=False, dtype=np.float64)
            if meta.get("standardize"):
                X = (X - np.asarray(meta["standardize"]["mean"])) / np.asarray(meta["standardize"]["std"])
            return X, params
        if fmt == "hashed_csv":
            rows = self._hash(X)
        else:  # libsvm: a sparse matrix's columns
            X = validate_data(self, X, reset=False, accept_sparse="csr", dtype=np.float64)
            rows = _sparse_rows(sp.csr_matrix(X) if not sp.issparse(X) else X)
        rows.n_cols = meta["n_features"]
        weights, _ = aligned_weights(self._model(), params, rows)
        return rows, weights

    def _outputs(self, X: Any) -> np.ndarray:
        """What ``psctl predict`` computes for these rows."""
        rows, params = self._rows(X)
        return self._model().predict(params, rows)

    def _logits(self, X: Any) -> np.ndarray:
        """(n, columns of w): the linear scores ``rows @ w + bias``, per column of the model's table."""
        rows, params = self._rows(X)
        W = params["w"].reshape(len(params["w"]), -1)
        return rows @ W[:-1] + W[-1]

    def _raw_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """The weights (d, k) and biases (k,) on the input's own scale: the standardization folded in."""
        check_is_fitted(self)
        meta = self.model_meta_
        if (meta.get("input") or {}).get("format") == "hashed_csv":
            raise AttributeError("a hashed model has weights per hashed key, not per column: it has no coef_")
        W = self.model_params_["w"].astype(np.float64)
        W = W.reshape(len(W), -1)
        if "w.keys" in self.model_params_:  # sparse: the keys that have a weight; the others weigh 0
            full = np.zeros((meta["n_features"] + 1, W.shape[1]))
            full[self.model_params_["w.keys"]] = W
            W = full
        w, b = W[:-1], W[-1]
        std = meta.get("standardize")
        if std:
            mean, dev = np.asarray(std["mean"]), np.asarray(std["std"])
            w = w / dev[:, None]
            b = b - mean @ w
        return w, b

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


def _schema(names: list[str]) -> csvfile.CsvSchema:
    """A CSV's schema for these feature columns and a label column (named so it clashes with none)."""
    label = next(n for n in ("label", "target", "__label__") if n not in names)
    return csvfile.CsvSchema((label, *names), 0, tuple(range(1, len(names) + 1)), True)


def _sparse_rows(X: Any) -> SparseRows:
    """A scipy CSR matrix as SparseRows (duplicates summed, columns sorted: a copy only if needed)."""
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    return SparseRows(X.indptr.astype(np.int64), X.indices.astype(np.int64), X.data.astype(np.float32), X.shape[1])


class _Classifier(ClassifierMixin, _LinearEstimator):
    def fit(self, X: Any, y: Any) -> _Classifier:
        """Train on rows ``X`` (array, DataFrame) with class labels ``y``; returns self."""
        self._fit_features(X, y, self._class_labels)
        self._order = self._class_order()
        return self

    def _class_labels(self, y: np.ndarray) -> np.ndarray:
        """Set ``classes_``; the labels as text, as a CSV would hold them."""
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in the data, but the data contains only one class: {self.classes_[0]!r}"
            )
        self._check_classes()
        return np.array([str(c) for c in self.classes_])[codes]

    def _check_classes(self) -> None:
        pass

    def _class_order(self) -> np.ndarray:
        """Position of each of ``classes_`` in the model's class list (normalized label text)."""
        index = {c: i for i, c in enumerate(self.model_meta_["classes"])}
        return np.array([index[csvfile.normalize_label(str(c))] for c in self.classes_])

    def _loaded(self, meta: dict[str, Any]) -> None:
        super()._loaded(meta)
        self.classes_ = class_values(meta["classes"])
        self._order = self._class_order()

    def _scores(self, X: Any) -> np.ndarray:
        """Per-class scores (n, k) in ``classes_`` order: probabilities or margins."""
        out = self._outputs(X)
        if out.ndim == 1:  # logreg: P(model class 1)
            out = np.column_stack([1 - out, out])
        return out[:, self._order]

    def predict(self, X: Any) -> np.ndarray:
        """The class of each row (the one ``psctl predict`` names)."""
        out = self._outputs(X)
        task = "binary" if out.ndim == 1 else "classes"
        # psctl predict's choice of the model's class, mapped to ours
        ours = np.argsort(self._order)
        return self.classes_[ours[predicted_index(task, out)]]

    @property
    def coef_(self) -> np.ndarray:
        """Weights on the input's scale, one row per class ((1, d) for two classes)."""
        w, _ = self._raw_scale()
        return self._per_class(w.T)

    @property
    def intercept_(self) -> np.ndarray:
        _, b = self._raw_scale()
        return self._per_class(b[:, None])[:, 0]

    def _per_class(self, rows: np.ndarray) -> np.ndarray:
        return rows if len(rows) == 1 else rows[self._order]


class PSLogisticRegression(_Classifier):
    """Binary logistic regression (``psctl train logreg``). Labels: any two values."""

    _kind = "logreg"

    def __init__(self, *, workers: int = 8, shards: int = 2, mode: str = "sync", staleness: int = 0, optimizer: str | None = None,
                 lr: float | None = None, lr_decay: float = 0.0, epochs: int | None = None, batch_size: int | None = None, l1: float = 0.0,
                 l2: float | None = None, seed: int = 0, standardize: bool = True, categorical: list[str] | None = None,
                 hash_bits: int | None = None, server: str | None = None, in_process: bool = False):  # fmt: skip
        self.workers, self.shards, self.mode, self.staleness, self.optimizer = workers, shards, mode, staleness, optimizer
        self.lr, self.lr_decay, self.epochs, self.batch_size, self.l1, self.l2 = lr, lr_decay, epochs, batch_size, l1, l2
        self.seed, self.standardize, self.server, self.in_process = seed, standardize, server, in_process
        self.categorical, self.hash_bits = categorical, hash_bits

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def _check_classes(self) -> None:
        if len(self.classes_) > 2:
            raise ValueError(
                f"Only binary classification is supported. The type of the target is multiclass ({len(self.classes_)} "
                "classes): use PSSoftmaxRegression or PSLinearSVC for more than two classes."
            )

    def predict_proba(self, X: Any) -> np.ndarray:
        """P(class) per row, columns in ``classes_`` order."""
        return self._scores(X)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def decision_function(self, X: Any) -> np.ndarray:
        """The logit of ``classes_[1]`` per row."""
        z = self._logits(X)[:, 0]
        return z if self._order[1] == 1 else -z


class PSSoftmaxRegression(_Classifier):
    """Multinomial logistic regression (``psctl train softmax``), two or more classes."""

    _kind = "softmax"

    def __init__(self, *, workers: int = 8, shards: int = 2, mode: str = "sync", staleness: int = 0, optimizer: str | None = None,
                 lr: float | None = None, lr_decay: float = 0.0, epochs: int | None = None, batch_size: int | None = None, l1: float = 0.0,
                 l2: float | None = None, seed: int = 0, standardize: bool = True, categorical: list[str] | None = None,
                 hash_bits: int | None = None, server: str | None = None, in_process: bool = False):  # fmt: skip
        self.workers, self.shards, self.mode, self.staleness, self.optimizer = workers, shards, mode, staleness, optimizer
        self.lr, self.lr_decay, self.epochs, self.batch_size, self.l1, self.l2 = lr, lr_decay, epochs, batch_size, l1, l2
        self.seed, self.standardize, self.server, self.in_process = seed, standardize, server, in_process
        self.categorical, self.hash_bits = categorical, hash_bits

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities per row, columns in ``classes_`` order."""
        return self._scores(X)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def decision_function(self, X: Any) -> np.ndarray:
        """Per-class logits (n, k); for two classes the difference, class 1 minus class 0."""
        z = self._logits(X)[:, self._order]
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z


class PSLinearSVC(_Classifier):
    """Linear SVM with hinge loss (``psctl train svm``); one-vs-rest for more than two classes."""

    _kind = "svm"

    def __init__(self, *, workers: int = 8, shards: int = 2, mode: str = "sync", staleness: int = 0, optimizer: str | None = None,
                 lr: float | None = None, lr_decay: float = 0.0, epochs: int | None = None, batch_size: int | None = None, l1: float = 0.0,
                 l2: float | None = None, seed: int = 0, standardize: bool = True, categorical: list[str] | None = None,
                 hash_bits: int | None = None, server: str | None = None, in_process: bool = False):  # fmt: skip
        self.workers, self.shards, self.mode, self.staleness, self.optimizer = workers, shards, mode, staleness, optimizer
        self.lr, self.lr_decay, self.epochs, self.batch_size, self.l1, self.l2 = lr, lr_decay, epochs, batch_size, l1, l2
        self.seed, self.standardize, self.server, self.in_process = seed, standardize, server, in_process
        self.categorical, self.hash_bits = categorical, hash_bits

    def decision_function(self, X: Any) -> np.ndarray:
        """Margins: (n,) for two classes (positive: ``classes_[1]``), else (n, k)."""
        scores = self._scores(X)
        return scores[:, 1] if scores.shape[1] == 2 else scores


class PSLinearRegression(RegressorMixin, _LinearEstimator):
    """Linear regression (``psctl train linreg``): least squares, or ``loss="huber"``."""

    _kind = "linreg"
    _model_options = ("loss", "huber_delta")

    def __init__(self, *, loss: str = "squared", huber_delta: float = 1.0, workers: int = 8, shards: int = 2,
                 mode: str = "sync", staleness: int = 0, optimizer: str | None = None, lr: float | None = None,
                 lr_decay: float = 0.0, epochs: int | None = None, batch_size: int | None = None, l1: float = 0.0, l2: float | None = None,
                 seed: int = 0, standardize: bool = True, categorical: list[str] | None = None, hash_bits: int | None = None,
                 server: str | None = None, in_process: bool = False):  # fmt: skip
        self.loss, self.huber_delta = loss, huber_delta
        self.workers, self.shards, self.mode, self.staleness, self.optimizer = workers, shards, mode, staleness, optimizer
        self.lr, self.lr_decay, self.epochs, self.batch_size, self.l1, self.l2 = lr, lr_decay, epochs, batch_size, l1, l2
        self.seed, self.standardize, self.server, self.in_process = seed, standardize, server, in_process
        self.categorical, self.hash_bits = categorical, hash_bits

    def _config(self, data: str, spec: dict[str, Any], out: str) -> TrainConfig:
        cfg = super()._config(data, spec, out)
        if self.loss != "huber":  # psctl train refuses --huber-delta without --loss huber
            cfg.model_params.pop("huber_delta")
        return cfg

    def fit(self, X: Any, y: Any) -> PSLinearRegression:
        """Train on rows ``X`` (array, DataFrame) with numeric targets ``y``; returns self."""
        self._fit_features(X, y, lambda v: np.asarray(v, np.float64), y_numeric=True)
        return self

    def predict(self, X: Any) -> np.ndarray:
        return self._outputs(X)

    @property
    def coef_(self) -> np.ndarray:
        """Weights on the input's scale, (d,)."""
        return self._raw_scale()[0][:, 0]

    @property
    def intercept_(self) -> float:
        return float(self._raw_scale()[1][0])


class PSMatrixFactorization(RegressorMixin, _PSEstimator):
    """Matrix factorization with biases (``psctl train mf``) on (user, item, rating) rows.

    ``fit(X)`` takes rows of user id, item id and rating (an (n, 3) array, or a DataFrame
    with ``user_col``, ``item_col`` and ``rating_col``), or ``fit(X, y)`` with (user, item)
    rows and the ratings ``y``. Ids are integers or text (a float id that is an integer,
    as in a float array, is that integer). ``predict`` takes (user, item) rows; a user or
    item not seen in training is predicted by ``cold_start`` ("mean": the global mean plus
    the known side's bias, as ``psctl predict --cold-start mean``; "nan").
    """

    _kind = "mf"
    _model_options = ("rank",)

    def __init__(self, *, rank: int = 10, cold_start: str = "mean", user_col: str = "userId", item_col: str = "movieId",
                 rating_col: str = "rating", workers: int = 8, shards: int = 2, mode: str = "sync", staleness: int = 0,
                 optimizer: str | None = None, lr: float | None = None, lr_decay: float = 0.0, epochs: int | None = None,
                 batch_size: int | None = None, l1: float = 0.0, l2: float | None = None, seed: int = 0, server: str | None = None,
                 in_process: bool = False):  # fmt: skip
        self.rank, self.cold_start, self.user_col, self.item_col, self.rating_col = rank, cold_start, user_col, item_col, rating_col
        self.workers, self.shards, self.mode, self.staleness, self.optimizer = workers, shards, mode, staleness, optimizer
        self.lr, self.lr_decay, self.epochs, self.batch_size, self.l1, self.l2 = lr, lr_decay, epochs, batch_size, l1, l2
        self.seed, self.server, self.in_process = seed, server, in_process

    def _rows(self, X: Any, y: Any = None, fitting: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, 2) text ids and the ratings (None when there are none)."""
        if hasattr(X, "columns"):  # a DataFrame: by column name
            missing = [c for c in (self.user_col, self.item_col) if c not in X.columns]
            if missing:
                raise ValueError(f"the DataFrame has no column {missing[0]!r}; set user_col and item_col")
            if y is None and self.rating_col in X.columns:
                y = X[self.rating_col].to_numpy()
            columns = [X[self.user_col].to_numpy(), X[self.item_col].to_numpy()]
        else:
            # scikit-learn's own checks of an array (1-d, empty, complex, NaN, sparse: its sentences)
            A = check_array(X, dtype=None, ensure_all_finite=True)
            if A.shape[1] not in (2, 3):
                raise ValueError(f"{type(self).__name__} takes (user, item) or (user, item, rating) rows; got {A.shape[1]} columns")
            if A.shape[1] == 3:
                if y is None:
                    y = A[:, 2]
                A = A[:, :2]
            columns = [A[:, 0], A[:, 1]]
        if fitting and y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None (no rating column either)")
        if len(columns[0]) == 0:
            raise ValueError(f"Found array with 0 sample(s) (shape=(0, 2)) while a minimum of 1 is required by {type(self).__name__}.")
        ids = np.stack([ratings.id_text(c) for c in columns], axis=1)
        if y is None:
            return ids, None
        try:
            r = column_or_1d(y, warn=True).astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError("the ratings must be numbers") from None
        if len(r) != len(ids):
            raise ValueError(f"there are {len(ids)} rows and {len(r)} ratings")
        if not np.isfinite(r).all():
            raise ValueError("Input y contains NaN or infinity: the ratings must be finite numbers")
        return ids, r

    def fit(self, X: Any, y: Any = None) -> PSMatrixFactorization:
        """Train on (user, item, rating) rows; returns self."""
        if self.cold_start not in ("mean", "nan"):
            raise ValueError(f"cold_start must be 'mean' or 'nan'; got {self.cold_start!r}")
        ids, r = self._rows(X, y, fitting=True)
        assert r is not None
        schema = csvfile.CsvSchema((self.user_col, self.item_col, self.rating_col), 2, (0, 1), True)
        self._train(ids, r, "ratings", schema)
        self.n_features_in_ = 2
        return self

    def _loaded(self, meta: dict[str, Any]) -> None:
        self.n_features_in_ = 2

    def _mf(self) -> loading.MFModel:
        check_is_fitted(self)
        return loading.from_loaded("(fitted estimator)", self._model(), dict(self.model_params_), self.model_meta_)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted ratings of (user, item) rows: ``psctl predict --cold-start`` ``cold_start``."""
        mf = self._mf()
        ids, _ = self._rows(X)
        return recommend.rating_outputs(mf, ids, self.cold_start)[0]

    def recommend(self, user: Any, k: int = 10) -> list[tuple[str, float]]:
        """The top ``k`` (item id, predicted rating) for ``user``, best first."""
        recommend.check_top(k)
        return recommend.recommend_user(self._mf(), str(ratings.id_text(np.array([user]))[0]), k)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True  # ids may be text
        return tags
