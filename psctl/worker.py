"""A worker: one data partition, a model's gradient, its own clock.

Flow: register with the coordinator, read the partition, take part in the
statistics pass, then per mini-batch pull -> gradient -> push (clock + 1),
leave the shards, wait for the others, evaluate the final model on the
partition and report.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from psctl import data, net, ratings, vocab
from psctl.client import ShardClient
from psctl.errors import DataError, JobError, PsctlError
from psctl.models.base import Model, batch_sums, classes_for, encode_targets, model_class
from psctl.wire import Message, MsgType

log = logging.getLogger("psctl.worker")

PROGRESS_INTERVAL_S = 0.25


def batch_indices(
    n_rows: int, batch_size: int, seed: int, worker_id: int, epoch: int, max_rows: int | None = None
) -> Iterator[np.ndarray]:
    """Row indices of each mini-batch of one epoch: a seeded shuffle cut into
    :func:`epoch_steps` batches of near-equal size (at most ``batch_size``).

    ``max_rows`` is the row count of the job's largest partition: every worker
    then takes the same number of steps per epoch, so no clock has only a few
    workers training (which in sync mode would scale up the step of every
    row those few touch) and no batch is a small remainder.
    """
    order = np.random.default_rng([seed, worker_id, epoch]).permutation(n_rows)
    for part in np.array_split(order, epoch_steps(n_rows, batch_size, max_rows)) if n_rows else ():
        yield part


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return -(-n_rows // batch_size)


def epoch_steps(n_rows: int, batch_size: int, max_rows: int | None = None) -> int:
    """Steps per epoch of a partition of ``n_rows``: those of the largest partition
    (``max_rows``, default this one) at ``batch_size``, but never empty batches."""
    return min(n_rows, steps_per_epoch(max(n_rows, max_rows or 0), batch_size))


def max_partition_rows(spec: dict[str, Any]) -> int:
    return max((int(p.get("n_rows", 0)) for p in spec["partitions"]), default=0)


class _ControlService(net.NullService):
    """Receives the coordinator's events (abort) on the worker's control connection."""

    def __init__(self) -> None:
        self.abort_reason: str | None = None

    def handle(self, peer: net.Peer, msg: Message) -> net.Reply:
        if msg.type is MsgType.EVENT and msg.body.get("kind") == "abort":
            self.abort_reason = str(msg.body.get("reason", "the job was aborted"))
            return None
        return super().handle(peer, msg)

    def peer_lost(self, peer: net.Peer, exc: BaseException | None) -> None:
        if self.abort_reason is None:
            self.abort_reason = "the coordinator went away"


@dataclass
class Prepared:
    """A worker's rows, ready for the model: features scaled, labels encoded."""

    X: Any
    y: np.ndarray
    classes: list[str]


def load_partition(spec: dict[str, Any], path: str, part: data.Partition) -> tuple[Any, np.ndarray]:
    """Features and raw labels of one partition, in the job's data format."""
    schema = data.CsvSchema.from_dict(spec["data"]["schema"])
    if spec["data"].get("format", "csv") == "ratings":
        return ratings.read_partition(path, schema, part)
    return data.read_partition(path, schema, part)


def stats_request(raw_X: Any, labels: np.ndarray, spec: dict[str, Any], model_cls: type[Model]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """This worker's part of the statistics pass: partial column statistics, distinct
    labels, and (ratings) the distinct user and item ids; body and arrays of STATS."""
    if spec["data"].get("format", "csv") == "ratings":
        return ratings.stats_request(raw_X, labels)
    dense = spec["data"].get("format", "csv") == "csv"
    stats = data.partial_stats(raw_X) if dense and len(raw_X) and spec.get("standardize", True) else None
    distinct = sorted(set(labels.tolist())) if model_cls.task != "regression" else []
    return {"stats": _jsonable(stats) if stats else None, "labels": distinct}, []


def prepare(raw_X: Any, labels: np.ndarray, stats_reply: dict[str, Any], spec: dict[str, Any], model_cls: type[Model]) -> Prepared:
    """Standardize features and encode labels the same way on every worker."""
    classes = classes_for(model_cls.task, stats_reply["labels"], model_cls.kind)
    y = encode_targets(model_cls.task, labels, classes)
    X = raw_X
    if spec["data"].get("format", "csv") == "ratings":  # ids -> table rows
        X = ratings.encode_rows(raw_X, stats_reply["vocab"])
        if (X < 0).any():
            raise JobError("an id of this worker's partition is missing from the job's vocabulary")
    elif spec["data"].get("format", "csv") == "csv":  # dense numeric features: scaled, float32
        if spec.get("standardize", True) and stats_reply["stats"]:
            mean, std = data.merge_stats(stats_reply["stats"])
            X = (raw_X - mean) / std
        X = X.astype(np.float32)
    if model_cls.task != "classes":
        y = y.astype(np.float32)
    return Prepared(X, y, classes)


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}


