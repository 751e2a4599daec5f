"""The driver behind ``psctl train``: plan, start or join a cluster, submit, follow, save.

It returns data and calls ``on_event`` with plain dicts; rendering is the CLI's job.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psctl import data, modelfile, net
from psctl.client import ShardClient
from psctl.consistency import staleness_for
from psctl.errors import DataError, JobError, PsctlError
from psctl.launch import LocalCluster
from psctl.models import get_model
from psctl.tables import TableSpec
from psctl.wire import DEFAULT_MAX_FRAME_BYTES, Message, MsgType
from psctl.worker import steps_per_epoch

SUBMIT_TIMEOUT_S = 60.0
FAILED_EVENT_GRACE_S = 2.0


@dataclass
class TrainConfig:
    model: str
    data: str
    workers: int = 8
    shards: int = 2
    server: str | None = None
    local_workers: int | None = None  # with --server: how many of the workers to start here
    mode: str = "sync"
    staleness: int = 0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.1
    l2: float = 0.0
    seed: int = 0
    label: str | None = None
    drop: tuple[str, ...] = ()
    has_header: bool = True
    standardize: bool = True
    out: str = "model.npz"
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    security: net.Security = net.LOCAL  # never written to the model file

    def validate(self) -> None:
        if self.workers < 1:
            raise PsctlError("--workers must be at least 1")
        if self.shards < 1:
            raise PsctlError("--shards must be at least 1")
        if self.epochs < 1 or self.batch_size < 1:
            raise PsctlError("--epochs and --batch-size must be at least 1")
        if not self.lr > 0:
            raise PsctlError("--lr must be positive")
        if self.l2 < 0:
            raise PsctlError("--l2 must not be negative")
        if self.local_workers is not None and not 0 <= self.local_workers <= self.workers:
            raise PsctlError("--local-workers must be between 0 and --workers")
        try:
            staleness_for(self.mode, self.staleness)
        except ValueError as exc:
            raise PsctlError(f"{exc}") from None


@dataclass
class TrainResult:
    model_path: str
    metrics: dict[str, Any]
    meta: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)


class _DriverService(net.NullService):
    def __init__(self) -> None:
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def handle(self, peer: net.Peer, msg: Message) -> net.Reply:
        if msg.type is MsgType.EVENT:
            self.events.put_nowait(msg.body)
            return None
        return super().handle(peer, msg)

    def peer_lost(self, peer: net.Peer, exc: BaseException | None) -> None:
        self.events.put_nowait(None)


def build_spec(cfg: TrainConfig, schema: data.CsvSchema, partitions: list[data.Partition]) -> dict[str, Any]:
    """The job as the coordinator and workers see it (JSON)."""
    model = get_model(cfg.model)
    n_features = len(schema.feature_indices)
    tables = [TableSpec(name, rows).to_dict() for name, rows in model.table_sizes(n_features).items()]
    return {
        "model": cfg.model,
        "n_workers": cfg.workers,
        "n_features": n_features,
        "tables": tables,
        "mode": cfg.mode,
        "staleness": cfg.staleness,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "l2": cfg.l2,
        "seed": cfg.seed,
        "standardize": cfg.standardize,
        "optimizer": {"name": "sgd", "params": {"lr": cfg.lr}},
        "min_shards": cfg.shards if cfg.server is None else 1,
        "data": {"path": os.path.abspath(cfg.data), "size": os.path.getsize(cfg.data), "schema": schema.to_dict()},
        "partitions": [p.to_dict() for p in partitions],
    }


async def train(cfg: TrainConfig, on_event: Callable[[dict[str, Any]], None] = lambda e: None) -> TrainResult:
    """Run one training job end to end and write the model file."""
    cfg.validate()
    check_out_path(cfg.out)
    schema = data.read_schema(cfg.data, cfg.label, cfg.drop, cfg.has_header)
    partitions = await asyncio.to_thread(data.plan_partitions, cfg.data, cfg.workers, cfg.has_header)
    spec = build_spec(cfg, schema, partitions)
    steps = cfg.epochs * sum(steps_per_epoch(p.n_rows, cfg.batch_size) for p in partitions)
    on_event(
        {"kind": "planned", "rows": sum(p.n_rows for p in partitions), "features": spec["n_features"],
         "workers": cfg.workers, "steps": steps}
    )
    started = time.monotonic()
    async with LocalCluster(max_frame_bytes=cfg.max_frame_bytes, security=cfg.security) as cluster:
        if cfg.server is None:
            coordinator = await cluster.start_coordinator()
            shards_up = asyncio.ensure_future(cluster.start_shards(cfg.shards, coordinator))
        else:
            coordinator = cfg.server
            shards_up = None
        driver_service = _DriverService()
        peer = await net.connect(
            coordinator, driver_service, max_frame_bytes=cfg.max_frame_bytes, what="psctl server", security=cfg.security
        )
        try:
            n_local = cfg.workers if cfg.local_workers is None else cfg.local_workers
            await cluster.start_workers(n_local, coordinator)
            if shards_up is not None:
                await shards_up
            on_event({"kind": "cluster_up", "seconds": time.monotonic() - started, "address": coordinator})
            reply = await peer.request(MsgType.SUBMIT, {"spec": spec}, timeout_s=SUBMIT_TIMEOUT_S)
            job_id = reply.body["job_id"]
            on_event({"kind": "submitted", "job_id": job_id, "shards": reply.body["shards"]})
            events, done = await _follow(cluster, driver_service, on_event)
            stats = next(e for e in events if e["kind"] == "stats")
            params = await _final_pull(reply.body, job_id, cfg.max_frame_bytes, cfg.security)
            peer.notify(MsgType.JOB_END, {"job_id": job_id})
        finally:
            peer.close()
    meta = _model_meta(cfg, schema, stats, done, time.monotonic() - started)
    modelfile.save_model(cfg.out, params, meta)
    return TrainResult(cfg.out, meta["metrics"], meta, events)


async def _follow(
    cluster: LocalCluster, service: _DriverService, on_event: Callable[[dict[str, Any]], None]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Relay events until the job is done or failed.

    A local worker process that dies is fine once the coordinator reports it
    lost (the job goes on without it); one that dies unexplained (say, before it
    ever registered) fails the job after a short grace, instead of a hang.
    """
    events: list[dict[str, Any]] = []
    exits = {asyncio.ensure_future(c.proc.wait()): c for c in cluster.workers()}
    dead: list[Any] = []
    lost = 0
    deadline: float | None = None
    get: asyncio.Future[dict[str, Any] | None] | None = None
    try:
        while True:
            get = get or asyncio.ensure_future(service.events.get())
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            await asyncio.wait({get, *exits}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for fut in [f for f in exits if f.done()]:
                child = exits.pop(fut)
                if fut.result() != 0:
                    dead.append(child)
                    deadline = deadline or time.monotonic() + FAILED_EVENT_GRACE_S
            if get.done():
                event, get = get.result(), None
                if event is None:
                    raise JobError("lost the connection to the psctl server")
                lost += event["kind"] == "worker_lost"
                if event["kind"] != "progress":
                    events.append(event)
                on_event(event)
                if event["kind"] == "failed":
                    raise JobError(f"training failed: {event['reason']}")
                if event["kind"] == "done":
                    return events, event
            if len(dead) <= lost:
                deadline = None
            elif deadline is not None and time.monotonic() >= deadline:
                child = dead[lost]
                last = child.log_tail().splitlines()[-1:] or ["no output"]
                raise JobError(f"worker process {child.index} exited before the job finished: {last[0]}")
    finally:
        for fut in exits:
            fut.cancel()
        if get is not None:
            get.cancel()


async def _final_pull(
    submitted: dict[str, Any], job_id: str, max_frame_bytes: int, security: net.Security
) -> dict[str, np.ndarray]:
    ranges = submitted["ranges"]
    client = await ShardClient.connect(
        submitted["shards"], ranges, job_id, {"role": "driver"}, max_frame_bytes=max_frame_bytes, security=security
    )
    try:
        return await client.pull(list(ranges))
    finally:
        client.close()


def _model_meta(
    cfg: TrainConfig, schema: data.CsvSchema, stats: dict[str, Any], done: dict[str, Any], seconds: float
) -> dict[str, Any]:
    classes = list(data.binary_classes(stats["labels"]))
    meta: dict[str, Any] = {
        "kind": cfg.model,
        "schema": schema.to_dict(),
        "feature_names": list(schema.feature_names),
        "label": schema.columns[schema.label_index] if schema.label_index is not None else None,
        "classes": classes,
        "standardize": None,
        "training": {
            k: v for k, v in asdict(cfg).items() if k not in ("out", "max_frame_bytes", "local_workers", "security")
        },
        "metrics": {
            "train_loss": done["loss"],
            "train_accuracy": done["accuracy"],
            "samples": done["samples"],
            "lost_workers": done["lost_workers"],
            "seconds": seconds,
        },
    }
    if cfg.standardize and stats["stats"]:
        mean, std = data.merge_stats(stats["stats"])
        meta["standardize"] = {"mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist()}
    return meta


def check_out_path(out: str) -> None:
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise DataError(f"cannot write the model to '{out}': folder '{parent}' does not exist")
