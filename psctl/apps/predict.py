"""``psctl predict``: apply a model file to a CSV, with metrics when labels are present."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psctl.apps import recommend
from psctl.apps.results import json_safe
from psctl.core.job import DEFAULT_FAILURE_TIMEOUT_S, DEFAULT_HEARTBEAT_INTERVAL_S
from psctl.core.sparse import SparseRows, distinct
from psctl.data import csvfile, formats, parquet, ratings, storage
from psctl.errors import DataError, Interrupted, ModelFileError, PsctlError, UsageError
from psctl.files import loading
from psctl.models.base import Model, encode_targets, evaluate, predicted_index

log = logging.getLogger("psctl.predict")


@dataclass
class Prediction:
    meta: dict[str, Any]
    outputs: np.ndarray  # P(class 1), per-class scores, or values: see models.base
    predicted: list[str] | np.ndarray  # class labels, or values for regression
    metrics: dict[str, Any] | None  # None when the file has no label column
    unknown: dict[str, int] | None = None  # sparse input: feature occurrences / features without a weight


def schema_for(meta: dict[str, Any], path: str, delimiter: str | None = None,
               dataset: parquet.Dataset | None = None) -> csvfile.CsvSchema:
    """Find the model's feature columns (and the label, if present) in ``path`` (a CSV
    separated by ``delimiter``, by default the training file's, or the Parquet ``dataset``)."""
    if meta.get("schema") is None:
        raise ModelFileError("the model file has no training schema, so its feature columns cannot be found")
    trained = csvfile.CsvSchema.from_dict(meta["schema"])
    sep = trained.delimiter if delimiter is None else delimiter
    if not trained.has_header and dataset is None:
        columns = csvfile.read_columns(path, has_header=False, delimiter=sep)
        if len(columns) == len(trained.columns):
            return csvfile.CsvSchema(trained.columns, trained.label_index, trained.feature_indices, False, sep)
        if len(columns) == len(trained.feature_indices):
            return csvfile.CsvSchema(columns, None, tuple(range(len(columns))), False, sep)
        raise DataError(
            f"'{path}' has {len(columns)} columns; the model expects {len(trained.columns)} (with label) "
            f"or {len(trained.feature_indices)} (without)"
        )
    header = dataset.columns if dataset is not None else csvfile.read_columns(path, delimiter=sep)
    index = {name: i for i, name in enumerate(header)}
    missing = [n for n in trained.feature_names if n not in index]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"'{path}' lacks {len(missing)} column(s) the model was trained on: {shown}")
    label = meta.get("label")
    if dataset is not None and not trained.has_header:  # a Parquet file names its columns: the training file's numbers
        index = {**{str(i): i for i in range(len(header))}, **index}
        missing = [n for n in trained.feature_names if n not in index]
        if missing:
            raise DataError(f"'{path}' lacks {len(missing)} column(s) the model was trained on")
    return csvfile.CsvSchema(
        tuple(header), index.get(label) if label is not None else None, tuple(index[n] for n in trained.feature_names), True, sep
    )


# -- where the parameters come from: a model file (a kept model on a server: apps/kept.py) -----
@dataclass
class Predictor:
    """A model ready to apply to rows: its object, float64 parameters and meta (and for mf
    the vocabularies and tables as :class:`recommend.MFModel`)."""

    model: Model
    params: dict[str, np.ndarray]
    meta: dict[str, Any]
    mf: recommend.MFModel | None = None
    source: str = ""  # the model's name in messages (its file path, or "kept model NAME": apps/kept.py)

    @property
    def is_mf(self) -> bool:
        return self.mf is not None


def load_predictor(model_path: str, model_class_path: str | None = None) -> Predictor:
    """A :class:`Predictor` from a model file (checked as :func:`loading.load` does)."""
    model, params, meta = loading.load(model_path, model_class_path)
    if meta.get("data_format") == "ratings":
        return Predictor(model, params, meta, recommend.from_loaded(model_path, model, params, meta), model_path)
    return Predictor(model, {k: v.astype(np.float64, copy=False) for k, v in params.items()}, meta, None, model_path)


