"""A worker: one data partition, a model's gradient, its own clock.

Flow: register with the coordinator, read the partition, take part in the
statistics pass, then per mini-batch pull -> gradient -> push (clock + 1),
leave the shards, wait for the others, evaluate the final model on the
partition and report.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from psctl import data, formats, net
from psctl.client import ShardClient
from psctl.errors import DataError, JobError, PsctlError
from psctl.models.base import Model, batch_sums, classes_for, encode_targets, model_class
from psctl.wire import Message, MsgType

log = logging.getLogger("psctl.worker")

PROGRESS_INTERVAL_S = 0.25


def batch_indices(n_rows: int, batch_size: int, seed: int, worker_id: int, epoch: int) -> Iterator[np.ndarray]:
    """Row indices of each mini-batch of one epoch: a seeded shuffle, then slices."""
    order = np.random.default_rng([seed, worker_id, epoch]).permutation(n_rows)
    for start in range(0, n_rows, batch_size):
        yield order[start : start + batch_size]


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return -(-n_rows // batch_size)


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
    n_features: int


def load_partition(spec: dict[str, Any], path: str, part: data.Partition) -> tuple[Any, np.ndarray]:
    """Features and raw labels of one partition, in the job's data format."""
    if spec["data"].get("format", "csv") in formats.SPARSE_FORMATS:
        return formats.read_partition(spec["data"], path, part)
    schema = data.CsvSchema.from_dict(spec["data"]["schema"])
    return data.read_partition(path, schema, part)


def prepare(raw_X: Any, labels: np.ndarray, stats_reply: dict[str, Any], spec: dict[str, Any], model_cls: type[Model]) -> Prepared:
    """Standardize features and encode labels the same way on every worker."""
    classes = classes_for(model_cls.task, stats_reply["labels"], model_cls.kind)
    y = encode_targets(model_cls.task, labels, classes)
    X = raw_X
    n_features = spec["n_features"]
    if spec["data"].get("format", "csv") == "csv":  # dense numeric features: scaled, float32
        if spec.get("standardize", True) and stats_reply["stats"]:
            mean, std = data.merge_stats(stats_reply["stats"])
            X = (raw_X - mean) / std
        X = X.astype(np.float32)
    else:  # sparse rows over model keys; LIBSVM's feature count comes from the statistics
        X = formats.to_keys(spec["data"], raw_X, stats_reply["stats"])
        n_features = X.n_cols
    if model_cls.task != "classes":
        y = y.astype(np.float32)
    return Prepared(X, y, classes, n_features)


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

        dense = spec["data"].get("format", "csv") == "csv"
        if dense:
            stats = data.partial_stats(raw_X) if len(raw_X) and spec.get("standardize", True) else None
        else:
            stats = formats.partial_stats(spec["data"], raw_X)
        distinct = sorted(set(labels.tolist())) if model_cls.task != "regression" else []
        reply = await coord.request(
            MsgType.STATS, {"stats": _jsonable(stats) if stats else None, "labels": distinct}, timeout_s=None
        )
        self._check_abort()
        prep = prepare(raw_X, labels, reply.body, spec, model_cls)
        model = model_cls(prep.n_features, prep.classes, l2=float(spec.get("l2", 0.0)), **spec.get("model_params", {}))

        client = await ShardClient.connect(
            reply.body["shards"],
            reply.body["ranges"],
            reg["job_id"],
            {"role": "worker", "worker_id": worker_id},
            max_frame_bytes=self.max_frame_bytes,
            hashed=[t.name for t in model.tables() if t.sparse],
        )
        try:
            await self._train(coord, client, model, prep, spec, worker_id)
            await client.leave()
            await coord.request(MsgType.TRAINED, {}, timeout_s=None)
            self._check_abort()
            # Traffic of training only: the evaluation pull below is not part of any epoch.
            report: dict[str, Any] = {"loss_sum": 0.0, "sums": {}, "n": len(prep.y)}
            report.update(bytes_pulled=client.bytes_pulled, bytes_pushed=client.bytes_pushed)
            if len(prep.y):
                keys = model.keys(prep.X)
                params = await client.pull_for(keys)
                loss, _, outputs = model.loss_grad(params, prep.X, prep.y)
                report.update(loss_sum=float(loss) * len(prep.y), sums=batch_sums(model.task, outputs, prep.y))
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
            for idx in batch_indices(n_rows, batch_size, seed, worker_id, epoch):
                self._check_abort()
                X, y = prep.X[idx], prep.y[idx]
                keys = model.keys(X)
                # The pull goes out behind the previous push on each connection,
                # so it sees that push; its ack is collected afterwards.
                params = await client.pull_for(keys, clock)
                await client.wait_all(acks)
                loss, grads, outputs = model.loss_grad(params, X, y)
                acks = client.push_for_nowait(keys, grads, clock, len(idx))
                clock += 1
                loss_sum += float(loss) * len(idx)
                _add(sums, batch_sums(model.task, outputs, y))
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