def _add(total: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v


class Worker:
    def __init__(self, coordinator: str, *, max_frame_bytes: int, data_path: str | None = None):
        self.coordinator_address = coordinator
        self.max_frame_bytes = max_frame_bytes
        self.data_path = data_path
        self.control = _ControlService()

    async def run(self) -> dict[str, Any]:
        """Join the next job, train, report. Returns the final report."""
        coord = await net.connect(
            self.coordinator_address, self.control, max_frame_bytes=self.max_frame_bytes, what="psctl coordinator"
        )
        try:
            reg = await coord.request(
                MsgType.REGISTER_WORKER, {"pid": os.getpid(), "host": socket.gethostname()}, timeout_s=None
            )
            try:
                return await self._job(coord, reg.body)
            except PsctlError as exc:
                if coord.is_open and not isinstance(exc, net.ConnectionLost | JobError):
                    coord.notify(MsgType.FAILED, {"message": str(exc)})
                raise
        finally:
            coord.close()

    def _check_abort(self) -> None:
        if self.control.abort_reason is not None:
            raise JobError(f"job stopped: {self.control.abort_reason}")

    async def _job(self, coord: net.Peer, reg: dict[str, Any]) -> dict[str, Any]:
        spec = reg["spec"]
        worker_id = int(reg["worker_id"])
        model_cls = model_class(spec["model"])
        part = data.Partition.from_dict(reg["partition"])
        path = self.data_path or spec["data"]["path"]
        if not os.path.exists(path):
            raise DataError(f"data file '{path}' does not exist on worker host {socket.gethostname()}")
        if os.path.getsize(path) != spec["data"]["size"]:
            raise DataError(f"data file '{path}' on this host differs in size from the job's ({spec['data']['size']} bytes)")
        raw_X, labels = await asyncio.to_thread(load_partition, spec, path, part)

        body, arrays = await asyncio.to_thread(stats_request, raw_X, labels, spec, model_cls)
        reply = await coord.request(MsgType.STATS, body, arrays, timeout_s=None)
        self._check_abort()
        stats = await asyncio.to_thread(vocab.attach, reply.body, reply.arrays)
        prep = prepare(raw_X, labels, stats, spec, model_cls)
        model = model_cls(
            spec["n_features"],
            prep.classes,
            l2=float(spec.get("l2", 0.0)),
            **spec.get("model_params", {}),
            **model_cls.data_params(stats),
        )

        client = await ShardClient.connect(
            reply.body["shards"],
            reply.body["ranges"],
            reg["job_id"],
            {"role": "worker", "worker_id": worker_id},
            max_frame_bytes=self.max_frame_bytes,
        )
        try:
            await self._train(coord, client, model, prep, spec, worker_id)
            trained_bytes = {"bytes_pulled": client.bytes_pulled, "bytes_pushed": client.bytes_pushed}
            await client.leave()
            await coord.request(MsgType.TRAINED, {}, timeout_s=None)
            self._check_abort()
            report: dict[str, Any] = {"loss_sum": 0.0, "sums": {}, "n": len(prep.y)}
            if len(prep.y):
                keys = model.keys(prep.X)
                params = await client.pull_for(keys)
                loss, _, outputs = model.loss_grad(params, prep.X, prep.y)
                report.update(loss_sum=float(loss) * len(prep.y), sums=batch_sums(model.task, outputs, prep.y))
            report.update(trained_bytes)  # training traffic only, not the evaluation pull
            coord.notify(MsgType.FINAL_REPORT, report)
            return report
        finally:
            client.close()

    async def _train(
        self, coord: net.Peer, client: ShardClient, model: Model, prep: Prepared, spec: dict[str, Any], worker_id: int
    ) -> None:
        epochs, batch_size, seed = int(spec["epochs"]), int(spec["batch_size"]), int(spec.get("seed", 0))
        n_rows = len(prep.y)
        clock = 0
        acks: list[asyncio.Future[Any]] = []
        last_progress = time.monotonic()
        recent_loss, recent_n = 0.0, 0
        for epoch in range(epochs):
            loss_sum, sums = 0.0, {}
            for idx in batch_indices(n_rows, batch_size, seed, worker_id, epoch, max_partition_rows(spec)):
                self._check_abort()
                X, y = prep.X[idx], prep.y[idx]
                keys = model.keys(X)
                # The pull goes out behind the previous push on each connection,
                # so it sees that push; its ack is collected afterwards.
                params = await client.pull_for(keys, clock)
                await client.wait_all(acks)
                loss, grads, outputs = model.loss_grad(params, X, y)
                figures = batch_sums(model.task, outputs, y)
                if not all(map(math.isfinite, (float(loss) * len(idx), *figures.values()))):
                    # Pushing would spread inf/NaN to the tables; the reports could not carry it either.
                    raise PsctlError(f"the loss overflowed in epoch {epoch + 1}: training diverged; try a smaller --lr")
                acks = client.push_for_nowait(keys, grads, clock, len(idx))
                clock += 1
                loss_sum += float(loss) * len(idx)
                _add(sums, figures)
                recent_loss += float(loss) * len(idx)
                recent_n += len(idx)
                now = time.monotonic()
                if now - last_progress >= PROGRESS_INTERVAL_S:
                    coord.notify(
                        MsgType.PROGRESS,
                        {"epoch": epoch, "clock": clock, "samples": recent_n, "loss_sum": recent_loss},
                    )
                    recent_loss, recent_n, last_progress = 0.0, 0, now
            coord.notify(MsgType.EPOCH_REPORT, {"epoch": epoch, "loss_sum": loss_sum, "sums": sums, "n": n_rows})
        await client.wait_all(acks)
        if recent_n:
            coord.notify(MsgType.PROGRESS, {"epoch": epochs - 1, "clock": clock, "samples": recent_n, "loss_sum": recent_loss})
