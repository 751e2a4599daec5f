"""psctl inside a Spark application, as TensorFlowOnSpark places TensorFlow: train and predict.

:func:`train` runs one psctl job on the Spark cluster of the active ``SparkSession``: the
coordinator in the Spark driver (this process), the shards and workers as the tasks of one
barrier stage (``mapInArrow(..., barrier=True)``), so they start together, one per task slot.
Task k runs the worker of partition k, and tasks 0 .. shards-1 a shard too. Two ways in:

- ``input_mode="spark"`` (a DataFrame, as TensorFlowOnSpark's ``InputMode.SPARK``): each
  worker is fed the rows of its partition of the DataFrame as Arrow batches, in its task; no
  row goes through the driver. A planning pass counts each partition's rows first (and
  finds missing cells), so the DataFrame is computed twice: ``persist()`` one that is
  costly or not deterministic.
- ``input_mode="files"`` (a path or URL, as ``InputMode.TENSORFLOW``): the workers read a
  CSV or Parquet input themselves, each its own byte range or row groups, exactly as
  ``psctl train`` does; every executor must see the path (a shared folder, ``s3://``...).

Failures: a worker process that dies is started again by its task (psctl's own worker
recovery: it takes its partition's slot back at the clock the shards acknowledged, so
every row is still trained once per epoch); Spark's task retry is not used, since a failed
barrier task makes Spark restart every task of the stage. A task that fails for good (its
worker died ``max_restarts`` times more, or its executor was lost) ends the job with one
sentence. The driver stopping (the Spark application ending, Ctrl-C) closes the
coordinator and cancels the stage: shards, workers and tasks end with it, and a psctl
child process also exits by itself once its task's process is gone (it watches its stdin).

pyspark is the optional extra ``psctl[spark]``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

try:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql import types as T
except ImportError:  # pragma: no cover - the extra's absence is tested in a fresh interpreter
    raise ImportError("psctl.spark needs pyspark: run pip install 'psctl[spark]'") from None

from psctl import net
from psctl.apps import predict as apps_predict
from psctl.apps import train as apps_train
from psctl.cluster.coordinator import start_coordinator
from psctl.cluster.launch import embedded_security
from psctl.data import arrays, csvfile, formats
from psctl.errors import DataError, JobError, UsageError
from psctl.files import loading, modelfile
from psctl.models.base import class_values
from psctl.models.registry import model_class
from psctl.spark import tasks

__all__ = ["TrainedModel", "predict", "train"]

# Keyword arguments of train() that are TrainConfig fields, and those that are the model's own.
_TRAINING = ("epochs", "batch_size", "lr", "lr_decay", "l1", "l2", "optimizer", "seed", "staleness", "standardize",
             "test_split", "patience", "heartbeat_interval_s", "failure_timeout_s", "save_optimizer_state")
_MODEL_OPTIONS = ("rank", "loss", "huber_delta")
TASKS_STOP_TIMEOUT_S = 30.0  # after the coordinator closed: the tasks' shards see it at once
_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType, T.DecimalType, T.BooleanType)


@dataclass
class TrainedModel:
    """A model trained by :func:`train`: the model file's arrays and meta (what ``psctl
    predict`` reads), the job's figures and events, and the file's path when ``out`` was given."""

    params: dict[str, np.ndarray]
    meta: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    model_path: str | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.get("metrics", {})

    def save(self, path: str) -> None:
        """Write the model file (a path or URL) that ``psctl predict`` reads."""
        meta = {k: v for k, v in self.meta.items() if k not in ("format", "format_version")}
        modelfile.save_model(path, self.params, meta)

    def to_bytes(self) -> bytes:
        with tempfile.TemporaryDirectory(prefix="psctl-spark-") as tmp:
            path = os.path.join(tmp, "model.npz")
            self.save(path)
            with open(path, "rb") as fh:
                return fh.read()


def _session(spark: SparkSession | None) -> SparkSession:
    session = spark or SparkSession.getActiveSession()
    if session is None:
        raise UsageError("psctl.spark needs a running SparkSession: create one (SparkSession.builder.getOrCreate()) first")
    return session


def _bind_host(spark: SparkSession) -> str:
    """Where the coordinator and shards listen: loopback in local mode, else the driver's address."""
    master = spark.sparkContext.master
    if master.startswith("local"):
        return "127.0.0.1"
    return spark.conf.get("spark.driver.host", "") or "0.0.0.0"