# -- where the rows come from: the model's reading of a data file, one byte range at a time -----
@dataclass(frozen=True)
class InputPlan:
    """How the rows of one data file are read for one model; plain JSON values, so a worker
    process gets it in its task file. ``kind``: dense, sparse (LIBSVM, hashed CSV) or ratings."""

    kind: str
    schema: csvfile.CsvSchema | None
    has_header: bool
    has_labels: bool
    parquet: dict[str, Any] | None = None  # Parquet input: its files and row groups (parquet.Dataset.to_data)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "schema": None if self.schema is None else self.schema.to_dict(),
                "has_header": self.has_header, "has_labels": self.has_labels, "parquet": self.parquet}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputPlan:
        schema = None if d["schema"] is None else csvfile.CsvSchema.from_dict(d["schema"])
        return cls(str(d["kind"]), schema, bool(d["has_header"]), bool(d["has_labels"]), d.get("parquet"))

    def dataset(self, path: str) -> parquet.Dataset | None:
        return None if self.parquet is None else parquet.Dataset.from_data(path, self.parquet)


def plan_input(pred: Predictor, data_path: str, delimiter: str | None = None) -> InputPlan:
    """Find the model's columns in ``data_path`` (reads its first line, or a Parquet
    input's footers); ``delimiter``: the CSV's, when not the training file's. Raises DataError."""
    if delimiter is not None:
        delimiter = csvfile.check_delimiter(delimiter)
    spec = pred.meta.get("input") or {}
    if pred.mf is None and spec.get("format", "csv") == "csv" and parquet.is_parquet(data_path):
        if delimiter is not None:
            raise UsageError("--delimiter is for CSV input; a Parquet file names its columns")
        dataset = parquet.describe(data_path)
        schema = schema_for(pred.meta, data_path, dataset=dataset)
        return InputPlan("dense", schema, True, schema.label_index is not None, dataset.to_data(schema))
    if pred.mf is not None:
        schema = recommend.input_schema(pred.mf, data_path, delimiter=delimiter)
        return InputPlan("ratings", schema, schema.has_header, schema.label_index is not None)
    if spec.get("format", "csv") == "libsvm":
        csvfile._open(data_path).close()  # one sentence now if the file is missing, as for CSV
        return InputPlan("sparse", None, False, True)
    schema = schema_for(pred.meta, data_path, delimiter)
    kind = "sparse" if spec.get("format") in formats.SPARSE_FORMATS else "dense"
    return InputPlan(kind, schema, schema.has_header, schema.label_index is not None)


def plan_parts(path: str, plan: InputPlan, n_parts: int) -> list[csvfile.Partition]:
    """``n_parts`` partitions of the input: byte ranges of a text file, row ranges of Parquet."""
    dataset = plan.dataset(path)
    if dataset is not None:
        return parquet.plan_partitions(dataset, n_parts)
    return csvfile.plan_partitions(path, n_parts, plan.has_header)


@dataclass
class Rows:
    """A batch of input rows as read from a file: dense features, SparseRows over model keys,
    or (user, item) ids; the label cells (None without a label column); for LIBSVM the raw
    feature indices past the model's feature count (they weigh 0)."""

    X: Any
    labels: np.ndarray | None
    outside: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def read_rows(pred: Predictor, plan: InputPlan, path: str, part: csvfile.Partition) -> Rows:
    """The rows in bytes [part.start, part.end) of ``path`` (only those bytes are read)."""
    if plan.kind == "ratings":
        assert plan.schema is not None
        ids, truth = ratings.read_partition(path, plan.schema, part)
        return Rows(ids, truth if plan.has_labels else None)
    spec = pred.meta.get("input") or {}
    if plan.kind == "dense":
        assert plan.schema is not None
        dataset = plan.dataset(path)
        if dataset is not None:
            X, labels = parquet.read_rows(dataset, plan.schema, part)
        else:
            X, labels = csvfile.read_partition(path, plan.schema, part)
        return Rows(X, labels if plan.has_labels else None)
    if spec["format"] == "libsvm":
        X, labels = formats.read_libsvm(path, part, spec.get("index_base"))
        keys = X.indices - int(spec["index_base"])
        inside = keys < pred.meta["n_features"]
        return Rows(X.with_indices(keys, inside), labels, X.indices[~inside])
    assert plan.schema is not None
    X, labels = formats.read_hashed_csv(path, part, plan.schema, spec["categorical"], int(spec["hash_bits"]))
    return Rows(X, labels if plan.has_labels else None)


