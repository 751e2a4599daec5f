"""What runs inside Spark's tasks: a psctl shard and worker per barrier task, and the predict step.

A task is a small supervisor. It turns the Arrow batches Spark gives it into the arrays a
worker reads (:mod:`psctl.data.arrays`, in a folder of the task's own), starts its shard
(the first ``shards`` tasks) and its worker as child processes the way the embedded cluster
does (:class:`psctl.cluster.launch.LocalCluster`: stdin watched, so they never outlive the
task's Python process; the secret through a pipe), and starts the worker again when it dies
(psctl's own worker recovery: the new process takes the lost slot of its partition and
resumes at the clock the shards acknowledged). It returns once its worker has finished and
its shard has seen the driver close the coordinator (the driver has read the model by then).

Nothing here imports pyspark at module level but the task context, so the module loads
wherever psctl does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from psctl import net
from psctl.cluster.launch import LocalCluster
from psctl.data import arrays, csvfile, formats, ratings
from psctl.errors import ConnectError, DataError, JobError

SHARD_STOP_TIMEOUT_S = 60.0  # the driver pulls the model, then closes the coordinator


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    """Everything a task needs, as plain values (Spark sends it to the executors with the function)."""

    coordinator: str
    secret: bytes | None
    shards: int
    fmt: str  # csv, hashed_csv, ratings, or "files" (the workers read the job's files)
    columns: tuple[str, ...]  # features (csv, hashed), or (user, item) for ratings
    label: str  # the label column, or the rating column
    regression: bool = False  # labels as numbers, else as a CSV's label text
    categorical: tuple[str, ...] = ()
    hash_bits: int = 0
    max_restarts: int = 3
    max_frame_bytes: int = 0
    bind_host: str = "127.0.0.1"  # where the coordinator listens: loopback in local mode (the shards too), else the driver's


def _column(batches: list[Any], name: str) -> np.ndarray:
    """One column of the task's Arrow batches as a numpy array (text as Python str objects)."""
    import pyarrow as pa

    if not batches:
        return np.empty(0)
    chunks = [b.column(b.schema.get_field_index(name)) for b in batches]
    return pa.chunked_array(chunks).to_numpy()


def label_text(values: np.ndarray) -> np.ndarray:
    """Label cells as a CSV holds them ("1", "1.0" and 1 are one class, as psctl train reads them)."""
    return np.array([csvfile.normalize_label(str(v)) for v in values.tolist()], dtype=str)


def write_rows(plan: TaskPlan, batches: list[Any], folder: str) -> tuple[str, int]:
    """This task's rows as the arrays a worker reads; returns the features file and the row count."""
    if plan.fmt == "ratings":
        ids = np.stack([ratings.id_text(_column(batches, c)) for c in plan.columns], axis=1) if batches else np.empty((0, 2), str)
        features, _ = arrays.write(folder, ids, _column(batches, plan.label).astype(np.float64), allow_empty=True)
        return features, len(ids)
    y = _column(batches, plan.label)
    labels = y.astype(np.float64) if plan.regression else label_text(y)
    if plan.fmt == "hashed_csv":
        rows = formats.hash_columns([(c, _column(batches, c)) for c in plan.columns], plan.categorical, plan.hash_bits)
        features, _, _ = arrays.write_csr(folder, rows, labels, allow_empty=True)
        return features, len(labels)
    X = np.column_stack([_column(batches, c).astype(np.float64) for c in plan.columns]) if batches else np.empty((0, len(plan.columns)))
    features, _ = arrays.write(folder, X, labels, allow_empty=True)
    return features, len(labels)


def count_rows(plan_columns: tuple[str, ...], batches: Iterator[Any]) -> Iterator[Any]:
    """The row count and the null cells of the named columns of one partition (the driver's
    planning pass: no row leaves the executor)."""
    import pyarrow as pa
    from pyspark import TaskContext

    rows, nulls = 0, dict.fromkeys(plan_columns, 0)
    for b in batches:
        rows += b.num_rows
        for c in plan_columns:
            nulls[c] += b.column(b.schema.get_field_index(c)).null_count
    worst = max(plan_columns, key=lambda c: nulls[c]) if plan_columns else ""
    yield pa.RecordBatch.from_pydict(
        {"partition": [TaskContext.get().partitionId()], "rows": [rows], "null_column": [worst], "nulls": [nulls.get(worst, 0)]}
    )


