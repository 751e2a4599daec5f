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

from psctl import data, modelfile, net, ratings, vocab
from psctl.client import ShardClient
from psctl.consistency import staleness_for
from psctl.errors import DataError, JobError, PsctlError
from psctl.launch import LocalCluster
from psctl.models.base import Model, classes_for, model_class, summarize
from psctl.wire import DEFAULT_MAX_FRAME_BYTES, Message, MsgType
from psctl.worker import epoch_steps

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
    model_params: dict[str, Any] = field(default_factory=dict)  # model-specific, e.g. linreg's loss
    lr_decay: float = 0.0
    # ratings data (mf): the id and rating columns, names or 0-based indices
    user_col: str = "userId"
    item_col: str = "movieId"
    rating_col: str = "rating"
    out: str = "model.npz"
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES

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
        if self.lr_decay < 0:
            raise PsctlError("--lr-decay must not be negative")
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
            self.events.put_nowait(vocab.attach(msg.body, msg.arrays))
            return None
        return super().handle(peer, msg)

    def peer_lost(self, peer: net.Peer, exc: BaseException | None) -> None:
        self.events.put_nowait(None)


def build_spec(
    cfg: TrainConfig, schema: data.CsvSchema, partitions: list[data.Partition], data_format: str = "csv"
) -> dict[str, Any]:
    """The job as the coordinator and workers see it (JSON). Tables come after the statistics pass."""
    return {
        "model": cfg.model,
        "model_params": cfg.model_params,
        "n_workers": cfg.workers,
        "n_features": len(schema.feature_indices),
        "mode": cfg.mode,
        "staleness": cfg.staleness,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "l2": cfg.l2,
        "seed": cfg.seed,
        "standardize": cfg.standardize,
        "optimizer": {"name": "sgd", "params": {"lr": cfg.lr, "lr_decay": cfg.lr_decay}},
        "min_shards": cfg.shards if cfg.server is None else 1,
        "data": {
            "path": os.path.abspath(cfg.data),
            "size": os.path.getsize(cfg.data),
            "schema": schema.to_dict(),
            "format": data_format,
        },
        "partitions": [p.to_dict() for p in partitions],
    }


class _Session:
    """What the driver learns while a job runs: the statistics, the model, where its tables live."""

    def __init__(self, cfg: TrainConfig, model_cls: type[Model], n_features: int, peer: net.Peer):
        self.cfg, self.model_cls, self.n_features, self.peer = cfg, model_cls, n_features, peer
        self.stats: dict[str, Any] | None = None
        self.model: Model | None = None
        self.placed: dict[str, Any] | None = None  # TABLES reply: shards and ranges
        self.data_params: dict[str, Any] = {}  # what the model took from the statistics pass

    def make_model(self, classes: list[str]) -> Model:
        return self.model_cls(self.n_features, classes, l2=self.cfg.l2, **self.cfg.model_params, **self.data_params)

    async def on_stats(self, event: dict[str, Any]) -> None:
        """Labels are known: name the classes, size the tables, have the shards create them."""
        self.stats = event
        classes = classes_for(self.model_cls.task, event["labels"], self.model_cls.kind)
        self.data_params = self.model_cls.data_params(event)
        self.model = self.make_model(classes)
        tables = [t.to_dict() for t in self.model.tables()]
        self.placed = (await self.peer.request(MsgType.TABLES, {"tables": tables}, timeout_s=SUBMIT_TIMEOUT_S)).body

    def with_metrics(self, event: dict[str, Any]) -> dict[str, Any]:
        if "sums" in event:
            return {**event, "metrics": summarize(self.model_cls.task, event["sums"], event["samples"])}
        return event


async def train(cfg: TrainConfig, on_event: Callable[[dict[str, Any]], None] = lambda e: None) -> TrainResult:
    """Run one training job end to end and write the model file."""
    cfg.validate()
    check_out_path(cfg.out)
    model_cls = model_class(cfg.model)
    schema = read_schema(cfg, model_cls)
    model_cls(len(schema.feature_indices), ["0", "1"], l2=cfg.l2, **cfg.model_params)  # bad parameters fail here, not on the cluster
    partitions = await asyncio.to_thread(data.plan_partitions, cfg.data, cfg.workers, cfg.has_header)
    spec = build_spec(cfg, schema, partitions, model_cls.data_format)
    steps = cfg.epochs * steps_per_job_epoch(partitions, cfg.batch_size)
    on_event(
        {"kind": "planned", "rows": sum(p.n_rows for p in partitions), "features": spec["n_features"],
         "workers": cfg.workers, "steps": steps}
    )
    started = time.monotonic()
    async with LocalCluster(max_frame_bytes=cfg.max_frame_bytes) as cluster:
        if cfg.server is None:
            coordinator = await cluster.start_coordinator()
            shards_up = asyncio.ensure_future(cluster.start_shards(cfg.shards, coordinator))
        else:
            coordinator = cfg.server
            shards_up = None
        driver_service = _DriverService()
        peer = await net.connect(coordinator, driver_service, max_frame_bytes=cfg.max_frame_bytes, what="psctl server")
        session = _Session(cfg, model_cls, spec["n_features"], peer)
        try:
            n_local = cfg.workers if cfg.local_workers is None else cfg.local_workers
            await cluster.start_workers(n_local, coordinator)
            if shards_up is not None:
                await shards_up
            on_event({"kind": "cluster_up", "seconds": time.monotonic() - started, "address": coordinator})
            reply = await peer.request(MsgType.SUBMIT, {"spec": spec}, timeout_s=SUBMIT_TIMEOUT_S)
            job_id = reply.body["job_id"]
            on_event({"kind": "submitted", "job_id": job_id, "shards": reply.body["shards"]})
            events, done = await _follow(cluster, driver_service, session, on_event)
            assert session.placed is not None and session.model is not None
            params = await _final_pull(session.placed, job_id, cfg.max_frame_bytes)
            peer.notify(MsgType.JOB_END, {"job_id": job_id})
        finally:
            peer.close()
    meta = _model_meta(cfg, schema, session, done, time.monotonic() - started)
    meta["metrics"]["traffic"] = traffic_per_epoch(session.model, partitions, cfg, done)
    kinds, arrays = vocab_file_parts(session.stats)
    if kinds:
        meta["vocab"] = kinds
    params.update(arrays)
    modelfile.save_model(cfg.out, params, meta)
    return TrainResult(cfg.out, meta["metrics"], meta, events)