def whole_file(path: str, plan: InputPlan) -> csvfile.Partition:
    """The one partition covering every row of ``path``."""
    [whole] = plan_parts(path, plan, 1)
    return whole


def file_slices(path: str, plan: InputPlan) -> list[csvfile.Partition]:
    """Every row of ``path`` as consecutive slices of about ``csvfile.SLICE_BYTES`` of text, for
    one process to read and evaluate one at a time: a whole file is never held as text or
    float64 at once, and each slice's arrays stay small enough to be reused rather than faulted
    in. A Parquet input is its one partition (pyarrow reads only its columns)."""
    if plan.dataset(path) is not None:
        return [whole_file(path, plan)]
    return csvfile.plan_slices(path, plan.has_header)


# -- the pure step: a batch of rows and a model in, outputs (and what metrics need) out ----------
@dataclass
class Evaluated:
    """One batch evaluated by :func:`evaluate_rows`: arrays and counts only, so batches
    evaluated apart (by worker processes) combine exactly in :func:`combine`."""

    outputs: np.ndarray  # see models.base: P(class 1), per-class scores, or values
    y: np.ndarray | None  # the labels encoded as the model's targets; None without labels
    unknown_occurrences: int = 0  # sparse input: feature occurrences without a weight
    unknown_outside: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # distinct raw indices past n_features
    unknown_missing: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # distinct keys without a stored row


def evaluate_rows(pred: Predictor, rows: Rows, cold_start: str = "nan") -> Evaluated | recommend.RatedRows:
    """Apply the model to one batch of rows (no I/O)."""
    if pred.mf is not None:
        return recommend.rate_rows(pred.mf, rows.X, rows.labels, cold_start)
    model, X = pred.model, rows.X
    y = None if rows.labels is None else encode_targets(model.task, rows.labels, model.classes)
    if isinstance(X, SparseRows):
        weights, missing = aligned_weights(model, pred.params, X)
        occurrences = len(rows.outside) + X.occurrences(distinct(missing))  # tables may share keys
        return Evaluated(model.predict(weights, X), y, occurrences, distinct(rows.outside), missing)
    if pred.meta.get("standardize"):
        # One new array, divided in place: (X - mean) / std to the bit, without a second
        # temporary of the batch's size (page faults on fresh memory are most of its cost).
        X = np.subtract(X, np.asarray(pred.meta["standardize"]["mean"]))
        X /= np.asarray(pred.meta["standardize"]["std"])
    return Evaluated(model.predict(pred.params, X), y)


def combine(pred: Predictor, parts: list[Any], plan: InputPlan, cold_start: str = "nan", scored: bool = True) -> Any:
    """The prediction of a whole file from its batches in file order (``scored``: with
    metrics, computed once over every row, so they equal one batch holding them all)."""
    if pred.mf is not None:
        return recommend.combine_parts(pred.mf, parts, cold_start, plan.has_labels, scored)
    model = pred.model
    outputs = np.concatenate([p.outputs for p in parts])
    predicted: list[str] | np.ndarray = (
        outputs if model.task == "regression" else [model.classes[i] for i in predicted_index(model.task, outputs).tolist()]
    )
    scores = None
    if plan.has_labels and scored:
        y = np.concatenate([p.y for p in parts])
        scores = {"rows": len(y), **evaluate(model.task, y, outputs, len(model.classes))}
    unknown = None
    if plan.kind == "sparse":
        unknown = {
            "occurrences": sum(p.unknown_occurrences for p in parts),
            "features": len(distinct(np.concatenate([p.unknown_outside for p in parts])))
            + len(distinct(np.concatenate([p.unknown_missing for p in parts]))),
        }
    return Prediction(pred.meta, outputs, predicted, scores, unknown)


