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

from psctl import data, formats, modelfile, net
from psctl.client import ShardClient
from psctl.consistency import staleness_for
from psctl.errors import DataError, JobError, PsctlError
from psctl.launch import LocalCluster
from psctl.models.base import Model, classes_for, model_class, summarize
from psctl.optim import OPTIMIZERS
from psctl.tables import TableSpec
from psctl.wire import DEFAULT_MAX_FRAME_BYTES, Message, MsgType
from psctl.worker import steps_per_epoch

SUBMIT_TIMEOUT_S = 60.0
# Step sizes that work for standardized or 0/1 features (FTRL's is its alpha; 0.3 on a9a: README).
DEFAULT_LR = {"sgd": 0.1, "adagrad": 0.1, "adam": 0.01, "ftrl": 0.3}
FAILED_EVENT_GRACE_S = 2.0
FINAL_PULL_TIMEOUT_S = 600.0  # a sparse table of millions of keys takes seconds to gather


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
    lr: float | None = None  # None: the optimizer's DEFAULT_LR
    l2: float = 0.0
    seed: int = 0
    label: str | None = None
    drop: tuple[str, ...] = ()
    has_header: bool = True
    standardize: bool = True
    model_params: dict[str, Any] = field(default_factory=dict)  # model-specific, e.g. linreg's loss
    lr_decay: float = 0.0
    out: str = "model.npz"
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    format: str = "auto"  # csv or libsvm, detected from the file by default
    index_base: int | None = None  # libsvm: 0 or 1; None detects it
    n_features: int | None = None  # libsvm: None takes the largest index in the data
    hash_bits: int | None = None  # csv: hash --categorical columns into 2^hash_bits keys
    categorical: tuple[str, ...] = ()
    optimizer: str = "sgd"
    l1: float = 0.0  # ftrl only
    save_optimizer_state: bool = False

    def validate(self) -> None:
        if self.workers < 1:
            raise PsctlError("--workers must be at least 1")
        if self.shards < 1:
            raise PsctlError("--shards must be at least 1")
        if self.epochs < 1 or self.batch_size < 1:
            raise PsctlError("--epochs and --batch-size must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise PsctlError("--lr must be positive")
        if self.l2 < 0:
            raise PsctlError("--l2 must not be negative")
        if self.lr_decay < 0:
            raise PsctlError("--lr-decay must not be negative")
        if self.optimizer not in OPTIMIZERS:
            raise PsctlError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got '{self.optimizer}'")
        if self.lr_decay and self.optimizer != "sgd":
            raise PsctlError("--lr-decay is for --optimizer sgd; the other optimizers adapt their steps per key")
        if self.l1 < 0:
            raise PsctlError("--l1 must not be negative")
        if self.l1 and self.optimizer != "ftrl":
            raise PsctlError("--l1 needs --optimizer ftrl")
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


def optimizer_spec(cfg: TrainConfig) -> dict[str, Any]:
    """The shards' update rule. FTRL takes --l1 and --l2 itself (in its proximal step)."""
    params: dict[str, Any] = {"lr": DEFAULT_LR.get(cfg.optimizer, 0.1) if cfg.lr is None else cfg.lr}
    if cfg.optimizer == "sgd":
        params["lr_decay"] = cfg.lr_decay
    elif cfg.optimizer == "ftrl":
        params.update(l1=cfg.l1, l2=cfg.l2)
    return {"name": cfg.optimizer, "params": params}


def build_spec(cfg: TrainConfig, source: formats.Source, partitions: list[data.Partition]) -> dict[str, Any]:
    """The job as the coordinator and workers see it (JSON). Tables come after the statistics pass."""
    return {
        "model": cfg.model,
        "model_params": {**cfg.model_params, "sparse": True} if source.sparse else cfg.model_params,
        "n_workers": cfg.workers,
        "n_features": source.n_features,  # None for LIBSVM until the statistics pass
        "mode": cfg.mode,
        "staleness": cfg.staleness,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "l2": 0.0 if cfg.optimizer == "ftrl" else cfg.l2,
        "seed": cfg.seed,
        "standardize": cfg.standardize,
        "optimizer": optimizer_spec(cfg),
        "min_shards": cfg.shards if cfg.server is None else 1,
        "data": {"path": os.path.abspath(cfg.data), "size": os.path.getsize(cfg.data), **source.data},
        "partitions": [p.to_dict() for p in partitions],
    }


class _Session:
    """What the driver learns while a job runs: the statistics, the model, where its tables live."""

    def __init__(self, cfg: TrainConfig, model_cls: type[Model], spec: dict[str, Any], peer: net.Peer):
        self.cfg, self.model_cls, self.spec, self.peer = cfg, model_cls, spec, peer
        self.n_features: int | None = spec["n_features"]
        self.stats: dict[str, Any] | None = None
        self.model: Model | None = None
        self.placed: dict[str, Any] | None = None  # TABLES reply: shards and ranges

    def make_model(self, classes: list[str]) -> Model:
        assert self.n_features is not None
        return self.model_cls(self.n_features, classes, l2=self.spec["l2"], **self.spec["model_params"])

    async def on_stats(self, event: dict[str, Any]) -> None:
        """Labels are known: name the classes, size the tables, have the shards create them."""
        self.stats = event
        self.n_features = formats.n_features_of(self.spec["data"], event["stats"]) or self.n_features
        classes = classes_for(self.model_cls.task, event["labels"], self.model_cls.kind)
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
    source = formats.plan_source(
        cfg.data, cfg.format, label=cfg.label, drop=cfg.drop, has_header=cfg.has_header, index_base=cfg.index_base,
        n_features=cfg.n_features, hash_bits=cfg.hash_bits, categorical=cfg.categorical,
    )
    if source.sparse and "sparse" not in model_cls.params:
        raise PsctlError(f"model {cfg.model} does not take sparse input ({source.format})")
    partitions = await asyncio.to_thread(data.plan_partitions, cfg.data, cfg.workers, source.has_header)
    spec = build_spec(cfg, source, partitions)
    # bad parameters fail here, not on the cluster
    model_cls(source.n_features or 1, ["0", "1"], l2=spec["l2"], **spec["model_params"])
    steps = cfg.epochs * sum(steps_per_epoch(p.n_rows, cfg.batch_size) for p in partitions)
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
        session = _Session(cfg, model_cls, spec, peer)
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
            params, shards = await _final_pull(
                session.placed, job_id, cfg.max_frame_bytes, session.model.tables(), cfg.save_optimizer_state
            )
            peer.notify(MsgType.JOB_END, {"job_id": job_id})
        finally:
            peer.close()
    meta = _model_meta(cfg, source, session, done, time.monotonic() - started)
    meta["metrics"].update(table_figures(session.model.tables(), params, shards, done, spec))
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


async def _final_pull(
    submitted: dict[str, Any], job_id: str, max_frame_bytes: int, tables: list[TableSpec], with_state: bool
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """The model's arrays (a sparse table as ``name`` values plus ``name.keys``; optimizer state
    as ``name.opt.<state>`` when asked) and each shard's status (keys, memory)."""
    ranges = submitted["ranges"]
    client = await ShardClient.connect(
        submitted["shards"], ranges, job_id, {"role": "driver"}, max_frame_bytes=max_frame_bytes,
        hashed=[t.name for t in tables if t.sparse],
    )
    try:
        dumped = await client.dump([t.name for t in tables], with_state, timeout_s=FINAL_PULL_TIMEOUT_S)
        shards = await client.status(timeout_s=SUBMIT_TIMEOUT_S)
    finally:
        client.close()
    params: dict[str, np.ndarray] = {}
    for t in tables:
        keys, values, state = dumped[t.name]
        params[t.name] = values
        if t.sparse:
            params[f"{t.name}.keys"] = keys
        params.update({f"{t.name}.opt.{name}": arr for name, arr in state.items()})
    return params, shards


def table_figures(
    tables: list[TableSpec], params: dict[str, np.ndarray], shards: list[dict[str, Any]], done: dict[str, Any], spec: dict[str, Any]
) -> dict[str, Any]:
    """Keys stored, non-zero weights, shard memory and traffic per epoch versus a dense model
    of the same key space (which would pull and push every table whole at each step)."""
    steps = sum(steps_per_epoch(p["n_rows"], spec["batch_size"]) for p in spec["partitions"])
    dense_step_bytes = sum(t.rows * t.dim * np.dtype(t.dtype).itemsize for t in tables)
    return {
        "key_space": sum(t.rows for t in tables),
        "unique_keys": sum(len(params[t.name]) for t in tables),
        "nonzero_weights": sum(int(np.count_nonzero(params[t.name])) for t in tables),
        "shard_keys": [s.get("keys", 0) for s in shards],
        "shard_table_bytes": [s.get("bytes", 0) for s in shards],
        "shard_rss_bytes": [s.get("rss_bytes", 0) for s in shards],
        "shard_peak_rss_bytes": [s.get("peak_rss_bytes", 0) for s in shards],
        "bytes_pulled_per_epoch": done.get("bytes_pulled", 0) / spec["epochs"],
        "bytes_pushed_per_epoch": done.get("bytes_pushed", 0) / spec["epochs"],
        "dense_bytes_per_epoch": steps * dense_step_bytes,
    }


def _model_meta(cfg: TrainConfig, source: formats.Source, session: _Session, done: dict[str, Any], seconds: float) -> dict[str, Any]:
    assert session.model is not None and session.stats is not None
    schema = source.schema
    meta: dict[str, Any] = {
        "kind": cfg.model,
        "task": session.model_cls.task,
        "model_params": session.spec["model_params"],
        "n_features": session.n_features,
        "input": formats.meta_of(session.spec["data"], session.stats["stats"]) if source.sparse else {"format": "csv"},
        "optimizer": session.spec["optimizer"],
        "schema": schema.to_dict() if schema else None,
        "feature_names": list(schema.feature_names) if schema else [],
        "label": schema.columns[schema.label_index] if schema and schema.label_index is not None else None,
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
    if source.format == "csv" and cfg.standardize and session.stats["stats"]:
        mean, std = data.merge_stats(session.stats["stats"])
        meta["standardize"] = {"mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist()}
    return meta


def check_out_path(out: str) -> None:
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise DataError(f"cannot write the model to '{out}': folder '{parent}' does not exist")