def train(
    data: DataFrame | str,
    model: str = "logreg",
    *,
    label: str = "label",
    features: list[str] | None = None,
    shards: int = 2,
    workers: int | None = None,
    mode: str = "sync",
    out: str | None = None,
    input_mode: str | None = None,
    categorical: list[str] | tuple[str, ...] = (),
    hash_bits: int | None = None,
    user_col: str = "userId",
    item_col: str = "movieId",
    rating_col: str = "rating",
    max_restarts: int = 3,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    spark: SparkSession | None = None,
    **hyper_parameters: Any,
) -> TrainedModel:
    """Train ``model`` (logreg, softmax, svm, linreg, mf) on ``data`` with psctl's shards and
    workers as Spark tasks; returns the :class:`TrainedModel`, and with ``out`` also writes its
    model file there (any path or URL ``psctl predict`` reads).

    ``data``: a DataFrame (``input_mode="spark"``, the default for one) with the ``label``
    column and numeric ``features`` (default: every other column); with
    ``categorical`` (and ``hash_bits``), those columns' values are hashed as ``psctl train
    --categorical`` hashes a CSV's. For ``mf``: ``user_col``, ``item_col`` and ``rating_col``.
    Or a CSV or Parquet path or URL that every executor sees (``input_mode="files"``, the
    default for a string): the workers read it themselves. ``workers``: at most the
    application's task slots (``defaultParallelism``, the default); ``shards`` at most
    ``workers``. ``hyper_parameters``: ``psctl train``'s options (epochs, batch_size, lr,
    l2, optimizer, seed, staleness, test_split, rank, loss, ...); ``on_event`` sees the
    job's events as ``psctl train`` reports them.
    """
    session = _session(spark)
    input_mode = input_mode or ("files" if isinstance(data, str) else "spark")
    if input_mode not in ("spark", "files"):
        raise UsageError(f"input_mode must be 'spark' (rows from a DataFrame) or 'files' (the workers read the files); got {input_mode!r}")
    if (input_mode == "files") != isinstance(data, str):
        raise UsageError("input_mode='files' takes a path or URL of a CSV or Parquet input; input_mode='spark' a DataFrame")
    slots = session.sparkContext.defaultParallelism
    workers = slots if workers is None else workers
    if not 1 <= workers <= slots:
        raise UsageError(f"workers must be between 1 and the Spark application's {slots} task slots "
                         f"(a barrier stage runs every task at once); got {workers}")
    if not 1 <= shards <= workers:
        raise UsageError(f"shards must be between 1 and workers ({workers}): each shard runs in a worker's task; got {shards}")
    unknown = sorted(set(hyper_parameters) - set(_TRAINING) - set(_MODEL_OPTIONS))
    if unknown:
        raise UsageError(f"psctl.spark.train has no option {unknown[0]!r}; it takes psctl train's: {', '.join(_TRAINING + _MODEL_OPTIONS)}")
    model_cls = model_class(model)
    options = {k: v for k, v in hyper_parameters.items() if k in _TRAINING}
    model_params = {k: v for k, v in hyper_parameters.items() if k in _MODEL_OPTIONS}
    security = embedded_security(net.LOCAL)
    host = _bind_host(session)
    common = dict(workers=workers, shards=shards, mode=mode, server="(spark)", local_workers=0, min_shards=shards,
                  model_params=model_params, max_restarts=max_restarts, security=security, **options)
    if input_mode == "files":
        cfg = apps_train.TrainConfig(model, data, label=None if label == "label" else label, categorical=tuple(categorical),
                                     hash_bits=hash_bits, user_col=user_col, item_col=item_col, rating_col=rating_col, **common)
        frame = session.range(workers, numPartitions=workers)  # one empty-handed task per worker
        plan = dict(fmt="files", columns=(), label="")
    else:
        cfg, frame, plan = _plan_frame(data, model, model_cls, workers, label, features, categorical, hash_bits, user_col, item_col,
                                       rating_col, common)
    task_plan = tasks.TaskPlan(coordinator="", secret=security.secret, shards=shards, max_restarts=max_restarts,
                               max_frame_bytes=cfg.max_frame_bytes, bind_host=host, **plan)
    with tempfile.TemporaryDirectory(prefix="psctl-spark-") as tmp:
        cfg.out = out if out is not None else os.path.join(tmp, "model.npz")
        result = _run(_drive(session, frame, cfg, task_plan, host, on_event if on_event is not None else (lambda e: None)))
        _, params, meta = loading.load(cfg.out)
    return TrainedModel(params, meta, result.events, out)