# -- the whole job, in this process or spread over worker processes ----------------------------
def predict(
    model_path: str,
    data_path: str,
    model_class_path: str | None = None,
    cold_start: str | None = None,
    *,
    workers: int | None = None,
    out: str | None = None,
    failure_timeout_s: float | None = None,
    delimiter: str | None = None,
) -> Any:
    """A :class:`Prediction`, or for an mf model a recommend.RatingsPrediction
    (``cold_start``: what to do with users and items the model has not seen; mf only, default nan).

    With ``workers`` N, N worker processes each read and predict one byte range of the file
    (see :func:`predict_spread`); the result and the ``out`` file are the same as
    in one process. ``out``: also write the per-row predictions there.
    ``failure_timeout_s``: with ``workers``, a worker silent this long is declared lost
    (default 5 s, as in training). A model kept on a server: ``kept.predict`` (one process)
    and ``kept.predict_spread`` (workers).
    """
    if out is not None:
        check_predictions_path(out)
    if workers is not None:
        timeout_s = DEFAULT_FAILURE_TIMEOUT_S if failure_timeout_s is None else failure_timeout_s
        return predict_spread(model_path, data_path, workers, model_class_path, cold_start, out, failure_timeout_s=timeout_s,
                              delimiter=delimiter)
    if failure_timeout_s is not None:
        raise UsageError("--failure-timeout-s is how long a silent predict worker is waited for; it needs --workers N")
    pred = load_predictor(model_path, model_class_path)
    cold = check_cold_start(pred, cold_start)
    plan = plan_input(pred, data_path, delimiter)
    parts = [evaluate_rows(pred, read_rows(pred, plan, data_path, part), cold) for part in file_slices(data_path, plan)]
    result = combine(pred, parts, plan, cold)
    if out is not None:
        write_predictions(result, out)
    return result


def check_cold_start(pred: Predictor, cold_start: str | None) -> str:
    """The cold-start strategy to use: ``cold_start`` for mf (default nan); refused for other models."""
    if pred.mf is None:
        if cold_start is not None:
            raise UsageError(f"--cold-start is for mf models; {pred.source} is a {pred.meta.get('kind')} model")
        return "nan"
    recommend.check_cold_start(cold_start or "nan")
    return cold_start or "nan"


def predict_pairs(model: str | recommend.MFModel, users: Any, items: Any, cold_start: str = "nan") -> np.ndarray:
    """Predicted ratings of an mf model (a model file's path, or one loaded by
    ``recommend.load_mf``) for (user id, item id) pairs: two equal-length sequences or arrays.
    An unknown user or item is NaN, or under ``cold_start`` "mean" the global mean plus the
    known side's bias; clipped to the training ratings' range."""
    mf = recommend.load_mf(model) if isinstance(model, str) else model
    return recommend.predict_pairs(mf, users, items, cold_start)


def predict_one(model_path: str, user: str, item: str, model_class_path: str | None = None, cold_start: str | None = None) -> dict[str, Any]:
    """``psctl predict MODEL --user U --item I``: the predicted rating of one pair, as plain values."""
    pred = load_predictor(model_path, model_class_path)
    if pred.mf is None:
        raise UsageError(f"--user and --item are for mf models; {model_path} is a {pred.meta.get('kind')} model (give a data file)")
    cold = check_cold_start(pred, cold_start)
    rating = recommend.predict_one(pred.mf, user, item, cold)
    return {"model_path": model_path, "user": user, "item": item, "predicted_rating": rating,
            "cold_start": cold, "rating_range": None if pred.mf.model.rating_range is None else list(pred.mf.model.rating_range)}


# -- spread over worker processes (the worker is psctl.apps.predict_workers) --------------------
#: The most worker processes one prediction starts.
MAX_WORKERS = 256
#: How long stopped workers get to exit before the parent stops waiting (they were SIGKILLed).
STOP_TIMEOUT_S = 3.0
TASK_FILE = "task.json"  # the worker names it too (psctl.apps.predict_workers), before it may import this module


def heartbeat_interval_s(failure_timeout_s: float) -> float:
    """How often a predict worker gives a sign of life: as a training worker by default
    (0.5 s), and at least four times per failure timeout."""
    return min(DEFAULT_HEARTBEAT_INTERVAL_S, failure_timeout_s / 4)


