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

from psctl import data, net
from psctl.client import ShardClient
from psctl.errors import DataError, JobError, PsctlError
from psctl.models import get_model
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
    X: np.ndarray
    y: np.ndarray
    classes: list[str]
    mean: np.ndarray | None
    std: np.ndarray | None


def prepare(raw_X: np.ndarray, labels: np.ndarray, stats_reply: dict[str, Any], spec: dict[str, Any]) -> Prepared:
    """Standardize features and encode labels the same way on every worker."""
    classes = list(data.binary_classes(stats_reply["labels"]))
    y = data.encode_labels(labels, classes)
    mean = std = None
    X = raw_X
    if spec.get("standardize", True) and stats_reply["stats"]:
        mean, std = data.merge_stats(stats_reply["stats"])
        X = (raw_X - mean) / std
    return Prepared(X.astype(spec.get("dtype", "float32")), y.astype(spec.get("dtype", "float32")), classes, mean, std)


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}


class Worker:
    def __init__(
        self, coordinator: str, *, max_frame_bytes: int, data_path: str | None = None, security: net.Security = net.LOCAL
    ):
        self.coordinator_address = coordinator
        self.max_frame_bytes = max_frame_bytes
        self.data_path = data_path
        self.security = security
        self.control = _ControlService()

    async def run(self) -> dict[str, Any]:
        """Join the next job, train, report. Returns the final report."""
        coord = await net.connect(
            self.coordinator_address,
            self.control,
            max_frame_bytes=self.max_frame_bytes,
            what="psctl coordinator",
            security=self.security,
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
        part = data.Partition.from_dict(reg["partition"])
        path = self.data_path or spec["data"]["path"]
        if not os.path.exists(path):
            raise DataError(f"data file '{path}' does not exist on worker host {socket.gethostname()}")
        if os.path.getsize(path) != spec["data"]["size"]:
            raise DataError(f"data file '{path}' on this host differs in size from the job's ({spec['data']['size']} bytes)")
        schema = data.CsvSchema.from_dict(spec["data"]["schema"])
        raw_X, labels = await asyncio.to_thread(data.read_partition, path, schema, part)

        stats = data.partial_stats(raw_X) if len(raw_X) else None
        distinct = sorted(set(labels.tolist()))
        reply = await coord.request(
            MsgType.STATS,
            {"stats": _jsonable(stats) if stats else None, "labels": distinct},
            timeout_s=None,
        )
        prep = prepare(raw_X, labels, reply.body, spec)
        model = get_model(spec["model"])
        self._check_abort()

        client = await ShardClient.connect(
            reg["shards"],
            reg["ranges"],
            reg["job_id"],
            {"role": "worker", "worker_id": worker_id},
            max_frame_bytes=self.max_frame_bytes,
            security=self.security,
        )
        try:
            await self._train(coord, client, model, prep, spec, worker_id)
            await client.leave()
            await coord.request(MsgType.TRAINED, {}, timeout_s=None)
            self._check_abort()
            w = (await client.pull(["w"]))["w"]
            n = len(prep.y)
            report = {
                "loss_sum": float(model.loss_grad(w, prep.X, prep.y, 0.0)[0]) * n if n else 0.0,
                "correct": int(model.correct(w, prep.X, prep.y)) if n else 0,
                "n": n,
                "bytes_pulled": client.bytes_pulled,
                "bytes_pushed": client.bytes_pushed,
            }
            coord.notify(MsgType.FINAL_REPORT, report)
            return report
        finally:
            client.close()

    async def _train(self, coord: net.Peer, client: ShardClient, model: Any, prep: Prepared, spec: dict[str, Any], worker_id: int) -> None:
        epochs, batch_size = int(spec["epochs"]), int(spec["batch_size"])
        l2, seed = float(spec.get("l2", 0.0)), int(spec.get("seed", 0))
        n_rows = len(prep.y)
        clock = 0
        acks: list[asyncio.Future[Any]] = []
        last_progress = time.monotonic()
        recent_loss, recent_n = 0.0, 0
        for epoch in range(epochs):
            loss_sum, correct = 0.0, 0
            for idx in batch_indices(n_rows, batch_size, seed, worker_id, epoch):
                self._check_abort()
                X, y = prep.X[idx], prep.y[idx]
                # The pull goes out behind the previous push on each connection,
                # so it sees that push; its ack is collected afterwards.
                w = (await client.pull(["w"], clock))["w"]
                await client.wait_all(acks)
                loss, grad = model.loss_grad(w, X, y, l2)
                acks = client.push_nowait({"w": grad}, clock, len(idx))
                clock += 1
                loss_sum += float(loss) * len(idx)
                correct += int(model.correct(w, X, y))
                recent_loss += float(loss) * len(idx)
                recent_n += len(idx)
                now = time.monotonic()
                if now - last_progress >= PROGRESS_INTERVAL_S:
                    coord.notify(
                        MsgType.PROGRESS,
                        {"epoch": epoch, "clock": clock, "samples": recent_n, "loss_sum": recent_loss},
                    )
                    recent_loss, recent_n, last_progress = 0.0, 0, now
            coord.notify(MsgType.EPOCH_REPORT, {"epoch": epoch, "loss_sum": loss_sum, "correct": correct, "n": n_rows})
        await client.wait_all(acks)
        if recent_n:
            coord.notify(MsgType.PROGRESS, {"epoch": epochs - 1, "clock": clock, "samples": recent_n, "loss_sum": recent_loss})