async def _follow(
    cluster: LocalCluster, service: _DriverService, session: _Session, on_event: Callable[[dict[str, Any]], None]
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
                if event["kind"] == "stats":
                    await session.on_stats(event)
                event = session.with_metrics(event)
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


async def _final_pull(submitted: dict[str, Any], job_id: str, max_frame_bytes: int) -> dict[str, np.ndarray]:
    ranges = submitted["ranges"]
    client = await ShardClient.connect(submitted["shards"], ranges, job_id, {"role": "driver"}, max_frame_bytes=max_frame_bytes)
    try:
        return await client.pull(list(ranges))
    finally:
        client.close()


def _model_meta(cfg: TrainConfig, schema: data.CsvSchema, session: _Session, done: dict[str, Any], seconds: float) -> dict[str, Any]:
    assert session.model is not None and session.stats is not None
    meta: dict[str, Any] = {
        "kind": cfg.model,
        "task": session.model_cls.task,
        "data_format": session.model_cls.data_format,
        "model_params": {**cfg.model_params, **session.data_params},
        "schema": schema.to_dict(),
        "feature_names": list(schema.feature_names),
        "label": schema.columns[schema.label_index] if schema.label_index is not None else None,
        "classes": session.model.classes,
        "standardize": None,
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("out", "max_frame_bytes", "local_workers")},
        "metrics": {
            "train_loss": done["loss"],
            **{f"train_{k}": v for k, v in done["metrics"].items()},
            "samples": done["samples"],
            "lost_workers": done["lost_workers"],
            "bytes_pulled": done.get("bytes_pulled", 0),
            "bytes_pushed": done.get("bytes_pushed", 0),
            "seconds": seconds,
        },
    }
    if session.model_cls.data_format == "csv" and cfg.standardize and session.stats["stats"]:
        mean, std = data.merge_stats(session.stats["stats"])
        meta["standardize"] = {"mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist()}
    return meta


def steps_per_job_epoch(partitions: list[data.Partition], batch_size: int) -> int:
    """Steps (pushes) of all workers together in one epoch."""
    largest = max(p.n_rows for p in partitions)
    return sum(epoch_steps(p.n_rows, batch_size, largest) for p in partitions)


def read_schema(cfg: TrainConfig, model_cls: type[Model]) -> data.CsvSchema:
    """The columns a job reads, in its model's data format."""
    if model_cls.data_format == "ratings":
        if cfg.label is not None or cfg.drop:
            raise PsctlError(f"{model_cls.kind} reads --user-col, --item-col and --rating-col; --label and --drop are for feature CSVs")
        return ratings.read_schema(cfg.data, cfg.user_col, cfg.item_col, cfg.rating_col, cfg.has_header)
    return data.read_schema(cfg.data, cfg.label, cfg.drop, cfg.has_header)


def traffic_per_epoch(model: Model, partitions: list[data.Partition], cfg: TrainConfig, done: dict[str, Any]) -> dict[str, float]:
    """Bytes pulled and pushed per epoch (all workers), and what pulling whole tables
    at every step would cost. Pulled bytes count parameter values received;
    pushed bytes count keys and gradient values sent."""
    steps = steps_per_job_epoch(partitions, cfg.batch_size)
    table_bytes = sum(t.rows * t.dim * np.dtype(t.dtype).itemsize for t in model.tables())
    return {
        "pulled_per_epoch": done.get("bytes_pulled", 0) / cfg.epochs,
        "pushed_per_epoch": done.get("bytes_pushed", 0) / cfg.epochs,
        "dense_per_epoch": float(steps * table_bytes),
        "steps_per_epoch": steps,
    }


def vocab_file_parts(stats: dict[str, Any] | None) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The id vocabularies for the model file: their kinds (meta ``vocab``) and
    their arrays (``vocab_<name>``: int64 ids or a UTF-8 text blob)."""
    vocabs: dict[str, vocab.Vocab] = (stats or {}).get("vocab", {})
    return {n: v.kind for n, v in vocabs.items()}, {f"vocab_{n}": v.to_array() for n, v in vocabs.items()}


def check_out_path(out: str) -> None:
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise DataError(f"cannot write the model to '{out}': folder '{parent}' does not exist")