def predict_spread(
    model_path: str,
    data_path: str,
    workers: int,
    model_class_path: str | None = None,
    cold_start: str | None = None,
    out: str | None = None,
    *,
    failure_timeout_s: float = DEFAULT_FAILURE_TIMEOUT_S,
    server: str | None = None,
    predictor: Predictor | None = None,
    security: Any = None,
    max_frame_bytes: int | None = None,
    pulled: dict[str, int] | None = None,
    batch_bytes: int = 0,
    delimiter: str | None = None,
) -> Any:
    """The prediction of ``data_path`` by ``workers`` processes, equal to :func:`predict`'s
    in one process; ``out``: the predictions file, byte for byte the same.

    With ``server`` (``kept.predict_spread``), ``model_path`` is the name of a model kept
    there and ``predictor`` what the parent read of it (its meta, a dense model's tables), to
    plan the file and combine the results; each worker opens
    its own connections to the shards and reads its range in batches of at most
    ``kept.BATCH_BYTES``, pulling for each batch only the keys its rows touch (a sparse or
    mf model) as ``psctl predict NAME --server`` does in one process. The workers get the
    cluster's secret down an inherited pipe, never in argv, the environment or a file.
    ``pulled`` (a dict) gets what the workers read in all (``keys_pulled``, ``bytes_pulled``);
    ``batch_bytes`` (0: :data:`BATCH_BYTES`) bounds a kept model's batches.

    The parent plans N byte ranges of the file (``csvfile.plan_partitions``, as training
    does) and starts N processes (``python -m psctl.apps.predict_workers FOLDER K``, the
    way psctl starts every child: ``cluster.processes.start_process``); each reads only its
    range and applies :func:`read_rows` and :func:`evaluate_rows`. Back come per-row
    arrays, not per-worker metrics: the parent concatenates them in file order and
    computes every metric once (:func:`combine`), so accuracy, log loss, AUC, RMSE, ...
    are exactly those of one process (cheap: 8 bytes a row and class). Each worker also
    formats its own rows of the predictions file (the slow part in Python); the parent
    joins them after the header into the bytes one process writes.

    Nothing between the parent and the workers is pickled: the task is a JSON file, the
    results ``.npy`` files read with ``allow_pickle=False`` plus a JSON file of counts,
    in a temporary folder. Files need no framing or flow control, numpy writes and reads
    them at disk speed, and ``allow_pickle=False`` means a result can only be numbers or
    fixed-width strings, never code.

    Every worker is watched: it writes a byte to its stdout pipe every
    :func:`heartbeat_interval_s` (from a thread, so long numpy work does not silence it),
    and one silent for ``failure_timeout_s`` (stopped, hung) ends the job with a sentence
    naming it, every worker killed. Silence is judged as the training coordinator judges
    it (``core.coordinator.Liveness``): only over time this process was running, so a
    parent that was itself stopped reads what its workers sent meanwhile before it judges
    any of them.
    """
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 1 and {MAX_WORKERS}; got {workers}")
    if not (isinstance(failure_timeout_s, (int, float)) and math.isfinite(failure_timeout_s) and failure_timeout_s > 0):
        raise UsageError(f"--failure-timeout-s must be a positive number of seconds; got {failure_timeout_s}")
    try:
        return _run(model_path, data_path, workers, model_class_path, cold_start, out, float(failure_timeout_s),
                    server, predictor, security, max_frame_bytes, pulled, batch_bytes or BATCH_BYTES, delimiter)  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(INTERRUPTED) from None