def _plan_frame(
    df: DataFrame, model: str, model_cls: Any, workers: int, label: str, features: list[str] | None, categorical: Any, hash_bits: int | None,
    user_col: str, item_col: str, rating_col: str, common: dict[str, Any],
) -> tuple[apps_train.TrainConfig, DataFrame, dict[str, Any]]:
    """Check the DataFrame's columns, count each partition's rows; the job's config, the
    frame its tasks read, and their plan."""
    types = {f.name: f.dataType for f in df.schema.fields}
    numeric = {n for n, t in types.items() if isinstance(t, _NUMERIC)}
    categorical = tuple(sorted(set(categorical)))
    if model_cls.data_format == "ratings":
        tasks.check_columns(types, (user_col, item_col, rating_col), f"{model_cls.kind} reads (set user_col, item_col, rating_col)")
        if rating_col not in numeric:
            raise DataError(f"the rating column {rating_col!r} is {types[rating_col].simpleString()}, not numeric")
        columns, target, fmt = (user_col, item_col), rating_col, "ratings"
        schema = csvfile.CsvSchema((user_col, item_col, rating_col), 2, (0, 1), True)
        extra: dict[str, Any] = {}
    else:
        tasks.check_columns(types, (label,), "is the label (set label=...)")
        if model_cls.task == "regression" and label not in numeric:
            raise DataError(f"the label column {label!r} of {model_cls.kind} is {types[label].simpleString()}, not numeric")
        tasks.check_columns(types, categorical, "is named in categorical")
        if features is None:
            features = [n for n in types if n != label]  # as psctl train reads every column of a CSV
        tasks.check_columns(types, tuple(features), "is named in features")
        if not features:
            raise DataError("the DataFrame has no numeric feature column besides the label")
        if label in features:
            raise DataError(f"the label column {label!r} is also named in features")
        text = [n for n in features if n not in numeric and n not in categorical]
        if text:
            raise DataError(f"feature column {text[0]!r} is {types[text[0]].simpleString()}, not numeric: "
                            "name it in categorical to hash its values, or leave it out of features")
        columns, target = tuple(features), label
        schema = csvfile.CsvSchema((label, *features), 0, tuple(range(1, len(features) + 1)), True)
        hashed = bool(categorical) or hash_bits is not None
        fmt = "hashed_csv" if hashed else "csv"
        bits = formats.DEFAULT_HASH_BITS if hash_bits is None else int(hash_bits)
        extra = {"layout": "csr", "hash_bits": bits, "categorical": list(categorical)} if hashed else {}
    frame = df.select(*columns, target)
    if frame.rdd.getNumPartitions() != workers:
        frame = frame.repartition(workers)
    counted = frame.mapInArrow(partial(tasks.count_rows, (*columns, target)),
                               "partition long, rows long, null_column string, nulls long").collect()
    counts = [0] * workers
    for row in counted:
        counts[row["partition"]] += row["rows"]
        if row["nulls"]:
            raise DataError(f"column {row['null_column']!r} has missing values (null); fill or drop them first")
    if sum(counts) == 0:
        raise DataError("the DataFrame has no rows")
    spec = arrays.per_worker_spec(fmt, schema, counts, **extra)
    cfg = apps_train.TrainConfig(model, "(spark)", arrays=spec,
                                 user_col=user_col, item_col=item_col, rating_col=rating_col, **common)
    plan = dict(fmt=fmt, columns=columns, label=target, regression=model_cls.task == "regression", categorical=categorical,
                hash_bits=extra.get("hash_bits", 0))
    return cfg, frame, plan


def _run(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    raise UsageError("psctl.spark.train blocks until the job ends; call it outside a running event loop")


async def _drive(
    spark: SparkSession, frame: DataFrame, cfg: apps_train.TrainConfig, plan: tasks.TaskPlan, host: str,
    on_event: Callable[[dict[str, Any]], None],
) -> apps_train.TrainResult:
    """The coordinator here; the tasks' stage in a thread; the job as ``psctl train --server`` runs it."""
    server, _, address = await start_coordinator(host, 0, max_frame_bytes=cfg.max_frame_bytes, security=cfg.security)
    cfg.server = address
    plan = tasks.TaskPlan(**{**plan.__dict__, "coordinator": address})
    group = f"psctl-{uuid.uuid4().hex}"
    stage = asyncio.ensure_future(asyncio.to_thread(_run_stage, spark, frame, plan, group))
    training = asyncio.ensure_future(apps_train.train(cfg, on_event))
    try:
        await asyncio.wait({stage, training}, return_when=asyncio.FIRST_COMPLETED)
        if not training.done():  # the tasks end only after the job: this one failed
            training.cancel()
            await asyncio.wait({training})
            raise JobError(f"the Spark stage of psctl's shards and workers failed: {_spark_reason(stage.exception())}")
        return training.result()
    finally:
        if not training.done():
            training.cancel()
            await asyncio.wait({training})
        await server.close()  # the shards stop, and with them the tasks
        if not stage.done():
            done, _ = await asyncio.wait({stage}, timeout=TASKS_STOP_TIMEOUT_S)
            if not done:
                spark.sparkContext.cancelJobGroup(group)
                await asyncio.wait({stage}, timeout=TASKS_STOP_TIMEOUT_S)
        if stage.done() and not stage.cancelled():
            stage.exception()  # retrieved: the job's own error, if any, is the one raised


def _run_stage(spark: SparkSession, frame: DataFrame, plan: tasks.TaskPlan, group: str) -> list[Any]:
    sc = spark.sparkContext
    sc.setJobGroup(group, "psctl shards and workers", interruptOnCancel=True)
    try:
        return frame.mapInArrow(partial(tasks.run_task, plan), "partition long, rows long, restarts long", barrier=True).collect()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]