def run_task(plan: TaskPlan, batches: Iterator[Any]) -> Iterator[Any]:
    """A barrier task: this partition's rows to its worker, and (the first ``plan.shards``) a shard."""
    import pyarrow as pa
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    k = context.partitionId()
    if not net.is_loopback(plan.bind_host):  # a shard listens on its executor's own address
        plan = dataclasses.replace(plan, bind_host=context.getTaskInfos()[k].address.rsplit(":", 1)[0])
    folder = tempfile.mkdtemp(prefix="psctl-spark-")
    try:
        features, n = (None, 0) if plan.fmt == "files" else write_rows(plan, list(batches), folder)
        restarts = asyncio.run(_serve(plan, k, features, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    yield pa.RecordBatch.from_pydict({"partition": [k], "rows": [n], "restarts": [restarts]})


async def _serve(plan: TaskPlan, k: int, features: str | None, folder: str) -> int:
    security = dataclasses.replace(net.LOCAL, secret=plan.secret)
    log_dir = str(Path(folder) / "logs")
    restarts = 0
    async with LocalCluster(host=plan.bind_host, max_frame_bytes=plan.max_frame_bytes, security=security, log_dir=log_dir) as cluster:
        shards = []
        if k < plan.shards:
            await cluster.start_shards(1, plan.coordinator)
            shards = [c for c in cluster.children if c.role == "shard"]
        # Rows held here alone: the worker claims its partition. Files: any partition will do.
        partition = None if features is None else k
        while True:
            (worker,) = await cluster.start_workers(1, plan.coordinator, data_path=features, partition=partition)
            code = await worker.proc.wait()
            if code in (0, ConnectError.exit_code):  # done; or the coordinator is gone: the driver ended the job
                break
            if restarts >= plan.max_restarts:
                last = (worker.log_tail().splitlines() or ["no output"])[-1]
                raise JobError(f"the psctl worker of Spark partition {k} exited {restarts + 1} times (code {code}): {last}")
            restarts += 1
        for shard in shards:  # it stops when the driver closes the coordinator, after reading the model
            try:
                async with asyncio.timeout(SHARD_STOP_TIMEOUT_S):
                    await shard.proc.wait()
            except TimeoutError:
                pass  # LocalCluster.stop ends it
    return restarts


# -- prediction ---------------------------------------------------------------------------------
def predict_batches(model_file: bytes, columns: tuple[str, ...], cold_start: str, batches: Iterator[Any]) -> Iterator[Any]:
    """Each Arrow batch with the model's prediction (and probability) columns appended."""
    import pyarrow as pa

    from psctl.apps import predict as apps_predict

    with tempfile.TemporaryDirectory(prefix="psctl-spark-predict-") as tmp:
        path = os.path.join(tmp, "model.npz")
        with open(path, "wb") as fh:
            fh.write(model_file)
        pred = apps_predict.load_predictor(path)
    for batch in batches:
        out = predict_columns(pred, [batch], columns, cold_start)
        yield pa.RecordBatch.from_arrays([*batch.columns, *out.values()], names=[*batch.schema.names, *out.keys()])


def predict_columns(pred: Any, batches: list[Any], columns: tuple[str, ...], cold_start: str) -> dict[str, Any]:
    """The prediction (and probability) of each row, as Arrow arrays."""
    import pyarrow as pa

    from psctl.apps import predict as apps_predict
    from psctl.models.base import class_values, predicted_index

    meta = pred.meta
    if pred.mf is not None:
        ids = np.stack([ratings.id_text(_column(batches, c)) for c in columns], axis=1)
        rated = apps_predict.evaluate_rows(pred, apps_predict.Rows(ids, None), cold_start)
        return {"prediction": pa.array(rated.outputs, pa.float64())}
    spec = meta.get("input") or {}
    if spec.get("format") == "hashed_csv":
        X: Any = formats.hash_columns([(c, _column(batches, c)) for c in columns], spec["categorical"], int(spec["hash_bits"]))
        X.n_cols = meta["n_features"]
    else:
        X = np.column_stack([_column(batches, c).astype(np.float64) for c in columns])
    out = apps_predict.evaluate_rows(pred, apps_predict.Rows(X, None)).outputs
    task = meta.get("task")
    if task == "regression":
        return {"prediction": pa.array(out, pa.float64())}
    classes = class_values(meta["classes"])
    result = {"prediction": pa.array(classes[predicted_index(task, out)])}
    if meta.get("kind") in ("logreg", "softmax"):
        probs = np.column_stack([1 - out, out]) if out.ndim == 1 else out
        result["probability"] = pa.array(list(probs.astype(np.float64)), pa.list_(pa.float64()))
    return result


def check_columns(present: dict[str, str], wanted: tuple[str, ...], what: str) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(f"the DataFrame has no column {missing[0]!r}, which {what}")