def _run(
    model_path: str, data_path: str, workers: int, model_class_path: str | None, cold_start: str | None, out: str | None,
    failure_timeout_s: float, server: str | None = None, predictor: Predictor | None = None, security: Any = None,
    max_frame_bytes: int | None = None, pulled: dict[str, int] | None = None, batch_bytes: int = 0,
    delimiter: str | None = None,
) -> Any:
    # here, not at the top: a worker process imports this module and needs neither
    from psctl import net
    from psctl.protocol.wire import DEFAULT_MAX_FRAME_BYTES

    security = net.LOCAL if security is None else security
    frame = DEFAULT_MAX_FRAME_BYTES if max_frame_bytes is None else max_frame_bytes
    if server is None:
        pred = load_predictor(model_path, model_class_path)
    else:
        assert predictor is not None, "a kept model's predictor comes from kept.predict_spread"
        pred = predictor
    cold = check_cold_start(pred, cold_start)
    plan = plan_input(pred, data_path, delimiter)
    if server is None:
        batches = plan_parts(data_path, plan, workers)
        assign = [(k, k + 1) for k in range(workers)]
    else:  # byte ranges of at most BATCH_BYTES, consecutive ones to each worker
        batches = plan_batches(data_path, plan, workers, batch_bytes or BATCH_BYTES)
        assign = [(k * len(batches) // workers, (k + 1) * len(batches) // workers) for k in range(workers)]
    spans = [_span(k, batches[lo:hi]) for k, (lo, hi) in enumerate(assign)]
    folder = Path(tempfile.mkdtemp(prefix="psctl-predict-"))
    try:
        task = {
            # As typed: a worker runs in this process's folder, so its errors name the files the same way.
            "model_path": model_path,
            "model_class": model_class_path,
            "data_path": data_path,
            "cold_start": cold,
            "plan": plan.to_dict(),
            "partitions": [p.to_dict() for p in batches],
            "assign": assign,  # worker k predicts partitions [lo, hi)
            "write_rows": out is not None,
            "heartbeat_interval_s": heartbeat_interval_s(failure_timeout_s),
        }
        if server is not None:
            tls = security.tls
            task["server"] = {
                "address": server, "max_frame_bytes": frame, "tls_ca": tls.ca if tls else None, "tls": tls is not None,
                "handshake_timeout_s": security.handshake_timeout_s, "idle_timeout_s": security.idle_timeout_s,
            }  # fmt: skip
        (folder / TASK_FILE).write_text(json.dumps(task))
        net.run(lambda: _run_workers(folder, spans, data_path, failure_timeout_s, security.secret if server else None))
        kind = recommend.RatedRows if pred.is_mf else Evaluated
        result = combine(pred, [load_part(kind, folder, j) for j in range(len(batches))], plan, cold)
        if server is not None and pulled is not None:
            for k in range(workers):
                for key, n in json.loads((folder / f"{k}.pulled.json").read_text()).items():
                    pulled[key] = pulled.get(key, 0) + int(n)
        if out is not None:
            _join_rows(result, folder, len(batches), out)
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


INTERRUPTED = "interrupted; every predict worker has been stopped and no predictions were written"

#: Bytes of the data file read and evaluated at a time with a kept model: each batch's keys are
#: pulled from the shards just before the batch is evaluated, so the file is read once and
#: memory stays bounded.
BATCH_BYTES = 16 << 20


def plan_batches(data_path: str, plan: InputPlan, at_least: int, batch_bytes: int = BATCH_BYTES) -> list[csvfile.Partition]:
    """The byte ranges a kept model's prediction reads one at a time: at most ``batch_bytes``
    each, and at least ``at_least`` of them (one per worker process)."""
    dataset = plan.dataset(data_path)
    size = dataset.size if dataset is not None else storage.stored_size(data_path)
    return plan_parts(data_path, plan, max(at_least, -(-size // batch_bytes)))


def _span(k: int, parts: list[csvfile.Partition]) -> csvfile.Partition:
    """The byte range of consecutive partitions, as one (what worker ``k`` reads)."""
    return csvfile.Partition(k, parts[0].start, parts[-1].end, parts[0].first_line, sum(p.n_rows for p in parts))


async def _run_workers(
    folder: Path, parts: list[csvfile.Partition], data_path: str, failure_timeout_s: float, secret: bytes | None = None
) -> None:
    """Start a worker per partition and wait for every one; the first that fails or falls
    silent for ``failure_timeout_s`` ends the wait (PsctlError naming it and why) and the
    others are stopped. Every worker is gone when this returns or raises, Ctrl-C
    (cancellation) included."""
    import asyncio  # here, as net and processes: the worker processes import this module without them

    from psctl.cluster import processes
    from psctl.core.coordinator import Liveness, tick_interval_s

    beat_s = heartbeat_interval_s(failure_timeout_s)
    tick_s = tick_interval_s(beat_s, failure_timeout_s)
    liveness = Liveness.for_intervals(beat_s, failure_timeout_s)
    loop = asyncio.get_running_loop()
    procs: list[asyncio.subprocess.Process] = []
    listeners: list[asyncio.Future[None]] = []
    # Ctrl-C through the loop's own handler: it wakes the loop at once. The runner's default
    # one runs only when the loop next runs Python code, which with every worker quiet
    # (stopped) is the next tick, after the failure timeout has judged them.
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    ctrl_c = asyncio.ensure_future(interrupted.wait())
    try:
        for k in range(len(parts)):
            procs.append(await _start_worker(processes, folder, k, secret))
            liveness.watch(k)  # from its start: a worker that never beats is lost too
            listeners.append(asyncio.ensure_future(_listen(procs[k], k, len(parts), liveness)))
        liveness.tick(loop.time())  # silence counts from here
        waits = {asyncio.ensure_future(p.wait()): k for k, p in enumerate(procs)}
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait({*pending, ctrl_c}, timeout=tick_s, return_when=asyncio.FIRST_COMPLETED)
            if interrupted.is_set():
                raise Interrupted(INTERRUPTED)  # once every worker is stopped, below
            pending.discard(ctrl_c)
            for task in done:
                k = waits[task]
                liveness.forget(k)
                if procs[k].returncode != 0:
                    raise _worker_failed(folder, k, len(parts), parts[k], procs[k].returncode, data_path)
            for k, silent_s in liveness.tick(loop.time()):
                assert isinstance(k, int)
                raise _worker_silent(k, len(parts), parts[k], silent_s, failure_timeout_s, data_path)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        ctrl_c.cancel()
        for listener in listeners:
            listener.cancel()
        for p in procs:
            processes.kill_process_group(p)
        left = [asyncio.ensure_future(p.wait()) for p in procs if p.returncode is None]
        if left:
            await asyncio.wait(left, timeout=STOP_TIMEOUT_S)


async def _start_worker(processes: Any, folder: Path, k: int, secret: bytes | None) -> Any:
    """``python -m psctl.apps.predict_workers FOLDER K [SECRET_FD]``: the secret (to read a
    kept model from the shards) down a pipe the worker inherits, as psctl's other children get it."""
    args = ["-m", "psctl.apps.predict_workers", str(folder), str(k)]
    if secret is None:
        return await processes.start_process(args, folder / f"worker-{k}.log")
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(secret)  # far below a pipe's buffer: does not block
        return await processes.start_process([*args, str(read_fd)], folder / f"worker-{k}.log", pass_fds=(read_fd,))
    finally:
        os.close(read_fd)


async def _listen(proc: Any, k: int, n: int, liveness: Any) -> None:
    """Count every byte worker ``k`` writes to its stdout as a sign of life, until it closes."""
    first = True
    while await proc.stdout.read(1 << 12):
        liveness.heard(k)
        if first:
            log.info("predict worker %d of %d: alive", k + 1, n)
            first = False


def _worker_silent(k: int, n: int, part: csvfile.Partition, silent_s: float, timeout_s: float, data_path: str) -> PsctlError:
    return PsctlError(
        f"predict worker {k + 1} of {n} ({_rows_of(part)} of '{data_path}') gave no sign of life for {silent_s:.1f} s "
        f"(stopped or hung; --failure-timeout-s is {timeout_s:g}), so every worker was stopped; no predictions were written"
    )


def _rows_of(part: csvfile.Partition) -> str:
    return f"{part.n_rows} rows from line {part.first_line}" if part.n_rows else "no rows"


def _worker_failed(folder: Path, k: int, n: int, part: csvfile.Partition, code: int | None, data_path: str) -> PsctlError:
    """The error a failed worker reported (its one sentence, its type's exit code), or one
    sentence on how it died."""
    try:
        report = json.loads((folder / f"{k}.error.json").read_text())
        error = PsctlError(str(report["message"]))
        error.exit_code = int(report["exit_code"])
        return error
    except (OSError, ValueError, KeyError, TypeError):
        pass
    how = f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with code {code}"
    rows = _rows_of(part)
    try:
        tail = (folder / f"worker-{k}.log").read_text(errors="replace").strip().splitlines()[-1:]
    except OSError:
        tail = []
    said = f" (its last words: {tail[0][:200]})" if tail else ""
    return PsctlError(
        f"predict worker {k + 1} of {n} ({rows} of '{data_path}') {how} before it finished{said}; no predictions were written"
    )


def _join_rows(result: Any, folder: Path, workers: int, out: str) -> None:
    """The header (written as one process writes it), then each worker's rows in file order."""
    try:
        with open(out, "w", newline="") as fh:
            csv.writer(fh).writerow(predictions_header(result))
            fh.flush()
            for k in range(workers):
                with open(folder / f"{k}.rows.csv", "rb") as piece:
                    shutil.copyfileobj(piece, fh.buffer, 1 << 20)
    except OSError as exc:
        raise DataError(f"cannot write predictions to '{out}': {exc.strerror or exc}") from None
    except BaseException:  # Ctrl-C while joining: no half-written predictions file
        if Path(out).is_file():
            Path(out).unlink()
        raise


# -- results as files: numpy arrays as .npy (no pickle), everything else as JSON ----------------
def save_part(obj: Any, folder: Path, k: int) -> None:
    plain: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            np.save(folder / f"{k}.{f.name}.npy", value, allow_pickle=False)
        else:
            plain[f.name] = value
    (folder / f"{k}.result.json").write_text(json.dumps(plain))


def load_part(kind: type, folder: Path, k: int) -> Any:
    values = json.loads((folder / f"{k}.result.json").read_text())
    for f in dataclasses.fields(kind):
        if f.name not in values:
            values[f.name] = np.load(folder / f"{k}.{f.name}.npy", allow_pickle=False)
    return kind(**values)


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
    """The per-row predictions of ``pred`` as CSV: a header, then one line per row."""
    try:
        with open(out, "w", newline="") as fh:
            csv.writer(fh).writerow(predictions_header(pred))
            write_prediction_rows(pred, fh)
    except OSError as exc:
        raise DataError(f"cannot write predictions to '{out}': {exc.strerror or exc}") from None


def predictions_header(pred: Any) -> list[str]:
    if pred.meta.get("data_format") == "ratings":
        user, item, rating = pred.columns
        return [user, item, *([rating] if rating else []), "predicted"]
    task = pred.meta.get("task", "binary")
    if task == "regression":
        return ["predicted"]
    if task == "binary":
        return ["probability", "predicted"]
    return [*(f"score_{c}" for c in pred.meta.get("classes") or []), "predicted"]


def write_prediction_rows(pred: Any, fh: Any) -> None:
    """The rows of ``pred``'s predictions file without its header, to the text file ``fh``
    (so rows written apart, by worker processes, join into the same bytes)."""
    if pred.meta.get("data_format") == "ratings":
        return recommend.write_rating_rows(pred, fh)
    task = pred.meta.get("task", "binary")
    outputs = np.asarray(pred.outputs)
    if task == "regression":
        _write_rows(fh, "%.6g\r\n", [outputs.tolist()])
    elif task == "binary":
        _write_rows(fh, "%.6f,%s\r\n", [outputs.tolist(), csv_cells(pred.predicted)])
    else:
        columns = [outputs[:, c].tolist() for c in range(outputs.shape[1])]
        _write_rows(fh, "%.6f," * len(columns) + "%s\r\n", [*columns, csv_cells(pred.predicted)])


# Rows formatted per ``%`` over a block (the formatting loop runs in C): 4x faster than
# csv.writer with a list per row (1M binary rows: 0.9 s against 3.6 s), the same bytes.
ROWS_PER_WRITE = 65_536


def _write_rows(fh: Any, row_format: str, columns: list[list[Any]]) -> None:
    """Write ``row_format % (column values of a row)`` for every row, a block at a time."""
    k, n = len(columns), len(columns[0])
    for start in range(0, n, ROWS_PER_WRITE):
        stop = min(n, start + ROWS_PER_WRITE)
        flat: list[Any] = [None] * ((stop - start) * k)
        for j, column in enumerate(columns):
            flat[j::k] = column[start:stop]
        fh.write((row_format * (stop - start)) % tuple(flat))


def csv_cells(texts: np.ndarray) -> list[str]:
    """Each text as csv.writer writes it among other cells (quoted when it holds a comma,
    a quote or a line break), quoting each distinct text once."""
    distinct, inverse = np.unique(np.asarray(texts, dtype=str), return_inverse=True)
    out = io.StringIO()
    writer = csv.writer(out)
    cells = []
    for text in distinct.tolist():
        out.seek(0)
        out.truncate()
        writer.writerow([text, ""])  # among others: an empty cell stays empty
        cells.append(out.getvalue()[:-3])  # less the ",", "\r\n"
    return np.array(cells, dtype=object)[inverse.reshape(-1)].tolist() if cells else []


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