def _spark_reason(exc: BaseException | None) -> str:
    """The first line that says why, from a Spark error's long text (the task's Python error, if any)."""
    text = str(exc or "the stage ended before the job")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("psctl.errors.", "PsctlError", "JobError", "DataError")):
            return line.split(": ", 1)[-1]
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__


# -- prediction -------------------------------------------------------------------------------
def predict(df: DataFrame, model: str | TrainedModel | tuple[str, str], *, cold_start: str = "nan") -> DataFrame:
    """``df`` with the model's ``prediction`` column (and ``probability``, per class in the
    model's class order, for logreg and softmax), computed on the executors batch by batch
    (``mapInArrow``) as ``psctl predict`` computes it. ``model``: a model file's path or URL, a
    :class:`TrainedModel`, or ``(address, name)`` of a dense model kept on a psctl server (its
    tables are read once, here). mf: ``cold_start`` "nan" or "mean" for unseen users and items."""
    blob = _model_bytes(model)
    with tempfile.TemporaryDirectory(prefix="psctl-spark-") as tmp:
        path = os.path.join(tmp, "model.npz")
        with open(path, "wb") as fh:
            fh.write(blob)
        pred = apps_predict.load_predictor(path)
    meta = pred.meta
    types = {f.name: f.dataType for f in df.schema.fields}
    if pred.mf is not None:
        cold_start = apps_predict.check_cold_start(pred, cold_start)
        columns = (pred.mf.user_col, pred.mf.item_col)
        tasks.check_columns(types, columns, "the mf model reads (its user and item columns)")
        added = [T.StructField("prediction", T.DoubleType())]
    else:
        columns = tuple(meta.get("feature_names") or [])
        tasks.check_columns(types, columns, "the model was trained on")
        if (meta.get("input") or {}).get("format", "csv") == "csv":
            text = [c for c in columns if not isinstance(types[c], _NUMERIC)]
            if text:
                raise DataError(f"feature column {text[0]!r} is {types[text[0]].simpleString()}, not numeric")
        added = [T.StructField("prediction", _class_type(meta))]
        if meta.get("kind") in ("logreg", "softmax"):
            added.append(T.StructField("probability", T.ArrayType(T.DoubleType())))
    taken = [f.name for f in added if f.name in types]
    if taken:
        raise DataError(f"the DataFrame has a column {taken[0]!r} already; rename it before predicting")
    schema = T.StructType([*df.schema.fields, *added])
    return df.mapInArrow(partial(tasks.predict_batches, blob, columns, cold_start), schema)


def _class_type(meta: dict[str, Any]) -> T.DataType:
    if meta.get("task") == "regression":
        return T.DoubleType()
    values = class_values(meta["classes"])
    return {"i": T.LongType(), "f": T.DoubleType()}.get(values.dtype.kind, T.StringType())


def _model_bytes(model: Any) -> bytes:
    if isinstance(model, TrainedModel):
        return model.to_bytes()
    if isinstance(model, tuple) and len(model) == 2:
        return _kept_model_bytes(*model)
    if isinstance(model, str | os.PathLike):
        _, params, meta = loading.load(str(model))  # checked here, a path or URL: one sentence for a bad file
        return TrainedModel(params, meta).to_bytes()
    raise UsageError("model must be a model file's path, a psctl.spark.TrainedModel, or (address, name) of a kept model")


def _kept_model_bytes(address: str, name: str) -> bytes:
    from psctl.apps.api import ServerModel

    async def read() -> TrainedModel:
        kept = await ServerModel.load(address, name)
        try:  # the tables are read by now: the connections to the server close either way
            if kept._params is None:
                raise UsageError(f"kept model {name} reads its rows per call (mf, hashed); predict from its model file on Spark")
            return TrainedModel(dict(kept._params), dict(kept.meta))
        finally:
            kept.close()

    return _run(read()).to_bytes()

